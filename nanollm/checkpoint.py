"""Training checkpoints as HDF5 files: save, load, find the newest, prune; llm.c's -n/-nk/-nm/-y.

llm.c writes model_%08d.bin (the bf16 parameters) beside state_%08d_%05d.bin (per rank: AdamW m and
v, master weights, RNG and data-loader state) and a DONE_%08d marker. nanollm writes one HDF5 file,
OUT/checkpoint_%08d.h5, readable by hand with h5py or h5dump:

    /                       attrs: format, format_version, step, complete, num_parameters
    /model/params_bf16      (N,) uint16: the parameters as bf16 bits, llm.c's tensor order
    /model                  attrs: config (GPT2Config as JSON), tensors (name, shape, offset as JSON)
    /optimizer              attrs: num_shards, adamw_step, beta1, beta2, eps
    /optimizer/shard_000    attrs: shard_index, num_shards, offset, count (elements of the flat order)
    /optimizer/shard_000/master, m, v   (count,) float32: fp32 master weights, AdamW moments
    /rng                    attrs: seed (stochastic-rounding base seed), sampling (numpy Generator
                            bit_generator.state as JSON)
    /data/train_loader      attrs: state (nanollm.data.DataLoader.state() as JSON)
    /train_config           attrs: config (TrainConfig as JSON)

Every dataset carries attributes dtype, shape, meaning and crc32 (zlib, of its bytes). Optimizer
state is stored per shard, ready for ZeRO-1; today one process writes num_shards = 1, and a
checkpoint written by another number of ranks is refused.

Writes are atomic: the file is written under a temporary name in the same folder (a dot name
ending .tmp, which no checkpoint pattern matches), flushed and fsynced, renamed over the final name
with os.replace, and the folder fsynced. A crash mid-save leaves every earlier checkpoint intact;
its temp file is removed when that checkpoint is saved again (nanollm/atomic.py).

    python -m nanollm.checkpoint info OUT/checkpoint_00000100.h5
    python -m nanollm.interop convert OUT/checkpoint_00000100.h5 hf_dir/    # export the model (load_model)
"""

import dataclasses
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from .atomic import atomic_write_with
from .config import GPT2Config, num_parameters, parameter_shapes

