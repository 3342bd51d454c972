"""The memory plan: what a training run will need, from its flags alone, before anything is allocated.

llm.c prints its allocations as it makes them and a run that asked for too much dies in cudaMalloc;
nanollm adds it all up first, prints it as a short table, and refuses (exit 2) a run that would not
fit, saying how much is needed and free, the largest -b that fits and which flags need less.

    python -m nanollm.train -e d48 -b 16 -t 1024 --plan                 # the GPU path, no GPU needed
    python -m nanollm.train -e d2 -b 64 -t 1024 --device cpu --plan     # the CPU path's host memory

GPU path (nanollm.model.GPT2), device memory:
- parameters and gradients (bf16), fp32 master weights, AdamW m and v: Buffers.layout of
  config.parameter_shapes, as GPT2 allocates them. ZeRO-1 (-z 1) over N GPUs keeps 1/N of the
  master weights, m and v per GPU (llm.c's ZeRO-1 shards those three; parameters and gradients
  stay whole).
- activations: GPT2.activation_shapes, the same shape table the model allocates from (B, T, -r,
  the attention path; the GELU fusion -ge changes launches, not buffers), and the inputs' array.
- cuBLASLt's workspace (kernels.matmul.WORKSPACE_BYTES) and cuDNN attention's: the cuDNN figure
  is an estimate (its deterministic backward keeps an fp32 dQ partial per 128-key tile; 1.5 GiB
  at d12, B=64, T=1024, as benchmarks/RESULTS.md records), the real size known only once cuDNN
  has built its graphs.
- the CUDA context, the kernel modules and the library handles: constants (CUDA_CONTEXT_BYTES,
  RUNTIME_BYTES); benchmarks/memory_plan_check.py measures them on a GPU.
Host: the pinned upload and read-back buffers are shown (not counted); the GPU path's other host
memory (a checkpoint's downloaded copies) is not planned.

CPU path (the numpy reference model, nanollm.reference, float32), host memory: parameters,
gradients, AdamW m and v, the interpreter with its libraries, and the largest of three phases
(tests/test_memory_plan.py checks each against tracemalloc's peak): a training step (every
activation gpt2_forward keeps for gpt2_backward, the (B,T,Vp) logits and (B,T,V) probabilities,
and the largest temporaries alive at once); the AdamW update's temporaries; a checkpoint save's
copies (with -o).
"""

import math
from dataclasses import dataclass, field

from .config import num_parameters, parameter_shapes
from .train_config import UsageError

GiB = 2**30
MiB = 2**20

# What the arithmetic cannot derive. The GPU constants are estimates from benchmarks/RESULTS.md's
# H100 runs (d12, B=64: 24.7 GiB in use after allocation with cuDNN, 43.0 GiB with llm.c's
# attention, 28.9 GiB with -r 0 -- each 0.5-0.6 GiB above the buffers counted here);
# benchmarks/memory_plan_check.py measures them on a GPU (the context alone, and all after a step).
CUDA_CONTEXT_BYTES = 512 * MiB      # the CUDA context (total - free once Numba has created it)
RUNTIME_BYTES = 256 * MiB           # kernel modules, cuBLASLt and cuDNN handles, CUDA graphs
NCCL_BYTES = 256 * MiB              # NCCL's buffers with several GPUs (a guess: not measured yet)
CUDNN_KEY_TILE = 128                # keys per tile of cuDNN's deterministic flash backward
NORM_SCRATCH = 4096                 # global_norm_scratch_size(): 528 on an H100 SXM; an upper bound
# the CPU path's interpreter with numpy, numba (imported by checkpoint saves), h5py and the tokenizer:
# a d1 run (53 MiB of state) with -n and -s peaked at 334 MiB resident, one without them at 168 MiB
CPU_INTERPRETER_BYTES = 256 * MiB


@dataclass
class Item:
    name: str
    nbytes: int
    note: str = ""
    counted: bool = True  # False: shown, not in the total (host memory of the GPU path, ...)


