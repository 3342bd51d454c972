"""ZeRO-1 (llm.c's -z 1): which slice of the optimizer state each rank keeps, and the update on it.

llm.c's slicing (llmc/zero.cuh, gpt2_update): every parameter tensor is cut into N equal slices,
the twelve per-layer tensors (ln1w ... fcprojb, stacked over L) one layer at a time, wte, wpe,
lnfw and lnfb whole. Rank r keeps the fp32 master weights and AdamW's m and v of slice r of each
("its shard"), gets the rank-mean of those gradients by a reduce-scatter, updates only them, and
the bf16 parameters are all-gathered afterwards. -z 0: every rank owns all of every tensor and the
gradients are all-reduced. Slicing layer by layer (not the stacked tensor) is what lets a layer's
gradients be reduced as soon as its backward is done; weight decay, which applies per tensor, is
unchanged, and so is every element's update (AdamW is elementwise), so the result does not depend
on N.

A rank's optimizer state is "packed": its slices one after another in the flat (llm.c) order,
tensor by tensor, layer by layer. At -z 0, or with one rank, the packed state is the flat order.
Unit: what one collective call moves (a whole non-layer tensor, or one layer of a per-layer one).
"""

from dataclasses import dataclass

import numpy as np

from .config import parameter_shapes
from .train_config import UsageError

NON_LAYER_TENSORS = ("wte", "wpe", "lnfw", "lnfb")  # reduced after the encoder backward, not per layer


class ShardingError(UsageError):
    """The ranks cannot slice the model evenly (llm.c requires it as well): a bad command line."""


@dataclass(frozen=True)
class Unit:
    tensor: str      # parameter tensor name
    layer: int       # the layer, or -1 for a non-layer tensor
    offset: int      # where the unit starts in the flat parameter order
    size: int        # elements


@dataclass(frozen=True)
class TensorSlices:
    """One tensor's part of a rank's shard: `slices` runs of `count` elements, run s starting at
    tensor element start + s * stride, and at packed-state element state_offset + s * count."""
    tensor: str
    offset: int        # the tensor's start in the flat order
    start: int         # the first run's start within the tensor
    count: int
    slices: int
    stride: int
    state_offset: int  # in this rank's packed state

    @property
    def state_count(self):
        return self.slices * self.count