FORMAT = "nanollm-checkpoint"
FORMAT_VERSION = 1
FILENAME = "checkpoint_{step:08d}.h5"
FILENAME_RE = re.compile(r"checkpoint_(\d{8,})\.h5")
ADAMW = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8}  # the model's and reference's defaults


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the field."""


class CorruptCheckpointError(CheckpointError):
    """Unreadable, truncated, incomplete or damaged: resume skips it for an older one."""


@dataclass
class Checkpoint:
    step: int                 # optimizer steps taken when saved (the training loop's step)
    model_config: GPT2Config
    params_bf16: np.ndarray   # (N,) uint16 bf16 bits, llm.c order
    master: np.ndarray        # (N,) float32 master weights
    m: np.ndarray             # (N,) float32
    v: np.ndarray             # (N,) float32
    adamw_step: int = 0       # AdamW's t (bias correction)
    seed: int = 0             # stochastic-rounding base seed (nanollm.model.GPT2.seed)
    sampling_rng: dict = None  # numpy Generator bit_generator.state
    loader_state: dict = None  # nanollm.data.DataLoader.state()
    train_config: dict = field(default_factory=dict)  # TrainConfig fields
    num_shards: int = 1
    path: str = ""

    def optimizer_state(self):
        """The dict GPT2.load_optimizer_state / CpuBackend.load_optimizer_state take."""
        return {"params_bf16": self.params_bf16, "master": self.master, "m": self.m, "v": self.v,
                "step": self.adamw_step, "seed": self.seed}


def checkpoint_path(folder, step):
    return os.path.join(folder, FILENAME.format(step=step))


# ---- writing ------------------------------------------------------------------------------------

def _json(value):
    return json.dumps(value, sort_keys=True)


def _dataset(group, name, data, dtype, meaning):
    data = np.ascontiguousarray(data)
    ds = group.create_dataset(name, data=data)
    ds.attrs["dtype"] = dtype
    ds.attrs["shape"] = np.asarray(data.shape, dtype=np.int64)
    ds.attrs["meaning"] = meaning
    ds.attrs["crc32"] = np.uint32(zlib.crc32(data.view(np.uint8).reshape(-1)))
    return ds


def shard_bounds(n, num_shards):
    """(offset, count) of each shard of n elements: contiguous, the first ones one larger."""
    base, extra = divmod(n, num_shards)
    bounds, offset = [], 0
    for i in range(num_shards):
        count = base + (i < extra)
        bounds.append((offset, count))
        offset += count
    return bounds


def _write(path, ckpt, num_shards):
    import h5py

    config = ckpt.model_config
    n = num_parameters(config)
    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(ckpt.step)
        f.attrs["num_parameters"] = n
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["complete"] = 0  # set to 1 last: a file without it was never finished
        model = f.create_group("model")
        model.attrs["config"] = _json(dataclasses.asdict(config))
        tensors, offset = [], 0
        for name, shape in parameter_shapes(config).items():
            tensors.append([name, list(shape), offset])
            offset += int(np.prod(shape))
        model.attrs["tensors"] = _json(tensors)
        _dataset(model, "params_bf16", np.asarray(ckpt.params_bf16, dtype=np.uint16), "bfloat16 bits in uint16",
                 "model parameters in bf16 (float32 = bits << 16), flat, llm.c tensor order (see /model tensors)")
        opt = f.create_group("optimizer")
        opt.attrs["num_shards"] = num_shards
        opt.attrs["adamw_step"] = int(ckpt.adamw_step)
        for key, value in ADAMW.items():
            opt.attrs[key] = value
        for index, (start, count) in enumerate(shard_bounds(n, num_shards)):
            shard = opt.create_group(f"shard_{index:03d}")
            shard.attrs["shard_index"] = index
            shard.attrs["num_shards"] = num_shards
            shard.attrs["offset"] = start
            shard.attrs["count"] = count
            where = f"elements [{start}, {start + count}) of the flat parameter order"
            for name, meaning in (("master", "fp32 master weights"), ("m", "AdamW first moment"),
                                  ("v", "AdamW second moment")):
                data = np.asarray(getattr(ckpt, name), dtype=np.float32)[start:start + count]
                _dataset(shard, name, data, "float32", f"{meaning}, {where}")
        rng = f.create_group("rng")
        rng.attrs["seed"] = int(ckpt.seed)
        rng.attrs["sampling"] = _json(ckpt.sampling_rng)
        rng.attrs["meaning"] = ("seed: stochastic-rounding base seed of the bf16 update; sampling: the "
                                "text-sampling numpy Generator's bit_generator.state")
        data = f.create_group("data")
        loader = data.create_group("train_loader")
        loader.attrs["state"] = _json(ckpt.loader_state)
        loader.attrs["meaning"] = "nanollm.data.DataLoader.state() of the train loader: the next batch"
        tc = f.create_group("train_config")
        tc.attrs["config"] = _json(ckpt.train_config)
        f.attrs["complete"] = 1
        f.flush()


def save_checkpoint(path, ckpt, num_shards=1):
    """Write ckpt to path atomically (see the module docstring). num_shards splits the optimizer
    state into that many contiguous shards (ZeRO-1's layout); one process writes 1."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_with(path, lambda tmp_path: _write(tmp_path, ckpt, num_shards))
    return path


# ---- reading ------------------------------------------------------------------------------------

def _attr_name(obj_path, name):
    return ("" if obj_path == "/" else obj_path) + f"/@{name}"


class _Reader:
    """Field access on an open file that turns every failure into a CheckpointError naming it."""

    def __init__(self, path, f):
        self.path, self.f = path, f

    def corrupt(self, field_name, problem):
        return CorruptCheckpointError(f"{self.path}: {field_name}: {problem}")

    def attr(self, obj_path, name):
        field_name = _attr_name(obj_path, name)
        try:
            obj = self.f[obj_path]
        except (KeyError, OSError, RuntimeError) as error:
            raise self.corrupt(obj_path, f"missing ({error})") from None
        if name not in obj.attrs:
            raise self.corrupt(field_name, "missing attribute")
        try:
            value = obj.attrs[name]
        except (OSError, RuntimeError) as error:
            raise self.corrupt(field_name, f"unreadable ({error})") from None
        return value.decode() if isinstance(value, bytes) else value

    def int_attr(self, obj_path, name):
        value = self.attr(obj_path, name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise self.corrupt(_attr_name(obj_path, name), f"expected an integer, got {value!r}") from None

    def json_attr(self, obj_path, name):
        value = self.attr(obj_path, name)
        try:
            return json.loads(value)
        except (TypeError, ValueError) as error:
            raise self.corrupt(_attr_name(obj_path, name), f"not valid JSON ({error})") from None

    def array(self, ds_path, dtype, size):
        try:
            ds = self.f[ds_path]
        except (KeyError, OSError, RuntimeError) as error:
            raise self.corrupt(ds_path, f"missing dataset ({error})") from None
        if ds.dtype != np.dtype(dtype) or ds.shape != (size,):
            raise self.corrupt(ds_path, f"expected ({size},) {np.dtype(dtype)}, found {ds.shape} {ds.dtype}")
        try:
            data = ds[()]
        except (OSError, RuntimeError, ValueError) as error:
            raise self.corrupt(ds_path, f"unreadable data, the file is truncated or damaged ({error})") from None
        if "crc32" in ds.attrs:
            crc = zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            if crc != int(ds.attrs["crc32"]):
                raise self.corrupt(ds_path, f"checksum mismatch (crc32 {crc:#010x}, recorded "
                                            f"{int(ds.attrs['crc32']):#010x}): the data are damaged")
        return data


def _open(path):
    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise CorruptCheckpointError(f"{path}: not a readable HDF5 file (truncated or damaged?): {error}") from None


def _read_header(r):
    fmt = r.attr("/", "format")
    if fmt != FORMAT:
        raise r.corrupt("/@format", f"expected {FORMAT!r}, got {fmt!r}: not a nanollm checkpoint")
    version = r.int_attr("/", "format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{r.path}: /@format_version: {version}, but this nanollm reads version "
                              f"{FORMAT_VERSION}")
    if r.int_attr("/", "complete") != 1:
        raise r.corrupt("/@complete", "the checkpoint was never finished (complete = 0)")
    config_dict = r.json_attr("/model", "config")
    try:
        config = GPT2Config(**config_dict)
    except (TypeError, ValueError) as error:
        raise r.corrupt("/model/@config", f"not a valid GPT2Config ({error})") from None
    n = r.int_attr("/", "num_parameters")
    if n != num_parameters(config):
        raise r.corrupt("/@num_parameters", f"{n}, but the model config has {num_parameters(config)}")
    return config, n


def load_checkpoint(path, world_size=1):
    """Read and check a checkpoint written by save_checkpoint; returns a Checkpoint.
    world_size: the number of ranks of this job; a checkpoint of another count is refused."""
    path = os.fspath(path)
    f = _open(path)
    with f:
        r = _Reader(path, f)
        config, n = _read_header(r)
        num_shards = r.int_attr("/optimizer", "num_shards")
        if num_shards != world_size:
            raise CheckpointError(
                f"{path}: /optimizer/@num_shards: written by {num_shards} rank(s), but this job has "
                f"{world_size}; resume with the same number of processes")
        master = np.empty(n, np.float32)
        m = np.empty(n, np.float32)
        v = np.empty(n, np.float32)
        expected = shard_bounds(n, num_shards)
        for index in range(num_shards):
            group = f"/optimizer/shard_{index:03d}"
            fields = {k: r.int_attr(group, k) for k in ("shard_index", "num_shards", "offset", "count")}
            start, count = expected[index]
            if (fields["shard_index"], fields["num_shards"], fields["offset"], fields["count"]) != \
                    (index, num_shards, start, count):
                raise r.corrupt(group, f"shard attributes {fields} do not match shard {index} of "
                                       f"{num_shards} (offset {start}, count {count})")
            for name, dest in (("master", master), ("m", m), ("v", v)):
                dest[start:start + count] = r.array(f"{group}/{name}", np.float32, count)
        return Checkpoint(
            step=r.int_attr("/", "step"),
            model_config=config,
            params_bf16=r.array("/model/params_bf16", np.uint16, n),
            master=master, m=m, v=v,
            adamw_step=r.int_attr("/optimizer", "adamw_step"),
            seed=r.int_attr("/rng", "seed"),
            sampling_rng=r.json_attr("/rng", "sampling"),
            loader_state=r.json_attr("/data/train_loader", "state"),
            train_config=r.json_attr("/train_config", "config"),
            num_shards=num_shards,
            path=path,
        )


def load_model(path, master=False):
    """(GPT2Config, flat float32 parameters in llm.c's order) of a checkpoint, for export and
    evaluation, whatever number of ranks wrote it: its bf16 parameters (what the GPU model computes
    with, and what llm.c's checkpoints hold as model_%08d.bin), or with master=True the fp32 master
    weights (what the CPU path computes with)."""
    path = os.fspath(path)
    with _open(path) as f:
        r = _Reader(path, f)
        config, n = _read_header(r)
        if not master:
            from .kernels.bf16 import from_bf16_bits

            return config, from_bf16_bits(r.array("/model/params_bf16", np.uint16, n))
        num_shards = r.int_attr("/optimizer", "num_shards")
    return config, load_checkpoint(path, world_size=num_shards).master


# ---- the checkpoint folder ------------------------------------------------------------------------

def list_checkpoints(folder):
    """[(step, path)] of the files named like checkpoints in folder, oldest first. Temporary files
    (".checkpoint_...tmp") never match."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = FILENAME_RE.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def latest_checkpoint(folder, world_size=1, warn=None):
    """The newest checkpoint in folder that loads and checks out, or None. A damaged or unfinished
    newer file is skipped with a warning (through warn, default stderr) for the one before it."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    for step, path in reversed(list_checkpoints(folder)):
        try:
            ckpt = load_checkpoint(path, world_size)
        except CorruptCheckpointError as error:
            warn(f"warning: skipping checkpoint {error}")
            continue
        if ckpt.step != step:
            warn(f"warning: skipping checkpoint {path}: /@step: {ckpt.step}, but the name says {step}")
            continue
        return ckpt
    return None


def prune_checkpoints(folder, keep, major_every=0):
    """llm.c's -nk/-nm: keep the `keep` newest checkpoints (0 = all) and every major one (step a
    multiple of major_every > 0); delete the rest. Returns the deleted paths."""
    if keep <= 0:
        return []
    deleted = []
    for step, path in list_checkpoints(folder)[:-keep]:
        if major_every > 0 and step % major_every == 0:
            continue
        os.remove(path)
        deleted.append(path)
    return deleted


# ---- python -m nanollm.checkpoint info PATH ----------------------------------------------------------

def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024


def info(path):
    """A summary of a checkpoint (it is loaded and checked in full first)."""
    import h5py

    with _open(path) as f:
        num_shards = _Reader(path, f).int_attr("/optimizer", "num_shards")
    ckpt = load_checkpoint(path, world_size=num_shards)
    c = ckpt.model_config
    lines = [
        f"{path}: {FORMAT} version {FORMAT_VERSION}, {_size(os.path.getsize(path))}",
        f"step {ckpt.step} (AdamW step {ckpt.adamw_step}), optimizer shards: {ckpt.num_shards}",
        f"model: L={c.num_layers} C={c.channels} NH={c.num_heads} V={c.vocab_size} (padded {c.padded_vocab_size}) "
        f"maxT={c.max_seq_len}, {num_parameters(c):,} parameters",
    ]
    tc = ckpt.train_config
    if tc:
        lines.append("train config: " + ", ".join(f"{k}={tc[k]!r}" for k in sorted(tc)))
    ls = ckpt.loader_state or {}
    if ls:
        lines.append(f"train loader: epoch {ls.get('epoch')}, shard {ls.get('shard_idx')} of {ls.get('num_shards')}, "
                     f"next sample {ls.get('sample_idx')}, B={ls.get('B')} T={ls.get('T')} "
                     f"world_size={ls.get('world_size')} seed={ls.get('seed')}")
    lines.append(f"rng: stochastic-rounding seed {ckpt.seed}, sampling generator "
                 f"{(ckpt.sampling_rng or {}).get('bit_generator')}")
    lines.append("datasets:")
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name:<28} {str(obj.shape):<14} {obj.dtype!s:<8} {_size(obj.nbytes):>10}  "
                             f"{obj.attrs.get('dtype', '')}")
        f.visititems(visit)
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanollm.checkpoint",
                                     description="Inspect nanollm's HDF5 training checkpoints (-n). To export the "
                                                 "model: python -m nanollm.interop convert CHECKPOINT.h5 OUT")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="check a checkpoint in full and summarise it").add_argument("path", metavar="PATH")
    args = parser.parse_args(argv)  # exits 2 on a bad command line, 0 for --help
    try:
        print(info(args.path))
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