@dataclass
class Plan:
    device: str                 # "cuda" (device memory) or "cpu" (host memory)
    what: str                   # one line: the model and the flags planned for
    items: list = field(default_factory=list)
    already_in_use: int = 0     # of the total, what exists before the model is built (the CUDA context)

    @property
    def total(self):
        return sum(item.nbytes for item in self.items if item.counted)

    def item(self, name):
        return next(item for item in self.items if item.name == name)

    def table(self, free=None, free_source=""):
        where = "GPU memory" if self.device == "cuda" else "host memory"
        lines = [f"memory plan ({where}): {self.what}"]
        width = max(len(item.name) for item in self.items)
        for item in self.items:
            mark = " " if item.counted else "("  # (shown, not counted)
            lines.append(f"  {mark}{item.name:<{width}} {_size(item.nbytes):>10}{')' if not item.counted else ' '}"
                         f"  {item.note}".rstrip())
        lines.append(f"   {'total':<{width}} {_size(self.total):>10}")
        if free is not None:
            verdict = "fits" if self.fits(free) else "does NOT fit"
            lines.append(f"   {'free now':<{width}} {_size(free):>10}   {free_source}: {verdict}")
        return "\n".join(lines)

    def fits(self, free):
        """free: what is free now (the CUDA context, if any, already took its share)."""
        return self.total - self.already_in_use <= free


def _size(nbytes):
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= 0.1 * GiB else f"{nbytes / MiB:.1f} MiB"


# ---- the GPU path -----------------------------------------------------------------------------------

def cudnn_workspace_bytes(config, B, T):
    """An estimate of cuDNN flash attention's workspace (forward and backward graphs share the
    largest): fp32 dQ partials, one (B, NH, T, HS) per tile of CUDNN_KEY_TILE keys."""
    return B * config.num_heads * T * config.head_size * 4 * math.ceil(T / CUDNN_KEY_TILE)


def gpu_plan(config, B, T, grad_accum=1, recompute=1, attention="cudnn", world_size=1, zero_stage=0,
             what=""):
    """Device memory of nanollm.model.GPT2 at micro-batch (B, T) on each of world_size GPUs.
    attention: "cudnn" or "numba" (resolve "auto" first)."""
    import numpy as np

    from .kernels.adamw import HYPER_WORDS
    from .kernels.matmul import WORKSPACE_BYTES
    from .model import GPT2, Buffers

    if attention not in ("cudnn", "numba"):
        raise ValueError(f"attention must be cudnn or numba, got {attention!r}")
    shapes = parameter_shapes(config)
    n = Buffers.layout(shapes, np.uint16)[1]            # elements, with alignment padding
    n32 = Buffers.layout(shapes, np.float32)[1]
    shards = world_size if zero_stage >= 1 else 1
    n_shard = math.ceil(n32 / shards)
    bf16, fp32 = GPT2.activation_shapes(config, B, T, recompute, attention, grad_accum, NORM_SCRATCH)
    acts16 = 2 * Buffers.layout(bf16, np.uint16)[1]
    acts32 = 4 * Buffers.layout(fp32, np.float32)[1]
    largest = sorted(((2 * math.prod(s), k) for k, s in bf16.items()), reverse=True)[:2]
    inputs = 4 * (GPT2.input_size(B, T) + HYPER_WORDS)  # the step's host inputs, and AdamW's step values
    sharded = f", 1/{shards} each (-z 1)" if shards > 1 else ""
    plan = Plan("cuda", what or f"B={B} T={T}", already_in_use=CUDA_CONTEXT_BYTES)
    plan.items += [
        Item("parameters (bf16)", 2 * n, f"{num_parameters(config):,} parameters"),
        Item("gradients (bf16)", 2 * n),
        Item("master weights (fp32)", 4 * n_shard, sharded.lstrip(", ")),
        Item("AdamW m, v (fp32)", 8 * n_shard, sharded.lstrip(", ")),
        Item("activations", acts16 + acts32,
             f"-r {recompute}, {attention} attention; largest: " + ", ".join(f"{k} {_size(b)}" for b, k in largest)),
        Item("inputs (int32)", inputs, "tokens, targets, encoder buckets, AdamW's step values"),
        Item("cuBLASLt workspace", WORKSPACE_BYTES),
    ]
    if attention == "cudnn":
        plan.items.append(Item("cuDNN workspace", cudnn_workspace_bytes(config, B, T), "estimate"))
    if world_size > 1:
        plan.items.append(Item("NCCL buffers", NCCL_BYTES, "estimate"))
    plan.items += [
        Item("CUDA context", CUDA_CONTEXT_BYTES, "estimate"),
        Item("kernels, handles, graphs", RUNTIME_BYTES, "estimate"),
        # two upload slots of the inputs, the losses and norm coming back
        Item("pinned host buffers", 2 * inputs + 4 * (grad_accum * B * T + 1),
             "host memory, not in the total", counted=False),
    ]
    return plan


# ---- the CPU path -----------------------------------------------------------------------------------

