"""GPT-2 on the GPU from nanollm's kernels: llm.c's train_gpt2.cu model, in Python.

Parameters (bf16), gradients (bf16), fp32 master weights and AdamW's m and v are each one device
allocation carved into named views in llm.c's order (config.parameter_shapes); activations
likewise, per layer stacked over L. The forward and backward are the same sequence of kernel
launches as llm.c's gpt2_forward / gpt2_backward, all on the model's own stream with no host
synchronisation inside; on a real GPU the forward and backward of full batches replay as CUDA
graphs (cuda_graph.py), which takes Python's launch overhead off the step. The host's inputs -- tokens,
targets and the encoder backward's token buckets -- go up in one pinned, double-buffered async
copy per micro-step (staging.PinnedUploads). The stream is a blocking stream, so work on the
legacy default stream (checkpoint copies, cuda.synchronize) stays ordered with it:

forward: encoder -> per layer: layernorm -> qkv matmul (+bias) -> attention -> attproj matmul
(+bias, + residual: cuBLASLt's C operand) -> layernorm -> fc matmul (+bias, GELU epilogue) ->
fcproj matmul (+bias, + residual) -> next layernorm ... -> logits = lnf . wte^T -> fused
classifier (losses, and the logits overwritten in place with dloss * dlogits). (llm.c adds the
residual in a fused residual + layernorm kernel, reading the projection back.) At -r 1 with a
large B*T the lm head and classifier run over blocks of rows, each block's lm-head backward right
after it, and the memory the one-block logits buffer saves keeps the GELU outputs llm.c's -r 1
recomputes in the backward (lm_head_plan); without targets the forward stops at lnf and
logits_at / logits_host run the lm head for the rows asked.
backward: the reverse, with += into gradients so micro-steps accumulate; after zero_grad() the
first backward writes them (=) instead, so no pass zeroes them (3 GB at 1.5B). The qkv bias
gradient sums only the query third of dqkv: its key part is 0 and its value part attproj's bias
gradient times attproj's weight, by the softmax's invariances (kernels/qkv_bias.py; llm.c sums all
of dqkv). update: global norm, then AdamW per tensor (weight decay on the 2-D tensors only),
stochastic rounding to bf16.

Several ranks (nanollm/distributed.py, zero.py): the last micro-step's backward averages the
gradients across ranks, layer by layer as each layer's backward finishes when the communicator
queues on streams (NCCL: a second stream, ordered by events, so the transfers overlap the rest of
the backward, as llm.c does), after the backward otherwise (MPI, through the host). Under -z 1
that is a reduce-scatter, master/m/v hold this rank's shard only, AdamW updates the shard and the
bf16 parameters are all-gathered.

Shapes: B batch, T time, C channels, NH heads, L layers, V vocabulary, Vp padded vocabulary.
"""

import concurrent.futures
import math
import os

import numpy as np
from numba import cuda
from numba.cuda.cudadrv.driver import device_memset

from . import distributed, reference, startup, zero
from .cuda_graph import GraphReplayer, is_supported as cuda_graphs_supported
from .staging import PinnedUploads
from .config import WEIGHT_DECAY_PARAMETERS, num_parameters, parameter_shapes
from .kernels import adamw, attention, classifier, encoder, gelu, global_norm, layernorm, matmul, qkv_bias

attention_cudnn = None  # imported only when cuDNN attention is chosen (it loads cuDNN)
from .kernels.bf16 import from_bf16_bits, to_bf16_bits
from .kernels.cuda_common import SIMULATOR, check_variant


def _lm_head_chunks_from_environment():
    text = os.environ.get("NANOLLM_LM_HEAD_CHUNKS", "4")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"NANOLLM_LM_HEAD_CHUNKS={text!r}: expected a whole number >= 1 (1: the lm head whole)")
    return int(text)


# -r 1: the lm head and the classifier in this many blocks of rows (the logits buffer holds one
# block), when the memory that frees keeps more than the last layer's GELU (GPT2.lm_head_plan)
LM_HEAD_CHUNKS = _lm_head_chunks_from_environment()


def _first_rows(array, rows, width):
    """The first `rows` rows of `width` elements of a contiguous buffer, as a (rows, width) view
    (the lm head's lnf, d lnf and logits blocks, whatever the buffer's own shape)."""
    return array.reshape(-1)[:rows * width].reshape(rows, width)