class ShardLayout:
    """The slicing of `config`'s parameters for rank `rank` of `world_size` at ZeRO stage
    `zero_stage` (0 or 1)."""

    def __init__(self, config, world_size=1, rank=0, zero_stage=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if zero_stage not in (0, 1):
            raise ValueError(f"ZeRO stage must be 0 or 1, got {zero_stage}")
        self.config, self.world_size, self.rank, self.zero_stage = config, world_size, rank, zero_stage
        self.parts = world_size if zero_stage == 1 else 1  # slices per unit
        # -z 1 on one rank takes the sharded code path too (its one shard is everything)
        self.units, self.tensors = [], []
        offset, state_offset = 0, 0
        for name, shape in parameter_shapes(config).items():
            size = int(np.prod(shape))
            layers = 1 if name in NON_LAYER_TENSORS else shape[0]
            unit_size = size // layers
            for layer in range(layers):
                self.units.append(Unit(name, -1 if name in NON_LAYER_TENSORS else layer, offset + layer * unit_size,
                                       unit_size))
            if unit_size % self.parts:
                what = f"{unit_size} elements" + ("" if name in NON_LAYER_TENSORS else " per layer")
                raise ShardingError(f"-z 1 over {world_size} processes: tensor {name} has {what}, not a multiple of "
                                    f"{world_size} (llm.c slices every tensor evenly); use another process count or -z 0")
            if not self.sharded:  # the whole tensor in one run: the update launches as it always did
                part = TensorSlices(name, offset, 0, size, 1, size, state_offset)
            else:
                count = unit_size // self.parts
                part = TensorSlices(name, offset, rank * count, count, layers, unit_size, state_offset)
            self.tensors.append(part)
            offset += size
            state_offset += part.state_count
        self.num_parameters = offset
        self.state_size = state_offset

    @property
    def sharded(self):
        """-z 1: gradients reduce-scattered, the update per slice, parameters all-gathered."""
        return self.zero_stage == 1

    def layer_units(self, layer):
        return [u for u in self.units if u.layer == layer]

    def non_layer_units(self):
        return [u for u in self.units if u.layer == -1]

    def runs(self):
        """(flat offset, count, packed-state offset) of every run of this rank's shard, in order."""
        for t in self.tensors:
            for s in range(t.slices):
                yield t.offset + t.start + s * t.stride, t.count, t.state_offset + s * t.count

    def pack(self, flat):
        """This rank's elements of a flat (num_parameters,) array, packed."""
        flat = np.asarray(flat).reshape(-1)
        if not self.sharded:
            return flat[:self.num_parameters].copy()
        packed = np.empty(self.state_size, dtype=flat.dtype)
        for offset, count, state in self.runs():
            packed[state:state + count] = flat[offset:offset + count]
        return packed

    def unpack(self, packed, flat):
        """The inverse of pack: writes this rank's elements of `flat` from `packed`."""
        packed = np.asarray(packed).reshape(-1)
        if packed.size != self.state_size:
            raise ValueError(f"packed state of rank {self.rank}/{self.world_size}: expected {self.state_size} "
                             f"elements, got {packed.size}")
        for offset, count, state in self.runs():
            flat[offset:offset + count] = packed[state:state + count]
        return flat

    def for_rank(self, rank):
        return ShardLayout(self.config, self.world_size, rank, self.zero_stage)

    def describe(self):
        if not self.sharded or self.world_size == 1:
            return "every rank keeps the whole optimizer state" if self.world_size > 1 else ""
        return (f"ZeRO-1: each rank keeps the optimizer state of 1/{self.world_size} of every tensor "
                f"({self.state_size:,} of {self.num_parameters:,} parameters)")


# ---- the CPU path (numpy float32 arrays, the reference model's ParameterTensors) ------------------------

def reduce_gradients(layout, grads, comm):
    """Average flat gradients across ranks in place: all-reduce at -z 0; reduce-scatter at -z 1
    (then only this rank's slices hold the mean). One call per unit, as the GPU path does."""
    if not comm.active:
        return
    for unit in layout.units:
        view = grads[unit.offset:unit.offset + unit.size]
        if layout.sharded:
            comm.reduce_scatter(view, "avg")
        else:
            comm.all_reduce(view, "avg")


def gather_parameters(layout, params, comm):
    """After a -z 1 update: every rank's updated slices to every rank (flat params, in place)."""
    if not layout.sharded or not comm.active:
        return
    for unit in layout.units:
        comm.all_gather(params[unit.offset:unit.offset + unit.size])


def shard_sum_of_squares(layout, grads):
    """Sum of squares (float64) of this rank's slices of flat gradients: the global norm's share."""
    return sum(float(np.dot(g, g)) for g in (np.asarray(grads[o:o + c], np.float64) for o, c, _ in layout.runs()))


def adamw_update_shard(layout, params, grads, m, v, step, learning_rate, weight_decay=0.0, grad_scale=1.0):
    """reference.gpt2_update on this rank's shard only: flat params and grads, packed m and v.
    Weight decay on the 2-D tensors, as llm.c. The same bits per element as the whole update."""
    from .config import WEIGHT_DECAY_PARAMETERS
    from .reference import adamw_update

    for t in layout.tensors:
        wd = weight_decay if t.tensor in WEIGHT_DECAY_PARAMETERS else 0.0
        for s in range(t.slices):
            start, state = t.offset + t.start + s * t.stride, t.state_offset + s * t.count
            adamw_update(params[start:start + t.count], grads[start:start + t.count], m[state:state + t.count],
                         v[state:state + t.count], step, learning_rate, weight_decay=wd, grad_scale=grad_scale)