def cpu_plan(config, B, T, grad_accum=1, saves=True, what=""):
    """Host memory of the CPU path (CpuBackend: nanollm.reference in float32) at (B, T): the state,
    and the largest of what a training step, the AdamW update or (saves: with -o) a checkpoint save
    add to it."""
    f32 = 4
    n = num_parameters(config)
    L, C, NH, V, Vp = (config.num_layers, config.channels, config.num_heads, config.vocab_size,
                       config.padded_vocab_size)
    BT = B * T
    att = B * NH * T * T
    # ActivationTensors: per layer residual, ln1, qkv (3), atty, residual2, ln2, fch (4), fch_gelu (4)
    # = 16 (B,T,C), four (B,T) layernorm statistics and the (B,NH,T,T) attention weights; then the
    # last residual, lnf and its statistics, the losses
    kept = f32 * (L * (16 * BT * C + 4 * BT + att) + 2 * BT * C + 3 * BT)
    logits = f32 * (BT * Vp + BT * V)   # the logits (held by the caller through the backward) and probs
    # the largest temporaries alive at once, besides the above: the classifier backward's copy of
    # the probabilities and its scaled result (2 (B,T,V)); later, the (B,T,V) dlogits with a
    # layer's attention backward (3 (B,NH,T,T), the MLP's gradients and its own: ~16 (B,T,C)) or
    # its GELU backward (~8 (B,T,4C))
    work = f32 * max(2 * BT * V, BT * V + max(3 * att + 16 * BT * C, 32 * BT * C))
    # between steps, with the activations gone: AdamW's expression temporaries, ~6 of the largest
    # tensor (the stacked fcw at depth, else wte), or the grad norm's float64 squares (4 of them)
    largest = max(math.prod(shape) for shape in parameter_shapes(config).values())
    update = 6 * f32 * largest
    # a checkpoint save: optimizer_state()'s copies of master, m, v and the bf16 image, which
    # to_bf16_bits rounds through uint64 temporaries: 32 bytes a parameter at its peak (tracemalloc)
    save = 32 * n
    phases = {"step": kept + logits + work, "update": update, "save": save if saves else 0}
    peak = max(phases, key=phases.get)
    plan = Plan("cpu", what or f"B={B} T={T}")
    plan.items += [
        Item("parameters, gradients (fp32)", 2 * f32 * n, f"{n:,} parameters"),
        Item("AdamW m, v (fp32)", 2 * f32 * n),
        Item("activations kept for backward", kept, f"{L} layers, attention weights {_size(f32 * att)} each",
             counted=peak == "step"),
        Item("logits and probabilities", logits, "(B,T,Vp) + (B,T,V) float32", counted=peak == "step"),
        Item("largest temporaries", work, "classifier / attention backward", counted=peak == "step"),
        Item("AdamW update temporaries", update, "between steps", counted=peak == "update"),
        Item("checkpoint copies", save, "between steps" if saves else "none: no -o", counted=peak == "save"),
        Item("Python and libraries", CPU_INTERPRETER_BYTES, "numpy, numba, h5py, the tokenizer"),
    ]
    return plan


# ---- from a TrainConfig ------------------------------------------------------------------------------

def plan_for(cfg, config, device, grad_accum, world_size=1, attention=None, B=None):
    """The plan of a TrainConfig on device "cuda" or "cpu". attention: the resolved path for
    "auto" (default: cudnn). B: another micro-batch than cfg's (to search for one that fits)."""
    B = cfg.batch_size if B is None else B
    T = cfg.seq_len
    what = f"-e {cfg.model} -b {B} -t {T}, grad accumulation {grad_accum}"
    if device == "cpu":
        return cpu_plan(config, B, T, grad_accum, saves=bool(cfg.output_dir), what=what)
    attention = attention or (cfg.attention if cfg.attention != "auto" else "cudnn")
    what += f", -r {cfg.recompute}, --attention {attention}" + (
        f", {world_size} GPUs, -z {cfg.zero_stage}" if world_size > 1 else "")
    return gpu_plan(config, B, T, grad_accum, cfg.recompute, attention, world_size, cfg.zero_stage, what=what)


def resolve_attention(requested):
    """The attention path GPT2 will take on this GPU: "auto" is cuDNN where it loads."""
    if requested != "auto":
        return requested
    from .kernels import attention_cudnn

    return "cudnn" if attention_cudnn.is_available()[0] else "numba"


def host_available_bytes():
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_free_bytes():
    """Free memory on the current GPU (creates Numba's CUDA context if there is none yet)."""
    from numba import cuda

    return int(cuda.current_context().get_memory_info()[0])