class Buffers:
    """One device allocation per dtype, carved into named views (llm.c's malloc_and_point)."""

    def __init__(self, shapes, dtype):
        self.shapes = dict(shapes)
        sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.offsets, total = self.layout(self.shapes, dtype)
        self.memory = cuda.device_array(total, dtype=dtype)
        for name, shape in self.shapes.items():
            start = self.offsets[name]
            setattr(self, name, self.memory[start:start + sizes[name]].reshape(shape))

    def __getitem__(self, name):
        return getattr(self, name)

    @staticmethod
    def layout(shapes, dtype):
        """(offsets, total elements) of the one allocation (memory_plan counts it too)."""
        # keep every view 16-byte aligned: the kernels and cuBLASLt load wide words
        align = max(1, 16 // np.dtype(dtype).itemsize)
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            total += -(-math.prod(shape) // align) * align
        return offsets, max(total, 1)


class GPT2:
    """GPT-2 for training on one GPU at micro-batch (B, T)."""

    def __init__(self, config, B, T, seed=42, gelu_fusion=2, recompute=1, grad_accum_steps=1, attention="numba",
                 cuda_graphs=None, parameters=None, comm=None, layout=None, lm_head=None, qkv_bias_grad=None):
        """attention: "numba" (llm.c's own kernels: permute, cuBLASLt products, softmax), "cudnn"
        (flash attention through cuDNN, as llm.c's USE_CUDNN build), or "auto" (cuDNN where it
        works for this shape, else numba; self.attention_note says why).
        cuda_graphs: replay the forward and backward of full batches as CUDA graphs (None: where
        supported, i.e. on a real GPU; see cuda_graph.py). The results are the same launches'.
        parameters: flat float parameters in llm.c's order to start from (e.g. a model file's);
        None: GPT-2's initialisation drawn from `seed` (reference.init_parameters).
        comm: a distributed.Communicator (default: one process); layout: this rank's
        zero.ShardLayout (default: -z 0). lm_head: (chunks, GELU layers kept), default
        lm_head_plan's. qkv_bias_grad: "softmax" (the key and value parts of the qkv bias
        gradient from the softmax's invariances) or "sums" (llm.c's); None: NANOLLM_QKV_BIAS_GRAD's
        (kernels/qkv_bias.py)."""
        if T > config.max_seq_len:
            raise ValueError(f"T={T} exceeds the model's max_seq_len {config.max_seq_len}")
        if gelu_fusion not in (0, 1, 2) or recompute not in (0, 1):
            raise ValueError(f"gelu_fusion must be 0/1/2 and recompute 0/1, got {gelu_fusion}, {recompute}")
        if attention not in ("numba", "cudnn", "auto"):
            raise ValueError(f"attention must be numba, cudnn or auto, got {attention!r}")
        self.config, self.B, self.T = config, B, T
        if parameters is None:  # numpy's RNG releases the GIL: the weights are drawn on other
            # threads (init_parameters' pool) while cuDNN loads and the buffers are allocated
            drawing = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            parameters = drawing.submit(lambda: reference.init_parameters(config, seed).memory)
            drawing.shutdown(wait=False)
        self.attention, self.attention_note = self._choose_attention(attention, config, B, T)
        startup.mark("attention choice (loads cuDNN and its frontend)")
        self.gelu_fusion, self.recompute = gelu_fusion, recompute
        self.qkv_bias_grad = check_variant(qkv_bias_grad or qkv_bias.MODE, qkv_bias.MODES, "qkv_bias_grad")
        self.lm_chunks, self.gelu_kept = lm_head or self.lm_head_plan(config, B, T, recompute)
        if not (self.lm_chunks >= 1 and (1 if recompute else config.num_layers) <= self.gelu_kept <= config.num_layers):
            raise ValueError(f"lm_head={lm_head}: chunks >= 1 and GELU layers kept in [1, L] (L at -r 0)")
        self.lm_chunk_rows = math.ceil(B * T / self.lm_chunks)
        self.grad_accum_steps = grad_accum_steps
        self.num_parameters = num_parameters(config)
        self.stream = cuda.stream()
        startup.mark("CUDA context, stream")
        if cuda_graphs is None:
            cuda_graphs = cuda_graphs_supported()
        elif cuda_graphs and not cuda_graphs_supported():
            raise RuntimeError("CUDA graphs need a real GPU and the cuda-bindings package")
        self.graphs = GraphReplayer(self.stream) if cuda_graphs else None
        self._adamw_launches = None
        self._adamw_multi_tensor = None
        self.comm = comm or distributed.SingleProcess(distributed.World())
        self.layout = layout or zero.ShardLayout(config, self.comm.size, self.comm.rank)
        if (self.layout.world_size, self.layout.rank) != (self.comm.size, self.comm.rank):
            raise ValueError(f"layout of rank {self.layout.rank}/{self.layout.world_size} for communicator rank "
                             f"{self.comm.rank}/{self.comm.size}")
        for t in self.layout.tensors:  # (tensors start 8-element aligned in Buffers)
            if self.layout.sharded and (t.count % 4 or t.stride % 4):  # the norm kernel reads a slice as uint64 words
                raise zero.ShardingError(
                    f"-z 1 over {self.layout.world_size} processes on the GPU: tensor {t.tensor}'s slices of "
                    f"{t.count} elements do not start on 4-element boundaries; use another process count")
        shapes = parameter_shapes(config)
        self.params = Buffers(shapes, np.uint16)
        self.grads = Buffers(shapes, np.uint16)
        # zeros once: the gaps between tensors (which no backward writes, and the global norm reads)
        # stay zero, since zero_grad() no longer passes over the whole buffer
        device_memset(self.grads.memory, 0, self.grads.memory.nbytes, stream=self.stream)
        # the optimizer state of this rank's shard (every parameter at -z 0), per tensor packed
        state_shapes = {t.tensor: (t.state_count,) for t in self.layout.tensors}
        self.master = Buffers(state_shapes, np.float32)
        self.m = Buffers(state_shapes, np.float32)
        self.v = Buffers(state_shapes, np.float32)
        self._allocate_activations()
        self._prepare_communication()
        self.step = 0  # AdamW steps taken
        self.seed = seed
        startup.mark("GPU buffers: parameters, gradients, AdamW state, activations", cuda.synchronize)
        if isinstance(parameters, concurrent.futures.Future):
            parameters = parameters.result()
            startup.mark("parameter init: the rest of numpy's RNG (on every core; began at the start)")
        self.load_parameters(parameters)
        startup.mark("parameter upload, bf16 rounding on the GPU")

    # ---- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _choose_attention(requested, config, B, T):
        if requested == "numba":
            return "numba", "llm.c's attention kernels (Numba + cuBLASLt)"
        global attention_cudnn
        from .kernels import attention_cudnn

        ok, reason = attention_cudnn.is_available(B, T, config.num_heads, config.head_size)
        if ok:
            return "cudnn", f"cuDNN flash attention ({reason})"
        if requested == "cudnn":
            raise RuntimeError(f"cuDNN attention is not available: {reason}")
        return "numba", f"llm.c's attention kernels (cuDNN not available: {reason})"

    @staticmethod
    def lm_head_plan(c, B, T, recompute, chunks=None):
        """(chunks, GELU layers kept) at -r recompute. -r 0: (1, L): the whole lm head at once,
        every layer's GELU output kept. -r 1 keeps one GELU buffer (llm.c: recomputed in the
        backward, but the last layer's still holds its forward's). The (B*T, Vp) logits are the
        largest activation and only live from the lm head to its backward: run the lm head and
        the classifier over `chunks` blocks of rows (LM_HEAD_CHUNKS), each block's lm-head
        backward right after its classifier (the weight gradient summed in an fp32 (Vp, C)
        buffer), and the memory the smaller logits buffer frees keeps the GELU outputs of as many
        more top layers as it holds: those skip the recompute, at no more memory than -r 1's.
        Where it would keep none (a small B*T, or chunks 1), the lm head runs whole."""
        L, C, Vp = c.num_layers, c.channels, c.padded_vocab_size
        if not recompute:
            return 1, L
        chunks = LM_HEAD_CHUNKS if chunks is None else chunks
        rows = B * T
        freed = (rows - math.ceil(rows / chunks)) * Vp - 2 * Vp * C  # bf16 elements (the fp32 sums take 2 a value)
        kept = min(L, 1 + max(0, freed) // (rows * 4 * C))
        return (chunks, kept) if chunks > 1 and kept > 1 else (1, 1)

    @staticmethod
    def activation_shapes(c, B, T, recompute, attention, grad_accum_steps, norm_scratch_size=None, lm_head=None):
        """(bf16, fp32) name -> shape of the activation buffers, for config c at micro-batch
        (B, T), -r recompute, attention "cudnn" or "numba" (memory_plan counts them too).
        norm_scratch_size: default global_norm_scratch_size() of the current GPU. lm_head:
        (chunks, GELU layers kept), default lm_head_plan's."""
        L, C, NH, Vp = c.num_layers, c.channels, c.num_heads, c.padded_vocab_size
        chunks, fch_gelu_layers = lm_head or GPT2.lm_head_plan(c, B, T, recompute)
        cudnn = attention == "cudnn"
        bf16 = {
            "encoded": (B, T, C),
            "ln1": (L, B, T, C),
            # numba attention keeps q, k, v permuted (3,B,NH,T,HS); cuDNN the qkv matmul's output
            "qkvr": (L, B, T, 3 * C) if cudnn else (L, 3, B, NH, T, C // NH),
            "atty": (L, B, T, C),
            "att": (0,) if cudnn else (L, B, NH, T, T),  # cuDNN keeps (B,NH,T) stats instead
            "residual2": (L, B, T, C),
            "ln2": (L, B, T, C),
            "fch": (L, B, T, 4 * C),             # pre-GELU
            "fch_gelu": (fch_gelu_layers, B, T, 4 * C),
            "residual3": (L, B, T, C),
            "lnf": (B, T, C),
            # becomes dlogits after the classifier; one block of rows when the lm head is chunked
            "logits": (B, T, Vp) if chunks == 1 else (math.ceil(B * T / chunks), Vp),
            # backward scratch, shared by all layers (llm.c's grads_acts)
            # (the (B,T,C) gradient scratch is the last layer's residual3 once the final
            # layernorm's backward has read it, as llm.c's dl_btc: 96 MiB less at d12 B=64)
            "dresidual": (B, T, C),
            "dbt4c": (B, T, 4 * C),              # also (B,T,3C) for dqkv, and the forward's qkv scratch
            "dqkvr": (0,) if cudnn else (3, B, NH, T, C // NH),
            "datt": (0,) if cudnn else (B, NH, T, T),
        }
        fp32 = {
            "ln1_mean": (L, B, T), "ln1_rstd": (L, B, T),
            "att_stats": (L, B, NH, T) if cudnn else (0,),  # cuDNN's softmax logsumexp
            "ln2_mean": (L, B, T), "ln2_rstd": (L, B, T),
            "lnf_mean": (B, T), "lnf_rstd": (B, T),
            "losses": (grad_accum_steps, B, T),
            "dwte": (0,) if chunks == 1 else (Vp, C),  # the chunked lm head's weight gradient, summed in fp32
            "layernorm_scratch": (layernorm.layernorm_backward_scratch_size(C),),
            "norm_scratch": (norm_scratch_size or global_norm.global_norm_scratch_size(),),
            "norm": (1,),
            "grad_scale": (1,),  # the clip factor update_clipped computes on the device
            # the bias gradients' partial sums: the widest layer with a bias is the fc (4C; the
            # lm head has none)
            "bias_scratch": (matmul.MAX_BIAS_PARTIALS * 4 * C,),
        }
        return bf16, fp32

    @staticmethod
    def input_size(B, T):
        """int32 elements of the inputs' device array (and of each pinned upload slot)."""
        return 2 * B * T + encoder.encoder_backward_scratch_size(B, T)

    def _allocate_activations(self):
        B, T = self.B, self.T
        bf16, fp32 = self.activation_shapes(self.config, B, T, self.recompute, self.attention, self.grad_accum_steps,
                                            lm_head=(self.lm_chunks, self.gelu_kept))
        self.acts = Buffers(bf16, np.uint16)
        self.acts32 = Buffers(fp32, np.float32)
        # the host's inputs, one device array filled by one copy per micro-step:
        # [tokens (B*T) | targets (B*T) | the encoder backward's packed buckets]
        BT = B * T
        self.inputs = cuda.device_array(self.input_size(B, T), dtype=np.int32)
        self.tokens = self.inputs[:BT].reshape(B, T)
        self.targets = self.inputs[BT:2 * BT].reshape(B, T)
        self.encoder_buckets = self.inputs[2 * BT:]
        self.num_buckets = None  # of the last forward with targets; None: no backward possible
        self.uploads = PinnedUploads(self.inputs.size, np.int32, self.stream)
        self.host_out = cuda.pinned_array(self.grad_accum_steps * BT + 1, dtype=np.float32)  # losses, norm
        # update_clipped's per-step AdamW values, uploaded before its (graphed) launches
        self.update_hyper = cuda.device_array(adamw.HYPER_WORDS, dtype=np.uint32)
        self.hyper_uploads = PinnedUploads(adamw.HYPER_WORDS, np.uint32, self.stream)
        self._results_ready = None  # an event after update_clipped's copies to host_out
        # zero_grad() was called and the gradients not zeroed yet: the next backward overwrites
        # them; anything else reading them zeroes them first (_zero_grads_now)
        self._grads_zero_pending = False

    def _prepare_communication(self):
        """Views of every unit (zero.Unit: what one collective moves) of the gradients and parameters,
        this rank's slices of the gradients (its share of the global norm), and under NCCL the
        second stream the backward's reductions run on."""
        tensor_start = {t.tensor: t.offset for t in self.layout.tensors}

        def unit_view(buffers, unit):
            start = buffers.offsets[unit.tensor] + unit.offset - tensor_start[unit.tensor]
            return buffers.memory[start:start + unit.size]

        self._layer_grads = [[unit_view(self.grads, u) for u in self.layout.layer_units(l)]
                             for l in range(self.config.num_layers)]
        self._non_layer_grads = [unit_view(self.grads, u) for u in self.layout.non_layer_units()]
        self._param_units = [unit_view(self.params, u) for u in self.layout.units]
        self._shard_grads = [self.grads.memory[start:start + t.count] for t in self.layout.tensors
                             for start in (self.grads.offsets[t.tensor] + t.start + s * t.stride for s in range(t.slices))]
        self.reduce_stream = self._events = None
        if self.comm.stream_ordered:
            self.reduce_stream = cuda.stream()
            self._events = [cuda.event() if SIMULATOR else cuda.event(timing=False) for _ in range(2)]

    def memory_note(self):
        """What the model's buffers take on this GPU, the optimizer state's share under -z 1."""
        mib = lambda *arrays: sum(a.nbytes for a in arrays) / 2**20  # noqa: E731
        share = (f"1/{self.layout.world_size} of the parameters, ZeRO-1" if self.layout.sharded
                 and self.layout.world_size > 1 else "all parameters")
        return (f"parameters {mib(self.params.memory):.0f} MiB, gradients {mib(self.grads.memory):.0f} MiB, "
                f"optimizer state {mib(self.master.memory, self.m.memory, self.v.memory):.0f} MiB "
                f"(fp32 master, m, v of {share}), activations {mib(self.acts.memory, self.acts32.memory):.0f} MiB"
                + (f" (lm head in {self.lm_chunks} blocks of rows, GELU kept for {self.gelu_kept} of "
                   f"{self.config.num_layers} layers)" if self.lm_chunks > 1 else ""))

    def load_parameters(self, flat_params):
        """Set every parameter from a flat float array in llm.c's order (rounded to bf16), the
        fp32 master weights (of this rank's shard) from those bf16 values (as llm.c), and reset AdamW."""
        flat_params = np.asarray(flat_params, dtype=np.float32).reshape(-1)
        if flat_params.size != self.num_parameters:
            raise ValueError(f"expected {self.num_parameters} parameters, got {flat_params.size}")
        if not self.layout.sharded:
            # fp32 up into the master weights, rounded to bf16 on the GPU (the same bits as the host's
            # to_bf16_bits: several numpy passes over every parameter on one core)
            self._upload(self.master, flat_params)
            for name, shape in self.params.shapes.items():
                adamw.round_master_weights(self.params.memory, self.master.memory, offset=self.params.offsets[name],
                                           count=math.prod(shape), state_offset=self.master.offsets[name])
        else:  # this rank's master weights are a shard: every parameter is rounded on the host
            self._upload(self.params, to_bf16_bits(flat_params))
            for t in self.layout.tensors:
                for s in range(t.slices):
                    adamw.init_master_weights(self.master.memory, self.params.memory,
                                              offset=self.params.offsets[t.tensor] + t.start + s * t.stride,
                                              count=t.count, state_offset=self.master.offsets[t.tensor] + s * t.count)
        device_memset(self.m.memory, 0, self.m.memory.nbytes)
        device_memset(self.v.memory, 0, self.v.memory.nbytes)
        self.step = 0
        cuda.synchronize()

    def _upload(self, buffers, flat):
        if flat.size == buffers.memory.size:  # no alignment gaps between the views: one copy as it is
            buffers.memory.copy_to_device(np.ascontiguousarray(flat, dtype=buffers.memory.dtype))
            return
        host = np.zeros(buffers.memory.size, dtype=buffers.memory.dtype)
        offset = 0
        for name, shape in buffers.shapes.items():
            size = math.prod(shape)
            start = buffers.offsets[name]
            host[start:start + size] = flat[offset:offset + size]
            offset += size
        buffers.memory.copy_to_device(host)

    def _download(self, buffers):
        host = buffers.memory.copy_to_host()
        return np.concatenate([host[buffers.offsets[n]:buffers.offsets[n] + math.prod(s)]
                               for n, s in buffers.shapes.items()])

    def parameters(self):
        """The bf16 parameters as one flat float32 array in llm.c's order."""
        return from_bf16_bits(self._download(self.params))

    def gradients(self):
        self._zero_grads_now()
        return from_bf16_bits(self._download(self.grads))

    def master_weights(self):
        return self._download(self.master)

    def optimizer_state(self):
        """Everything a bit-exact resume needs, as host arrays in llm.c's flat order:
        params_bf16 (uint16 bits), master, m, v (float32; this rank's shard, packed, under -z 1:
        zero.ShardLayout), AdamW's step and the stochastic-rounding base seed (with the step it
        fixes every later update's rounding)."""
        cuda.synchronize()
        return {"params_bf16": self._download(self.params), "master": self._download(self.master),
                "m": self._download(self.m), "v": self._download(self.v), "step": self.step, "seed": self.seed}

    def load_optimizer_state(self, state):
        """Restore optimizer_state()'s output exactly (bit for bit); "seed" is optional."""
        for name, dtype in (("params_bf16", np.uint16), ("master", np.float32), ("m", np.float32), ("v", np.float32)):
            n = self.num_parameters if name == "params_bf16" else self.layout.state_size
            array = np.asarray(state[name]).reshape(-1)
            if array.dtype != dtype or array.size != n:
                raise ValueError(f"optimizer state {name}: expected ({n},) {np.dtype(dtype)}, "
                                 f"got {array.shape} {array.dtype}")
        self._upload(self.params, state["params_bf16"].reshape(-1))
        self._upload(self.master, state["master"].reshape(-1))
        self._upload(self.m, state["m"].reshape(-1))
        self._upload(self.v, state["v"].reshape(-1))
        self.step = int(state["step"])
        if "seed" in state:
            self.seed = int(state["seed"])
        cuda.synchronize()

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, tokens, targets=None, micro_step=0, B=None):
        """tokens, targets: host (B,T) int arrays. With targets, losses[micro_step] gets the
        per-position losses and the logits buffer dloss * dlogits (dloss = 1/(B*T*accum)), ready
        for backward. B may be smaller than the allocated batch (sampling; no backward then).
        Returns without waiting for the GPU."""
        B = self.B if B is None else B
        tokens = self._check_tokens("tokens", tokens, B, self.config.padded_vocab_size)
        if targets is not None:
            targets = self._check_tokens("targets", targets, B, self.config.vocab_size)
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum_steps}), got {micro_step}")
        slot = self._upload_inputs(tokens, targets)
        self.num_buckets = None
        if targets is None:
            self._forward_layers(B)  # sampling: B varies, so never a graph
            return
        dloss = 1.0 / (B * self.T * self.grad_accum_steps)
        self._forward_loss(("forward", micro_step), B, self.acts32.losses[micro_step], dloss, write_dlogits=True)
        if B == self.B:
            # the encoder backward's buckets: built while the GPU runs the forward, sent from the
            # same pinned slot as the tokens
            self.num_buckets = self._upload_buckets(slot, tokens)

    def _forward_loss(self, key, B, losses, dloss, write_dlogits):
        """The forward and the fused classifier (losses[:B], and dlogits if asked) on the uploaded
        inputs; replayed as graph `key` for the full batch."""
        def queue():
            self._forward_layers(B)
            self._lm_head(B, losses[:B], dloss, write_dlogits)

        if B == self.B:
            self._replay(key, queue)
        else:
            queue()

    def _replay(self, key, queue):
        """queue()'s launches, through a CUDA graph where enabled (the same launches either way)."""
        if self.graphs is None:
            queue()
        else:
            self.graphs.run(key, queue)

    def _check_tokens(self, name, array, B, limit):
        array = np.asarray(array)  # range-checked before the int32 cast, which could wrap
        if array.shape != (B, self.T):
            raise ValueError(f"{name} must be ({B}, {self.T}), got {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= limit):
            raise ValueError(f"{name} must lie in [0, {limit}), got values in [{array.min()}, {array.max()}]")
        return np.ascontiguousarray(array, dtype=np.int32)

    def _upload_inputs(self, tokens, targets):
        """tokens (and targets) into the next pinned slot and up to self.inputs in one async copy."""
        BT, n = self.B * self.T, tokens.size
        slot = self.uploads.next_slot()
        slot[:n] = tokens.reshape(-1)
        stop = n
        if targets is not None:
            slot[BT:BT + n] = targets.reshape(-1)
            stop = BT + n
        self.uploads.send(slot, self.inputs, 0, stop)
        return slot

    def _upload_buckets(self, slot, tokens):
        packed, num_buckets = encoder.encoder_backward_pack(tokens)
        start = 2 * self.B * self.T
        slot[start:start + packed.size] = packed
        self.uploads.send(slot, self.inputs, start, start + packed.size)
        return num_buckets

    def _lm_head(self, B, losses, dloss, write_dlogits):
        """logits = lnf . wte^T and the fused classifier (losses (B,T), dlogits if asked) for the
        first B rows. Chunked (lm_head_plan), block by block of rows through the one-block logits
        buffer, and with dlogits each block's lm-head backward right away: d lnf into the 4C
        scratch (where backward() reads it; free until the last layer's fcproj backward) and wte's
        gradient summed in fp32 (written by the first block, added to by the others; backward()
        rounds it into the gradient once, as one product would)."""
        c, T, s = self.config, self.T, self.stream
        a, a32, p = self.acts, self.acts32, self.params
        if self.lm_chunks == 1:
            matmul.matmul_forward(a.logits[:B], a.lnf[:B], p.wte, stream=s)
            classifier.fused_classifier(a.logits[:B], losses, dloss, self.targets[:B], c.vocab_size,
                                        write_dlogits=write_dlogits, stream=s)
            return
        rows, C, chunk = B * T, c.channels, self.lm_chunk_rows
        lnf, dlnf = _first_rows(a.lnf, rows, C), _first_rows(a.dbt4c, rows, C)
        row_losses, row_targets = losses.reshape(rows), self.targets[:B].reshape(rows)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            logits = _first_rows(a.logits, stop - start, c.padded_vocab_size)
            matmul.matmul_forward(logits, lnf[start:stop], p.wte, stream=s)
            classifier.fused_classifier(logits, row_losses[start:stop], dloss, row_targets[start:stop], c.vocab_size,
                                        write_dlogits=write_dlogits, stream=s)
            if write_dlogits:
                matmul.matmul_backward_input(dlnf[start:stop], logits, p.wte, stream=s)
                matmul.matmul_backward_weight_fp32(a32.dwte, logits, lnf[start:stop], stream=s, accumulate=start > 0)

    def _forward_layers(self, B):
        """Encoder to the final layernorm (lnf) for the first B rows of the uploaded tokens."""
        c, T, s = self.config, self.T, self.stream
        L, C, NH = c.num_layers, c.channels, c.num_heads
        a, a32, p = self.acts, self.acts32, self.params
        encoder.encoder_forward(a.encoded[:B], self.tokens[:B], p.wte, p.wpe, stream=s)
        layernorm.layernorm_forward(a.ln1[0][:B], a32.ln1_mean[0][:B], a32.ln1_rstd[0][:B], a.encoded[:B],
                                    p.ln1w[0], p.ln1b[0], stream=s)
        scratch = a.dbt4c.reshape(-1)  # the forward's (B,T,3C) temporary (numba attention's qkv)
        for l in range(L):
            residual = a.encoded[:B] if l == 0 else a.residual3[l - 1][:B]
            if self.attention == "cudnn":
                qkv = a.qkvr[l][:B]  # kept: cuDNN's backward reads q, k, v from it
                matmul.matmul_forward(qkv, a.ln1[l][:B], p.qkvw[l], p.qkvb[l], stream=s)
                attention_cudnn.attention_forward_cudnn(a.atty[l][:B], a32.att_stats[l][:B], qkv, NH, stream=s)
            else:
                qkv = scratch[:B * T * 3 * C].reshape(B, T, 3 * C)
                matmul.matmul_forward(qkv, a.ln1[l][:B], p.qkvw[l], p.qkvb[l], stream=s)
                attention.attention_forward(a.atty[l][:B], self._qkvr(a.qkvr[l], B), a.att[l][:B], qkv, qkv, NH,
                                            stream=s)
            # the residual stream's adds happen in the projections' matmuls (cuBLASLt's C operand):
            # llm.c writes the projection, then its fused residual + layernorm reads it and the
            # residual; here the layernorm reads only their sum, one (B,T,C) pass fewer per add
            matmul.matmul_forward(a.residual2[l][:B], a.atty[l][:B], p.attprojw[l], p.attprojb[l], residual=residual,
                                  stream=s)
            layernorm.layernorm_forward(a.ln2[l][:B], a32.ln2_mean[l][:B], a32.ln2_rstd[l][:B], a.residual2[l][:B],
                                        p.ln2w[l], p.ln2b[l], stream=s)
            fch_gelu = a.fch_gelu[self._gelu_slot(l)][:B]
            if self.gelu_fusion >= 1:
                matmul.matmul_forward(fch_gelu, a.ln2[l][:B], p.fcw[l], p.fcb[l], pre_gelu=a.fch[l][:B], stream=s)
            else:
                matmul.matmul_forward(a.fch[l][:B], a.ln2[l][:B], p.fcw[l], p.fcb[l], stream=s)
                gelu.gelu_forward(fch_gelu, a.fch[l][:B], stream=s)
            matmul.matmul_forward(a.residual3[l][:B], fch_gelu, p.fcprojw[l], p.fcprojb[l], residual=a.residual2[l][:B],
                                  stream=s)
            if l + 1 < L:
                layernorm.layernorm_forward(a.ln1[l + 1][:B], a32.ln1_mean[l + 1][:B], a32.ln1_rstd[l + 1][:B],
                                            a.residual3[l][:B], p.ln1w[l + 1], p.ln1b[l + 1], stream=s)
            else:
                layernorm.layernorm_forward(a.lnf[:B], a32.lnf_mean[:B], a32.lnf_rstd[:B], a.residual3[l][:B],
                                            p.lnfw, p.lnfb, stream=s)

    def _gelu_slot(self, layer):
        """The fch_gelu buffer of a layer: its own for the top gelu_kept layers (every layer at -r
        0), the first for those below, which recompute theirs in the backward (and for the lowest
        kept layer, whose forward writes it last)."""
        return max(0, layer - (self.config.num_layers - self.gelu_kept))

    @staticmethod
    def _qkvr(qkvr_layer, B):
        """The layer's (3, B, NH, T, HS) q/k/v store as the flat 3*B*T*C array attention expects."""
        if B == qkvr_layer.shape[1]:
            return qkvr_layer.reshape(-1)
        return qkvr_layer.reshape(-1)[:3 * B * math.prod(qkvr_layer.shape[2:])]

    def _read(self, device, count):
        """device[:count] (fp32) to the host once the stream has run (a host synchronisation)."""
        host = self.host_out[:count]
        device.reshape(-1)[:count].copy_to_host(host, stream=self.stream)
        self.stream.synchronize()
        return host

    def losses(self):
        """Mean loss over the micro-steps of the last step (one host synchronisation)."""
        losses = self.acts32.losses
        return float(self._read(losses, losses.size).astype(np.float64).mean())

    def evaluate(self, tokens, targets):
        """Mean loss of one batch, without touching the gradients (one host synchronisation)."""
        return float(self.position_losses(tokens, targets).astype(np.float64).mean())

    def position_losses(self, tokens, targets):
        """Per-position losses (B, T) of one batch as a new host float32 array, without touching the
        gradients (one host synchronisation). HellaSwag scores rows by these."""
        tokens = self._check_tokens("tokens", tokens, self.B, self.config.padded_vocab_size)
        targets = self._check_tokens("targets", targets, self.B, self.config.vocab_size)
        self._upload_inputs(tokens, targets)
        self.num_buckets = None
        losses = self.acts32.losses[0]
        self._forward_loss("evaluate", self.B, losses, 1.0, write_dlogits=False)
        return self._read(losses, self.B * self.T).reshape(self.B, self.T).copy()

    def logits_host(self):
        """Host float32 logits (B, T, V) of the last forward without targets, computed from its
        lnf block by block of rows (the logits buffer holds one block when the lm head is chunked)."""
        B, T, C, V = self.B, self.T, self.config.channels, self.config.vocab_size
        rows = B * T
        lnf = _first_rows(self.acts.lnf, rows, C)
        chunk = self.lm_chunk_rows
        out = np.empty((rows, V), dtype=np.float32)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            logits = _first_rows(self.acts.logits, stop - start, self.config.padded_vocab_size)
            matmul.matmul_forward(logits, lnf[start:stop], self.params.wte, stream=self.stream)
            self.stream.synchronize()
            out[start:stop] = from_bf16_bits(logits.copy_to_host())[:, :V]
        return out.reshape(B, T, V)

    def logits_at(self, b, t):
        """Host float32 logits (V,) of row b, position t of the last forward without targets (for
        sampling): the forward stops at lnf; this row's lm head runs here."""
        C, Vp = self.config.channels, self.config.padded_vocab_size
        row = b * self.T + t
        logits = _first_rows(self.acts.logits, 1, Vp)
        lnf_row = _first_rows(self.acts.lnf, self.B * self.T, C)[row:row + 1]
        matmul.matmul_forward(logits, lnf_row, self.params.wte, stream=self.stream)
        self.stream.synchronize()
        return from_bf16_bits(logits.copy_to_host())[0, :self.config.vocab_size]

    # ---- backward -----------------------------------------------------------------------------

    def zero_grad(self):
        """The gradients read as zeros from here on. No pass over them: the next backward writes
        every gradient instead of adding to it (matmul weight gradients with beta 0, the bias and
        layernorm kernels with accumulate off: the bits of += into zeros)."""
        self._grads_zero_pending = True

    def _zero_grads_now(self):
        """Zero the gradients if zero_grad() left that to the next backward and something else reads
        them first."""
        if self._grads_zero_pending:
            device_memset(self.grads.memory, 0, self.grads.memory.nbytes, stream=self.stream)
            self._grads_zero_pending = False

    def backward(self, reduce=False):
        """Gradients of the last forward's loss, added (+=) into self.grads (written instead by the
        first backward after zero_grad(): the same values). Returns without
        waiting for the GPU (except for a host-staged reduction). reduce (the last micro-step):
        then average the gradients across the ranks, all-reduce at -z 0, reduce-scatter at -z 1
        (only this rank's slices are averaged; it updates only those); with NCCL each layer's as
        soon as its backward is done, on the reduce stream, inside the same graph."""
        if self.num_buckets is None:
            raise RuntimeError("backward() needs a forward(tokens, targets) of the full batch before it")
        reduce = reduce and self.comm.active
        overlap = reduce and self.comm.stream_ordered
        overwrite, self._grads_zero_pending = self._grads_zero_pending, False
        key = ("backward+reduce" if overlap else "backward") + (" (overwrites)" if overwrite else "")
        self._replay(key, lambda: self._backward_layers(overlap, overwrite))
        # eager: its grid is the batch's number of distinct tokens
        encoder.encoder_backward_packed(self.grads.wte, self.grads.wpe, self.acts.dresidual, self.encoder_buckets,
                                        self.num_buckets, stream=self.stream)
        if reduce:  # wte, wpe, lnfw, lnfb now (the layers' went during the backward, with NCCL)
            self._reduce_gradients(self._non_layer_grads if overlap else
                                   [v for layer in self._layer_grads for v in layer] + self._non_layer_grads,
                                   self.stream)

    def _reduce_gradients(self, views, stream):
        collective = self.comm.reduce_scatter if self.layout.sharded else self.comm.all_reduce
        with self.comm.group():
            for view in views:
                collective(view, "avg", stream=stream)

    def _reduce_layer_on_side_stream(self, layer):
        """Queue layer's gradient reduction on the reduce stream, after the work queued so far."""
        ready = self._events[0]
        ready.record(self.stream)
        ready.wait(self.reduce_stream)
        self._reduce_gradients(self._layer_grads[layer], self.reduce_stream)

    def _join_reduce_stream(self):
        done = self._events[1]
        done.record(self.reduce_stream)
        done.wait(self.stream)

    def _backward_layers(self, reduce_layers=False, overwrite=False):
        """backward() up to the encoder: lm head, the layers in reverse, d encoded in dresidual.
        reduce_layers: each layer's gradients go to the reduce stream when its backward is queued;
        the model stream waits for them at the end (a captured graph must end joined).
        overwrite: write the gradients instead of adding to them (the first backward after
        zero_grad()); wpe's, which only the encoder backward adds to, is zeroed here (T*C)."""
        c, B, T, s = self.config, self.B, self.T, self.stream
        L, C, NH = c.num_layers, c.channels, c.num_heads
        a, a32, p, g = self.acts, self.acts32, self.params, self.grads
        bias_scratch, ln_scratch = a32.bias_scratch, a32.layernorm_scratch
        device_memset(a.dresidual, 0, a.dresidual.nbytes, stream=s)  # layernorm_backward adds into it
        if overwrite:
            device_memset(g.wpe, 0, g.wpe.nbytes, stream=s)
        add = not overwrite  # wte: the lm head writes it, the encoder backward (after) adds to it
        dbt4c = a.dbt4c
        # lm head: logits = lnf . wte^T (no bias); the logits buffer holds dlogits. d lnf goes to the
        # 4C scratch (free until the last layer's fcproj backward), as llm.c
        dlnf = dbt4c.reshape(-1)[:B * T * C].reshape(B, T, C)
        if self.lm_chunks == 1:
            matmul.matmul_backward(dlnf, g.wte, None, a.logits, a.lnf, p.wte, stream=s, accumulate=add)
        else:  # the forward ran the lm head's backward block by block (_lm_head): its fp32 sums, rounded once
            matmul.add_fp32_into_bf16(g.wte, a32.dwte, stream=s, accumulate=add)
        # each layernorm backward also sums the residual gradient it leaves, per channel: the bias
        # gradient of the projection that fed the residual (fcproj's here and at ln1 of the layer
        # after, attproj's at ln2), so matmul_backward does not read the (B,T,C) gradient again for it
        layernorm.layernorm_backward(a.dresidual, g.lnfw, g.lnfb, ln_scratch, dlnf, a.residual3[L - 1],
                                     p.lnfw, a32.lnf_mean, a32.lnf_rstd, stream=s, accumulate=add,
                                     dinp_sums=g.fcprojb[L - 1])
        # the last residual is not read again this step: from here it is the (B,T,C) gradient
        # scratch (llm.c's dl_btc); the next forward rewrites it
        dbtc = a.residual3[L - 1]
        dqkv = dbt4c.reshape(-1)[:B * T * 3 * C].reshape(B, T, 3 * C)
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            fch_gelu = a.fch_gelu[self._gelu_slot(l)]
            # -r 1: the kept layers' buffers (the last layer's at least: the shared one, which
            # nothing writes between its forward and here) still hold their forward's GELU, so
            # only the layers below recompute theirs; the kept layers' fcproj weight gradients
            # read the forward's GELU, as at -r 0 (at -ge >= 1 the GELU of the fp32
            # pre-activation, not of its bf16 copy)
            if l < L - self.gelu_kept:
                gelu.gelu_forward(fch_gelu, a.fch[l], stream=s)
            # fcproj: dresidual is d residual3; with gelu_fusion 2 the DGELU epilogue gives d fch
            dgelu_epilogue = self.gelu_fusion >= 2
            # (fcproj's and attproj's bias gradients: the layernorm backwards' dinp_sums)
            matmul.matmul_backward(dbt4c, g.fcprojw[l], None, a.dresidual, fch_gelu, p.fcprojw[l],
                                   pre_gelu=a.fch[l] if dgelu_epilogue else None, dbias_scratch=bias_scratch,
                                   stream=s, accumulate=add)
            if not dgelu_epilogue:
                # the GELU's backward in place and fc's bias gradient from its output in one pass
                # (the bits of gelu_backward_inplace, then the bias kernel)
                matmul.matmul_backward_bias(g.fcb[l], dbt4c, bias_scratch, stream=s, pre_gelu=a.fch[l],
                                            accumulate=add)
            matmul.matmul_backward(dbtc, g.fcw[l], g.fcb[l] if dgelu_epilogue else None, dbt4c, a.ln2[l], p.fcw[l],
                                   dbias_scratch=bias_scratch, stream=s, accumulate=add)
            layernorm.layernorm_backward(a.dresidual, g.ln2w[l], g.ln2b[l], ln_scratch, dbtc, a.residual2[l],
                                         p.ln2w[l], a32.ln2_mean[l], a32.ln2_rstd[l], stream=s, accumulate=add,
                                         dinp_sums=g.attprojb[l])
            # dresidual is now d residual2
            matmul.matmul_backward(dbtc, g.attprojw[l], None, a.dresidual, a.atty[l], p.attprojw[l],
                                   dbias_scratch=bias_scratch, stream=s, accumulate=add)
            if self.attention == "cudnn":
                attention_cudnn.attention_backward_cudnn(dqkv, dbtc, a.qkvr[l], a.atty[l], a32.att_stats[l], NH,
                                                         stream=s)
            else:
                attention.attention_backward(dqkv, a.dqkvr.reshape(-1), a.datt, dbtc, a.qkvr[l].reshape(-1),
                                             a.att[l], NH, stream=s)
            # qkv's bias gradient: the query part summed from dqkv, the key and value parts from the
            # softmax's invariances (zeros; attproj's bias gradient, summed at ln2 above, times its weight)
            qkv_bias.qkv_bias_backward(g.qkvb[l], dqkv, g.attprojb[l], p.attprojw[l], bias_scratch, stream=s,
                                       accumulate=add, mode=self.qkv_bias_grad)
            matmul.matmul_backward(dbtc, g.qkvw[l], None, dqkv, a.ln1[l], p.qkvw[l], stream=s, accumulate=add)
            layernorm.layernorm_backward(a.dresidual, g.ln1w[l], g.ln1b[l], ln_scratch, dbtc, residual,
                                         p.ln1w[l], a32.ln1_mean[l], a32.ln1_rstd[l], stream=s, accumulate=add,
                                         dinp_sums=g.fcprojb[l - 1] if l > 0 else None)
            if reduce_layers:
                self._reduce_layer_on_side_stream(l)
        if reduce_layers:
            self._join_reduce_stream()

    # ---- update -------------------------------------------------------------------------------

    def grad_norm(self):
        """Global L2 norm of all gradients (one host synchronisation). After a -z 1 reduction each
        rank holds the averaged gradients of its slices only: the squares of those, summed over the
        ranks (as llm.c's gpt2_calculate_grad_norm)."""
        self._zero_grads_now()
        if self.layout.sharded:  # one launch per slice: replayed as one graph
            self._replay("shard norm", self._queue_norm_squared)
        else:
            self._queue_norm_squared()
        total = float(self._read(self.acts32.norm, 1)[0])
        return math.sqrt(self.comm.all_reduce_host(total, "sum") if self.layout.sharded else total)

    def _queue_norm_squared(self):
        """acts32.norm = the sum of squares of the gradients this rank holds averaged: all of them,
        or under -z 1 its slices'. (The simulator spawns a Python thread per GPU thread, and a test
        model's slices are tiny: small blocks there.)"""
        a32 = self.acts32
        if not self.layout.sharded:
            global_norm.global_norm_squared(a32.norm, a32.norm_scratch, self.grads.memory[:self._flat_size()],
                                            stream=self.stream)
        else:
            global_norm.global_norm_squared(a32.norm, a32.norm_scratch, self._shard_grads, stream=self.stream,
                                            block_size=32 if SIMULATOR else global_norm.BLOCK_SIZE)

    def _flat_size(self):
        last = list(self.grads.shapes)[-1]
        return self.grads.offsets[last] + math.prod(self.grads.shapes[last])

    def update(self, learning_rate, weight_decay=0.0, grad_scale=1.0, beta1=0.9, beta2=0.95, eps=1e-8):
        """One AdamW step; weight decay only on the 2-D tensors (WEIGHT_DECAY_PARAMETERS). Under
        -z 1 on this rank's slices, then the parameters all-gathered."""
        self._zero_grads_now()
        if self._adamw_launches is None:  # one prepared launch per tensor (all its slices), built once
            self._adamw_launches = [
                (t.tensor in WEIGHT_DECAY_PARAMETERS,
                 adamw.prepare_adamw_update(self.params.memory, self.grads.memory, self.master.memory, self.m.memory,
                                            self.v.memory, offset=self.params.offsets[t.tensor] + t.start,
                                            count=t.count, state_offset=self.master.offsets[t.tensor],
                                            slices=t.slices, stride=t.stride, state_stride=t.count))
                for t in self.layout.tensors]
        self.step += 1
        for index, (decayed, launch) in enumerate(self._adamw_launches):
            # a fresh stochastic-rounding seed per step; keyed on the element index within it
            seed = (self.seed * 1_000_003 + self.step * 7919 + index) & 0xFFFFFFFF
            launch(self.step, learning_rate, beta1, beta2, eps, weight_decay if decayed else 0.0, grad_scale, seed,
                   self.stream)
        if self.layout.sharded and self.comm.active:
            self._gather_parameters()

    def _gather_parameters(self):
        """Every rank's updated slices to every rank, on the model stream (the next forward needs
        them); a fixed sequence of NCCL calls, so replayed as one graph."""
        if self.comm.stream_ordered:
            self._replay("gather parameters", self._queue_gather_parameters)
        else:
            self._queue_gather_parameters()

    def _queue_gather_parameters(self):
        with self.comm.group():
            for view in self._param_units:
                self.comm.all_gather(view, stream=self.stream)

    # ---- update without host synchronisation --------------------------------------------------

    def update_clipped(self, learning_rate, weight_decay=0.0, grad_clip=1.0, beta1=0.9, beta2=0.95, eps=1e-8):
        """The step's end with no host synchronisation: global norm (over all ranks), clip scale
        (grad_clip / norm when the norm exceeds grad_clip > 0, computed on the GPU), AdamW over
        every tensor (this rank's slices under -z 1) in one launch, the parameters all-gathered
        under -z 1 -- replayed as one CUDA graph where graphs are on and the collectives are NCCL's
        -- then the micro-steps' losses and the norm copied to pinned memory. step_results() waits
        for them. The same bits as grad_norm() + update(learning_rate, weight_decay, grad_scale)
        with the host's clip scale."""
        self._zero_grads_now()
        if self._adamw_multi_tensor is None:
            # every slice of every tensor this rank updates; update()'s seed index is the tensor's
            ranges = [(self.params.offsets[t.tensor] + t.start + s * t.stride, t.count,
                       self.master.offsets[t.tensor] + s * t.count, t.tensor in WEIGHT_DECAY_PARAMETERS, index)
                      for index, t in enumerate(self.layout.tensors) for s in range(t.slices)]
            self._adamw_multi_tensor = adamw.prepare_adamw_multi_tensor(
                self.params.memory, self.grads.memory, self.master.memory, self.m.memory, self.v.memory, ranges)
        self.step += 1
        slot = self.hyper_uploads.next_slot()
        # update()'s per-tensor seed (self.seed * 1_000_003 + step * 7919 + index) is this base + index
        adamw.adamw_hyperparameters(self.step, learning_rate, beta1, beta2, eps, weight_decay,
                                    seed=self.seed * 1_000_003 + self.step * 7919, out=slot)
        self.hyper_uploads.send(slot, self.update_hyper, 0, adamw.HYPER_WORDS)
        if self.comm.active and not self.comm.stream_ordered:
            self._queue_update(grad_clip)  # host-staged collectives (MPI) cannot be captured
        else:
            self._replay(("update", float(grad_clip)), lambda: self._queue_update(grad_clip))
        losses = self.acts32.losses
        n = losses.size
        losses.reshape(n).copy_to_host(self.host_out[:n], stream=self.stream)
        self.acts32.norm.copy_to_host(self.host_out[n:n + 1], stream=self.stream)
        self._results_ready = self._results_ready or cuda.event()
        self._results_ready.record(self.stream)

    def _queue_update(self, grad_clip):
        a32, s = self.acts32, self.stream
        self._queue_norm_squared()
        if self.layout.sharded and self.comm.active:  # each rank has its slices' share: the job's sum
            self.comm.all_reduce(a32.norm, "sum", stream=s)
        global_norm.grad_clip_scale(a32.grad_scale, a32.norm, grad_clip, stream=s)
        self._adamw_multi_tensor(self.update_hyper, a32.grad_scale, stream=s)
        if self.layout.sharded and self.comm.active:
            self._queue_gather_parameters()

    def step_results(self):
        """(mean loss over this rank's micro-steps, global gradient norm) of the last
        update_clipped step, once the GPU has run it (the step's one host synchronisation); the
        same numbers losses() and grad_norm() give."""
        if self._results_ready is None:
            raise RuntimeError("step_results() needs an update_clipped() before it")
        self._results_ready.synchronize()
        n = self.acts32.losses.size
        return float(self.host_out[:n].astype(np.float64).mean()), math.sqrt(float(self.host_out[n]))