def advice(cfg, config, device, grad_accum, world_size, free, attention=None):
    """What to change when the plan does not fit in `free` bytes: the largest -b that fits (and
    one that keeps the total batch through accumulation), and the flags that need less."""
    T, N = cfg.seq_len, world_size
    total_batch = cfg.total_batch_size if cfg.total_batch_size != -1 else cfg.batch_size * T * N

    def plan_b(B, **changes):
        c = cfg if not changes else type(cfg)(**{**cfg.__dict__, **changes})
        return plan_for(c, config, device, max(1, total_batch // (B * T * N)), N, changes.get("attention", attention), B)

    fitting = [B for B in range(cfg.batch_size - 1, 0, -1) if plan_b(B).fits(free)]
    parts = []
    if fitting:
        best = fitting[0]
        keeps = next((B for B in fitting if (total_batch // (T * N)) % B == 0 and total_batch % (T * N) == 0), None)
        parts.append(f"the largest -b that fits is {best}")
        if keeps:
            parts.append(f"-b {keeps} -d {total_batch} keeps the total batch of {total_batch:,} tokens through "
                         f"{total_batch // (keeps * T * N)}-step gradient accumulation")
    else:
        parts.append("even -b 1 does not fit")
    need = plan_b(cfg.batch_size).total
    if device == "cuda":
        if cfg.recompute == 0:
            parts.append(f"-r 1 needs {_size(need - plan_b(cfg.batch_size, recompute=1).total)} less")
        if (attention or cfg.attention) == "numba":
            parts.append(f"--attention cudnn needs {_size(need - plan_b(cfg.batch_size, attention='cudnn').total)} less")
        if cfg.zero_stage == 0:
            state = plan_b(cfg.batch_size)
            optimizer = state.item("master weights (fp32)").nbytes + state.item("AdamW m, v (fp32)").nbytes
            parts.append(f"-z 1 over N GPUs divides the {_size(optimizer)} of master weights and AdamW state by N")
    else:
        parts.append("a smaller -t, or a GPU (the CPU path keeps fp32 logits for all of B*T)")
    return "; ".join(parts)


class MemoryPlanError(UsageError):
    """The run does not fit: the message says by how much and what to change (exit code 2)."""


def free_memory(device):
    """(free bytes or None if unknown, where the figure comes from) for device "cuda" or "cpu"."""
    if device == "cuda":
        return gpu_free_bytes(), "free on the GPU"
    return host_available_bytes(), "MemAvailable"


def check(cfg, config, device, grad_accum, world_size=1, attention=None, print=print):
    """Print the plan; raise MemoryPlanError if it does not fit in the free memory (GPU: Numba's
    get_memory_info; CPU: MemAvailable). Returns the plan."""
    plan = plan_for(cfg, config, device, grad_accum, world_size, attention)
    free, source = free_memory(device)
    print(plan.table(free, source))
    if free is not None and not plan.fits(free):
        if device == "cuda":
            need = (f"the run needs {_size(plan.total)} of GPU memory, {_size(plan.total - plan.already_in_use)} "
                    f"beyond the CUDA context, but {_size(free)} is free")
        else:
            need = f"the run needs {_size(plan.total)} of host memory but {_size(free)} is available (MemAvailable)"
        raise MemoryPlanError(f"-b {cfg.batch_size}: {need}; "
                              f"{advice(cfg, config, device, grad_accum, world_size, free, attention)}")
    return plan


def out_of_memory(error):
    """Is this exception an allocation failure (numpy's MemoryError, CUDA_ERROR_OUT_OF_MEMORY)?"""
    if isinstance(error, MemoryError):
        return True
    try:
        return type(error).__name__ == "CudaAPIError" and int(error.code) == 2  # CUDA_ERROR_OUT_OF_MEMORY
    except (AttributeError, TypeError, ValueError):
        return False


def print_plan(cfg, config, grad_accum, world_size, gpu_here):
    """--plan: print the plan of the GPU path (the CPU path with --device cpu) and whether it fits
    here; no data read, nothing allocated. gpu_here: a real GPU is present. Returns the table."""
    device = "cpu" if cfg.device == "cpu" else "cuda"
    free, source = free_memory(device) if device == "cpu" or gpu_here else (None, "")
    attention = resolve_attention(cfg.attention) if device == "cuda" and gpu_here else None
    plan = plan_for(cfg, config, device, grad_accum, world_size, attention)
    table = plan.table(free, source)
    print(table)
    if free is None and device == "cuda":
        print("(no GPU here: the arithmetic alone; --device cpu plans the CPU path)")
    elif free is not None and not plan.fits(free):
        print(f"to fit: {advice(cfg, config, device, grad_accum, world_size, free, attention)}")
    return table
