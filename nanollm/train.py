"""Train GPT-2: the loop of llm.c's train_gpt2.cu, from Python.

    python -m nanollm.train -e d12 -b 64 -t 1024 -d 65536 -x 100     # llm.c's flags, --help lists them
    import nanollm; nanollm.train(nanollm.TrainConfig(model="d12", batch_size=64))

Each step: validation loss every -v steps (and HellaSwag with -h 1), a sample every -s steps, then
grad_accum micro-steps of forward + backward, the global gradient norm (clipped at --grad-clip),
the learning rate from the -k schedule, and AdamW (skipped for an outlier loss or norm with
-sl/-sg). A line per step (loss and norm with their z-scores, lr, ms, MFU, tokens/s, tokens seen,
ETA) goes to stdout and, with -o, llm.c's log format ("s:STEP trl:LOSS", "s:STEP tel:LOSS",
"s:STEP eval:ACC") to OUT/main.log.
On a GPU the model is nanollm.model.GPT2 (bf16, Numba kernels, cuBLASLt); with --device cpu (or
no GPU) it is the numpy reference in float32, for small models.

Under mpirun (or srun) every rank runs this same loop on its own window of each batch
(nanollm/distributed.py): the backends average the gradients across ranks in the last
micro-step's backward (all-reduce, or with -z 1 reduce-scatter, and the optimizer state sharded:
nanollm/zero.py), the loss, norm and val loss are the job's, and rank 0 alone prints and logs.
"""

import importlib.util
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, distributed, hellaswag, memory_plan, precompile, preemption, reference, startup, storage, zero
from .config import flops_per_token, from_descriptor, num_parameters
from .cuda_libraries import MissingCudaLibrary
from .data import DataLoader, EvalLoader, ShardError
from .gpu_info import GpuMonitor
from .mfu import mfu
from .outliers import OutlierDetector, skip_reason
from .schedulers import learning_rate
from .train_config import TrainConfig, UsageError, main_parse, validate


@dataclass
class TrainResult:
    steps: int                                        # optimizer steps taken
    train_losses: list = field(default_factory=list)  # one per step
    grad_norms: list = field(default_factory=list)    # one per step (before clipping)
    val_losses: dict = field(default_factory=dict)    # step -> val loss
    samples: dict = field(default_factory=dict)       # step -> generated text
    hellaswag: dict = field(default_factory=dict)     # step -> HellaSwag accuracy (acc_norm), with -h 1
    skipped_updates: list = field(default_factory=list)  # steps whose update -sl/-sg skipped
    log_path: str = ""                                # OUT/main.log, "" without -o
    first_step: int = 0                               # 0, or the step resumed from (-y 1)
    resumed_from: str = ""                            # the checkpoint resumed from, "" if none
    checkpoints: list = field(default_factory=list)   # checkpoint files written (-n), in order
    tokens_per_second: float = 0.0                    # median over the steps after the first
    ms_per_step: float = 0.0
    device: str = ""
    memory_plan: str = ""                             # the plan's table (--plan: all that was done)

    @property
    def final_train_loss(self):
        return self.train_losses[-1] if self.train_losses else None

    @property
    def final_val_loss(self):
        return self.val_losses[max(self.val_losses)] if self.val_losses else None


# ---- the two back ends: the same five calls ---------------------------------------------------

class GpuBackend:
    """nanollm.model.GPT2: bf16 on the GPU."""

    def __init__(self, config, cfg, grad_accum, init_params=None, comm=None, layout=None):
        from numba import cuda

        from . import cuda_libraries
        from .model import GPT2

        cublaslt_path = cuda_libraries.load("cublasLt")  # a clear error naming the package if missing
        gelu_fusion = cfg.gelu_fusion
        # -1: 2 on sm_90 and newer, as llm.c's code comments intend (its main() sets 0 for now, f1e2ace);
        # on an H200 nanollm's d12 step ran the same at -ge 0, 1 and 2 (benchmarks/RESULTS.md)
        if gelu_fusion == -1:
            gelu_fusion = 2 if cuda.get_current_device().compute_capability >= (9, 0) else 0
        self.model = GPT2(config, cfg.batch_size, cfg.seq_len, seed=cfg.seed, gelu_fusion=gelu_fusion,
                          recompute=cfg.recompute, grad_accum_steps=grad_accum, attention=cfg.attention,
                          cuda_graphs=None if cfg.cuda_graphs else False,  # 1: where supported
                          parameters=init_params,  # None: GPT-2's initialisation from the seed
                          comm=comm, layout=layout)
        self.comm = self.model.comm
        device = cuda.get_current_device()
        name = getattr(device, "name", "CUDA simulator")  # the simulator's device has no name or id
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self.placement = f"GPU {getattr(device, 'id', 0)} ({self.device_name})"
        try:  # for -lg: NVML finds the GPU by its PCI address
            self.pci_bus_id = "{pci_domain_id:04x}:{pci_bus_id:02x}:{pci_device_id:02x}.0".format(
                **device.get_device_identity())
        except Exception:  # an attribute the driver will not give: NVML's device 0, as llm.c
            self.pci_bus_id = None
        free, total = cuda.current_context().get_memory_info()
        self.description = (f"{self.device_name}, {(total - free) / 2**30:.1f} GiB in use after allocation "
                            f"({self.model.memory_note()}); cuBLASLt: {cublaslt_path}; "
                            f"attention: {self.model.attention_note}; "
                            f"CUDA graphs {'on' if self.model.graphs else 'off'}")

    def train_micro_step(self, x, y, micro_step):
        self.model.forward(x, y, micro_step)
        # the last micro-step's backward also averages the gradients across the ranks
        self.model.backward(reduce=micro_step == self.model.grad_accum_steps - 1)

    def zero_grad(self):
        self.model.zero_grad()

    def step_loss(self):
        return self.comm.all_reduce_host(self.model.losses(), "avg")

    def grad_norm(self):
        return self.model.grad_norm()

    def update(self, lr, weight_decay, grad_scale):
        self.model.update(lr, weight_decay=weight_decay, grad_scale=grad_scale)

    def update_clipped(self, lr, weight_decay, grad_clip):
        self.model.update_clipped(lr, weight_decay=weight_decay, grad_clip=grad_clip)

    def step_results(self):
        loss, norm = self.model.step_results()  # the norm is the job's already
        return self.comm.all_reduce_host(loss, "avg"), norm

    def evaluate(self, x, y):
        return self.model.evaluate(x, y)

    def position_losses(self, x, y):
        return self.model.position_losses(x, y)

    def next_token_logits(self, context):
        """Logits (V,) for the token after `context` (a list of ids), from a B=1 forward."""
        T = self.model.T
        window = context[-T:]
        tokens = np.full((1, T), window[-1], dtype=np.int32)
        tokens[0, :len(window)] = window
        self.model.forward(tokens, B=1)
        return self.model.logits_at(0, len(window) - 1)

    def synchronize(self):
        from numba import cuda

        cuda.synchronize()

    def optimizer_state(self):
        return self.model.optimizer_state()

    @property
    def state_layout(self):
        """The slicing load_optimizer_state takes: this rank's shard."""
        return self.model.layout

    def load_optimizer_state(self, state):
        self.model.load_optimizer_state(state)

    def close(self):
        """Destroy the CUDA graphs: those of a multi-rank step hold NCCL work, so they go before the
        communicator does."""
        if self.model.graphs is not None:
            self.model.graphs.clear()


class CpuBackend:
    """The numpy reference model in float32: exact, slow, for small models without a GPU."""

    def __init__(self, config, cfg, grad_accum, init_params=None, comm=None, layout=None):
        self.config = config
        self.grad_accum = grad_accum
        self.seed = cfg.seed
        self.comm = comm or distributed.SingleProcess(distributed.World())
        self.layout = layout or zero.ShardLayout(config)
        if init_params is None:
            self.params = reference.init_parameters(config, cfg.seed, np.float32)
        else:
            self.params = reference.ParameterTensors(config, np.float32)
            self.params.memory[:] = init_params
        self.grads = reference.ParameterTensors(config, np.float32)
        # AdamW's moments for this rank's shard (all parameters unless -z 1 over several ranks)
        self.m = np.zeros(self.layout.state_size, np.float32)
        self.v = np.zeros(self.layout.state_size, np.float32)
        self.step = 0
        self.losses = []
        self.norm = None  # of the last update_clipped
        self.device_name = self.placement = "CPU"
        self.description = (f"CPU, numpy float32 reference model ({self.params.memory.nbytes / 2**20:.0f} MiB of "
                            f"parameters, {2 * self.m.nbytes / 2**20:.0f} MiB of AdamW state)")

    def zero_grad(self):
        self.grads.zero()
        self.losses = []

    def train_micro_step(self, x, y, micro_step):
        _, loss, acts = reference.gpt2_forward(self.params, self.config, x, y)
        reference.gpt2_backward(self.grads, self.params, self.config, acts, dloss=1.0 / self.grad_accum)
        self.losses.append(loss)
        if micro_step == self.grad_accum - 1:
            zero.reduce_gradients(self.layout, self.grads.memory, self.comm)

    def step_loss(self):
        return self.comm.all_reduce_host(float(np.mean(self.losses)), "avg")

    def grad_norm(self):
        if not self.layout.sharded:  # every rank holds every averaged gradient
            return reference.gpt2_grad_norm(self.grads)
        return math.sqrt(self.comm.all_reduce_host(zero.shard_sum_of_squares(self.layout, self.grads.memory)))

    def update(self, lr, weight_decay, grad_scale):
        self.step += 1
        zero.adamw_update_shard(self.layout, self.params.memory, self.grads.memory, self.m, self.v, self.step, lr,
                                weight_decay=weight_decay, grad_scale=grad_scale)
        zero.gather_parameters(self.layout, self.params.memory, self.comm)

    def update_clipped(self, lr, weight_decay, grad_clip):
        self.norm = self.grad_norm()
        self.update(lr, weight_decay, reference.grad_clip_scale(self.norm, grad_clip))

    def step_results(self):
        return self.step_loss(), self.norm

    def evaluate(self, x, y):
        return reference.gpt2_forward(self.params, self.config, x, y)[1]

    def position_losses(self, x, y):
        return reference.gpt2_forward(self.params, self.config, x, y)[2].losses

    def next_token_logits(self, context):
        window = np.asarray(context[-self.config.max_seq_len:], dtype=np.int64)[None, :]
        logits, _, _ = reference.gpt2_forward(self.params, self.config, window)
        return logits[0, -1, :self.config.vocab_size]

    def synchronize(self):
        pass

    def close(self):
        pass

    def optimizer_state(self):
        """As GPT2.optimizer_state: the float32 parameters are the master weights (this rank's
        shard of them, packed, under -z 1); params_bf16 is their round-to-nearest bf16 image (what
        a GPU resuming from this file would hold)."""
        from .kernels.bf16 import to_bf16_bits

        return {"params_bf16": to_bf16_bits(self.params.memory), "master": self.layout.pack(self.params.memory),
                "m": self.m.copy(), "v": self.v.copy(), "step": self.step, "seed": self.seed}

    # load_optimizer_state takes the whole state, every shard's: under -z 1 each rank's float32
    # parameters outside its shard are the other ranks' master weights (the GPU's are bf16)
    state_layout = None

    def load_optimizer_state(self, state):
        """A whole (flat-order) optimizer state, as checkpoint.load_checkpoint(path) returns; this
        rank keeps its shard of m and v."""
        n = self.params.memory.size
        for name in ("master", "m", "v"):
            array = np.asarray(state[name]).reshape(-1)
            if array.dtype != np.float32 or array.size != n:
                raise ValueError(f"optimizer state {name}: expected ({n},) float32, got {array.shape} {array.dtype}")
        self.params.memory[:] = state["master"].reshape(-1)
        self.m[:] = self.layout.pack(state["m"])
        self.v[:] = self.layout.pack(state["v"])
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def gpu_available():
    """A real CUDA GPU (the simulator, which tests use, does not count)."""
    try:
        from numba import cuda
        from numba.core import config as numba_config

        return not numba_config.ENABLE_CUDASIM and bool(cuda.is_available())
    except Exception:  # no driver or toolkit: no GPU
        return False


def _choose_device(cfg):
    if cfg.device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if cfg.device == "cuda":
        raise UsageError("--device cuda: no CUDA GPU is available (numba.cuda.is_available() is False)")
    return "cpu"


# ---- sampling ----------------------------------------------------------------------------------

def sample(backend, tokenizer, num_tokens, rng):
    """Generate num_tokens after <|endoftext|>, sampling from the softmax (temperature 1), as llm.c."""
    context = [tokenizer.eot_token]
    for _ in range(num_tokens):
        logits = backend.next_token_logits(context).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        context.append(int(rng.choice(len(probs), p=probs)))
    return tokenizer.decode(context[1:])


# ---- the loop ----------------------------------------------------------------------------------

class Logger:
    """stdout, and llm.c's main.log in the output directory (appending, as llm.c with -y 1).
    quiet (ranks other than 0): neither."""

    def __init__(self, output_dir, append=False, storage_errors="stop", quiet=False):
        self.path = ""
        self.file = None
        self.storage_errors = storage_errors
        self.quiet = quiet
        if output_dir and not quiet:
            if os.path.exists(output_dir) and not os.path.isdir(output_dir):
                raise UsageError(f"-o {output_dir}: exists and is not a directory")
            self.path = os.path.join(output_dir, "main.log")
            try:
                os.makedirs(output_dir, exist_ok=True)
                self.file = open(self.path, "a" if append else "w")
            except OSError as error:
                raise UsageError(f"-o {output_dir}: cannot write {self.path}: {storage.reason(error)}") from None

    def print(self, text):
        if not self.quiet:
            print(text, flush=True)

    def record(self, line):
        if self.file:
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError as error:  # disk full, ...: --storage-errors says what next
                self.close()
                fault = storage.log_write_error(self.path, error)
                if self.storage_errors != "continue":
                    raise fault from None
                self.print(f"warning: {fault}; --storage-errors continue: training on without main.log")

    def close(self):
        if self.file:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError:  # its last buffered line could not be written: already reported
                pass


# bad settings, data or installation, or a run that cannot fit or save: a clear message and exit
# code 2, as for a bad flag
BAD_INPUT = (UsageError, FileNotFoundError, ShardError, checkpoint.CheckpointError, storage.StorageError,
             MissingCudaLibrary)


def train(cfg=None, **overrides):
    """Train as `python -m nanollm.train` would with the same settings; returns a TrainResult.
    cfg: a TrainConfig (default: llm.c's defaults); keyword arguments override its fields.
    Under mpirun, every rank calls this; an exception in any rank ends the whole job."""
    cfg = cfg or TrainConfig()
    if overrides:
        cfg = TrainConfig(**{**cfg.__dict__, **overrides})
    validate(cfg)
    world = distributed.init_world()
    try:
        return _train(cfg, world)
    except preemption.Interrupted as stop:
        # a stop after the step: every rank stops at the same step and exits on its own; a second
        # signal's immediate stop may hit one rank only, which must not leave the others waiting
        if world.size == 1 or not stop.immediate:
            raise
        distributed.abort_job(world, stop, stop.exit_status)
    except BaseException as error:
        if world.size == 1:
            raise
        distributed.abort_job(world, error, 2 if isinstance(error, BAD_INPUT) else 1)


def _train(cfg, world):
    start_time = time.perf_counter()
    startup.mark("python start-up and imports, to train()")
    startup.time_numba_kernels()
    world.check_same_settings(cfg.__dict__)  # before anything is read or allocated
    config, init_params = _model_config(cfg)
    B, T = cfg.batch_size, cfg.seq_len
    if T > config.max_seq_len:
        raise UsageError(f"-t {T} exceeds the model's context of {config.max_seq_len}")
    world_size, rank = world.size, world.rank
    if cfg.plan and cfg.plan_ranks:  # --plan --plan-ranks N: rank 0 of a job of N processes, on paper
        world_size, rank = cfg.plan_ranks, 0
    tokens_per_micro_step = B * T * world_size
    total_batch = cfg.total_batch_size if cfg.total_batch_size != -1 else tokens_per_micro_step
    if total_batch % tokens_per_micro_step:
        raise UsageError(f"-d {total_batch} must be a multiple of B*T*processes = {tokens_per_micro_step}")
    grad_accum = total_batch // tokens_per_micro_step
    layout = zero.ShardLayout(config, world_size, rank, cfg.zero_stage)  # -z 1: N must divide every tensor
    if cfg.plan:  # --plan: the arithmetic only, no data or GPU needed
        return TrainResult(steps=0, memory_plan=memory_plan.print_plan(cfg, config, grad_accum, world_size,
                                                                       gpu_available()))

    train_loader = DataLoader(cfg.input_bin, B, T, rank, world_size, shuffle=True, seed=cfg.seed)
    try:
        val_loader = EvalLoader(cfg.input_val_bin, B, T, rank, world_size, max_batches=cfg.val_max_steps) \
            if cfg.val_loss_every > 0 else None
    except ShardError as error:  # a small val split: a val batch is one window of all ranks' B*T
        raise ShardError(f"-j: {error}; -v 0 turns validation off") from None
    max_steps = cfg.max_steps if cfg.max_steps != -1 else max(1, train_loader.num_tokens // total_batch)
    hellaswag_path, hellaswag_examples = _hellaswag_examples(cfg, config) if cfg.hellaswag else (None, None)

    device = _choose_device(cfg)
    # each rank takes its local rank's GPU before any other CUDA call
    gpu_index, gpus_on_host = distributed.select_gpu(world)[:2] if device == "cuda" else (0, 0)
    comm = distributed.make_communicator(world, cfg.comm, device, gpus_on_host)
    # llm.c appends to main.log with -y 1
    log = Logger(cfg.output_dir, append=bool(cfg.resume), storage_errors=cfg.storage_errors, quiet=rank > 0)
    if device == "cpu" and cfg.device == "auto":
        log.print("No CUDA GPU found: training on the CPU with the numpy reference model (slow; small models only).")
    startup.mark("model config, data loaders")
    if device == "cuda":  # a machine's first run: the kernels compile in parallel, not one by one at first launch
        precompile.before_training(world, gpu_index, print=log.print, attention=cfg.attention)
        startup.mark("kernel cache check (and, when cold, compilation in parallel processes)")
    # before anything large is allocated: print what the run needs, refuse one that does not fit
    plan = memory_plan.check(cfg, config, device, grad_accum, world_size, print=log.print,
                             attention=memory_plan.resolve_attention(cfg.attention) if device == "cuda" else None)
    backend = (GpuBackend if device == "cuda" else CpuBackend)(config, cfg, grad_accum, init_params, comm, layout)
    placements = world.allgather(backend.placement)
    from .tokenizer import get_tokenizer

    tokenizer = get_tokenizer() if cfg.sample_every > 0 and rank == 0 else None
    sample_rng = np.random.default_rng(1337)
    start_step, resumed = 0, None
    if cfg.resume:
        resumed = checkpoint.latest_checkpoint(cfg.output_dir, backend.state_layout, warn=log.print,
                                               agree=comm.all_gather_object if world_size > 1 else None)
        found = checkpoint.list_checkpoints(cfg.output_dir)
        if resumed is None and found:  # starting over would silently throw away the run
            raise checkpoint.CheckpointError(
                f"-y 1: none of the {len(found)} checkpoint(s) in {cfg.output_dir} can be used (newest: "
                f"{found[-1][1]}; the warnings above say why); move them away to start from step 0")
        if resumed is None:
            log.print(f"-y 1: no checkpoint in {cfg.output_dir}; starting from step 0")
        else:
            start_step = _resume(resumed, cfg, config, backend, train_loader, sample_rng, log)
            if cfg.overfit_single_batch:  # the one batch: the first a fresh loader serves
                first = DataLoader(cfg.input_bin, B, T, rank, world_size, shuffle=True, seed=cfg.seed)
                train_loader.inputs, train_loader.targets = first.next_batch()
    step_flops = flops_per_token(config, T) * total_batch

    log.print(f"model {cfg.model}: L={config.num_layers} C={config.channels} NH={config.num_heads} "
              f"V={config.vocab_size} (padded {config.padded_vocab_size}), {num_parameters(config):,} parameters")
    log.print(f"device: {backend.description}")
    if comm.active or comm.name == "nccl":
        staged = " (through the host)" if comm.name == "mpi" and device == "cuda" else ""
        staged += f" ({comm.library})" if comm.name == "nccl" else ""
        log.print(f"{distributed.describe_ranks(world, placements)}; communicator: {comm.name}{staged}"
                  + (f"; {layout.describe()}" if layout.describe() else ""))
    log.print(f"B={B} T={T} total batch {total_batch:,} tokens, grad accumulation {grad_accum}, {max_steps} steps; "
              f"train {train_loader.num_tokens:,} tokens in {len(train_loader.files)} shard(s)"
              + (f", val {len(val_loader)} batch(es)" if val_loader else ""))
    if hellaswag_examples:
        log.print(f"HellaSwag: {len(hellaswag_examples):,} examples from {hellaswag_path}, {B // 4} per batch")
    gpu_monitor = _gpu_monitor(cfg, device, backend, log)
    loss_outliers, norm_outliers = OutlierDetector(), OutlierDetector()

    result = TrainResult(steps=start_step, log_path=log.path, device=backend.device_name, first_step=start_step,
                         resumed_from=resumed.path if resumed else "", memory_plan=plan.table())
    step_times = []
    eta_origin = None  # (time, step) at the end of the first timed step: the ETA's clock starts there
    # SIGTERM, SIGINT, SIGUSR1: stop after the step, with a checkpoint; every rank at the same step
    agree = (lambda flag: comm.all_reduce_host(flag, "max")) if world_size > 1 else None
    stop = preemption.StopSignals(agree=agree).install()
    try:
        for step in range(start_step, max_steps + 1):
            last = step == max_steps
            resuming = resumed is not None and step == start_step
            stopping = 0 if last else stop.stop_now()  # the one place a stop is decided (all ranks alike)
            if val_loader is not None and not stopping and (step % cfg.val_loss_every == 0 or last):
                # each rank's windows of the same val batches, averaged over the ranks
                val_loss = float(np.mean([backend.evaluate(x, y) for x, y in val_loader]))
                val_loss = comm.all_reduce_host(val_loss, "avg")
                result.val_losses[step] = val_loss
                log.print(f"val loss {val_loss:.6f}")
                log.record(f"s:{step} tel:{val_loss:.6f}")
            # llm.c: HellaSwag with the val loss, but not at step 0
            if hellaswag_examples and ((cfg.val_loss_every > 0 and step > 0 and step % cfg.val_loss_every == 0)
                                       or last):
                t_eval = time.perf_counter()
                # each rank scores its share of the examples; the counts are summed over the ranks
                hs = hellaswag.evaluate(backend.position_losses, hellaswag_examples, B, T, rank, world_size,
                                        sum_counts=lambda counts: comm.all_reduce_host(counts, "sum"))
                result.hellaswag[step] = hs.accuracy
                log.print(f"HellaSwag: {hs.correct}/{hs.total} = {hs.accuracy:f} ({time.perf_counter() - t_eval:.1f} s)")
                log.record(f"s:{step} eval:{hs.accuracy:.4f}")
            # on resume, this step's sample was drawn before the save (its generator state is saved)
            if cfg.sample_every > 0 and step > 0 and (step % cfg.sample_every == 0 or last) and not resuming \
                    and rank == 0:  # as llm.c: rank 0 samples, from its full copy of the parameters
                text = sample(backend, tokenizer, cfg.gen_tokens, sample_rng)
                result.samples[step] = text
                log.print(f"generating:\n---\n{text}\n---")
            saved = ""
            if (cfg.checkpoint_every > 0 and (step % cfg.checkpoint_every == 0 or last)
                    or stopping and cfg.output_dir) and not resuming and step > 0:
                saved = _save(step, cfg, config, backend, train_loader, sample_rng, log, comm, layout)
                if saved:
                    result.checkpoints.append(saved)
            if stopping:
                text = preemption.stop_message(stopping, step, saved, cfg.output_dir, resuming)
                log.print(text)
                raise preemption.Interrupted(stopping, step, saved, message=text)
            if last:
                break
            backend.synchronize()
            if step == start_step:
                startup.mark("before the first step: tokenizer, val loss, resume")
            t0 = time.perf_counter()
            backend.zero_grad()
            for micro_step in range(grad_accum):
                if cfg.overfit_single_batch and step > 0:
                    x, y = train_loader.inputs, train_loader.targets
                else:
                    x, y = train_loader.next_batch()
                backend.train_micro_step(x, y, micro_step)
            lr = learning_rate(cfg.lr_scheduler, step, cfg.learning_rate, cfg.warmup_iters, max_steps,
                               cfg.final_lr_frac)
            skip = None
            if cfg.skip_update_lossz or cfg.skip_update_gradz:
                # -sl/-sg decide on the host, from this step's loss and norm, whether to update at all
                norm = backend.grad_norm()  # synchronises
                loss = backend.step_loss()
                zloss, zgrad = loss_outliers.update(loss), norm_outliers.update(norm)
                skip = skip_reason(loss, zloss, norm, zgrad, cfg.skip_update_lossz, cfg.skip_update_gradz)
                if skip:
                    log.print(f"skipping update due to {skip}")
                    result.skipped_updates.append(step)
                else:
                    backend.update(lr, cfg.weight_decay, reference.grad_clip_scale(norm, cfg.grad_clip))
                backend.synchronize()  # the step's time includes the update
            else:
                # global norm, clipping and AdamW queued with no host synchronisation (the clip scale is
                # computed on the GPU); then the step's one wait, for its loss and norm
                backend.update_clipped(lr, cfg.weight_decay, cfg.grad_clip)
                loss, norm = backend.step_results()
                zloss, zgrad = loss_outliers.update(loss), norm_outliers.update(norm)
            dt = time.perf_counter() - t0
            if step == 0:
                log.print(f"time to first step: {time.perf_counter() - start_time:.1f} s (start-up, compilation, step 0)")
            if startup.ENABLED and step - start_step < 2:  # where the start-up went
                startup.mark("first step (eager: first launches)" if step == start_step else
                             "second step (captures the CUDA graphs on a GPU)", backend.synchronize)
                if step > start_step or step + 1 == max_steps:
                    log.print(startup.report())
            step_times.append(dt)
            result.train_losses.append(loss)
            result.grad_norms.append(norm)
            result.steps = step + 1
            tokens_per_second = total_batch / dt
            utilisation = mfu(step_flops / world_size, dt, backend.device_name)  # per GPU
            mfu_text = f"{100 * utilisation:.1f}% bf16 MFU" if utilisation is not None else "MFU n/a"
            # ETA: the mean wall time per step since the first one (which compiles), evaluations included
            now = time.perf_counter()
            if eta_origin is None:
                eta_origin, per_step = (now, step + 1), dt
            else:
                per_step = (now - eta_origin[0]) / (step + 1 - eta_origin[1])
            log.print(f"step {step + 1:4d}/{max_steps} | loss {loss:.6f} ({zloss:+.2f}z)| norm {norm:.4f} ({zgrad:+.2f}z)"
                      f"| lr {lr:.2e} | {dt * 1e3:.2f} ms | {mfu_text} | {tokens_per_second:,.0f} tok/s | "
                      f"{_count((step + 1) * total_batch)} tokens | ETA {_duration(per_step * (max_steps - step - 1))}")
            if gpu_monitor and (step + 1) % cfg.log_gpu_every == 0:
                log.print(gpu_monitor.line())
            log.record(f"s:{step} trl:{loss:.6f}")
            if not math.isfinite(loss) and not skip:
                raise FloatingPointError(f"step {step + 1}: the loss is {loss}; stopping "
                                         "(-sl Z skips the update of a non-finite loss instead)")
    finally:
        stop.restore()
        log.close()
    backend.close()
    comm.close()
    steady = sorted(step_times[1:] or step_times)
    if steady:
        result.ms_per_step = 1e3 * steady[len(steady) // 2]
        result.tokens_per_second = total_batch / (result.ms_per_step / 1e3)
        log.print(f"median over steps 2..{len(step_times)}: {result.ms_per_step:.2f} ms/step, "
                  f"{result.tokens_per_second:,.0f} tok/s")
    return result


def _count(n):
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _duration(seconds):
    """seconds -> '1h05m', '3m20s', '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# llm.c reads dev/data/hellaswag/hellaswag_val.bin; python -m nanollm.prepare hellaswag writes data/
HELLASWAG_PATHS = ("data/hellaswag_val.bin", "dev/data/hellaswag/hellaswag_val.bin")


def _hellaswag_examples(cfg, config):
    """-h 1: (path, examples), checked against B, T and the vocabulary before anything is allocated."""
    path = cfg.hellaswag_data or next((p for p in HELLASWAG_PATHS if os.path.isfile(p)), None)
    if path is None:
        raise UsageError(f"-h 1: no HellaSwag file at {' or '.join(HELLASWAG_PATHS)}: make one with "
                         "python -m nanollm.prepare hellaswag hellaswag_val.jsonl, or name one with --hellaswag-data")
    try:
        examples = hellaswag.load_examples(path)
    except hellaswag.HellaSwagError as error:
        raise UsageError(f"-h 1: {error}") from None
    try:
        hellaswag.check_fits(examples, cfg.batch_size, cfg.seq_len, config.vocab_size)
    except hellaswag.HellaSwagError as error:
        raise UsageError(f"-h 1: {path}: {error} (-b {cfg.batch_size} -t {cfg.seq_len})") from None
    return path, examples


def _gpu_monitor(cfg, device, backend, log):
    """-lg N: NVML on the training GPU, or None (said once) where there is none to ask."""
    if cfg.log_gpu_every <= 0:
        return None
    monitor = GpuMonitor(backend.pci_bus_id) if device == "cuda" else None
    reason = "training on the CPU" if monitor is None else monitor.error
    if reason:
        log.print(f"-lg {cfg.log_gpu_every}: no GPU information ({reason}); training goes on without it")
        return None
    return monitor


# ---- model files and checkpoints --------------------------------------------------------------------

def _model_config(cfg):
    """-e: a descriptor dN (fresh GPT-2 init) or an llm.c model file (its weights)."""
    if not cfg.model.endswith(".bin"):
        try:
            return from_descriptor(cfg.model), None
        except ValueError as error:  # d0, gpt3, ...
            raise UsageError(f"-e {cfg.model}: {error}") from None
    if importlib.util.find_spec(f"{__package__}.interop") is None:
        raise UsageError(f"-e {cfg.model}: loading llm.c model files is not supported yet (use a descriptor like d12)")
    from .interop import read_llmc_model

    try:
        config, params = read_llmc_model(cfg.model)
    except FileNotFoundError:
        raise UsageError(f"-e {cfg.model}: no such model file") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"-e: {error}") from None
    return config, params


def _save(step, cfg, config, backend, train_loader, sample_rng, log, comm, layout):
    """Write the step's checkpoint; returns its path, or "" if storage failed under
    --storage-errors continue (under stop: storage.StorageError). Every rank calls this. -z 1 over
    several ranks: each writes its shard (save_sharded_checkpoint); otherwise every rank holds the
    whole state and rank 0 writes it."""
    state = backend.optimizer_state()
    ckpt = checkpoint.Checkpoint(
        step=step, model_config=config, params_bf16=state["params_bf16"], master=state["master"], m=state["m"],
        v=state["v"], adamw_step=state["step"], seed=state["seed"], sampling_rng=sample_rng.bit_generator.state,
        loader_state=train_loader.state(), train_config=dict(cfg.__dict__))
    t0 = time.perf_counter()
    path = checkpoint.checkpoint_path(cfg.output_dir, step)
    try:
        if layout.sharded and comm.size > 1:
            checkpoint.save_sharded_checkpoint(path, ckpt, layout, comm)
        else:
            if comm.rank == 0:
                checkpoint.save_checkpoint(path, ckpt)
            comm.barrier()  # the checkpoint is complete when any rank goes on
    except OSError as error:  # disk full, unwritable folder, ...: the atomic save left no partial file
        fault = storage.checkpoint_write_error(path, error, checkpoint.list_checkpoints(cfg.output_dir))
        # several ranks would have to agree to go on without this checkpoint: they stop (the job ends)
        if cfg.storage_errors != "continue" or comm.size > 1:
            raise fault from None
        log.print(f"warning: {fault}; --storage-errors continue: training on")
        return ""
    if comm.rank == 0:
        shards = f" + {comm.size - 1} shard file(s)" if layout.sharded and comm.size > 1 else ""
        log.print(f"saved checkpoint {path} ({os.path.getsize(path) / 2**20:.1f} MiB{shards}, "
                  f"{time.perf_counter() - t0:.2f} s)")
        try:
            for old in checkpoint.prune_checkpoints(cfg.output_dir, cfg.checkpoints_keep, cfg.major_checkpoint_every):
                log.print(f"deleted checkpoint {old} (-nk {cfg.checkpoints_keep})")
        except OSError as error:  # an old checkpoint left behind costs space, not the run
            log.print(f"warning: -nk {cfg.checkpoints_keep}: cannot delete an old checkpoint: {error}")
    return path


# What a resumed run must share with the checkpoint: the model's shape (checked here) and the
# data (T, seed, shards; B too unless the number of ranks changed: DataLoader.load_state checks
# them). Everything else (-x, -l, -n, -v, ...) may change between runs, as in llm.c; a changed
# setting is reported. Another number of ranks or -z re-slices the optimizer state.
NOTED_ON_RESUME = ("total_batch_size", "learning_rate", "lr_scheduler", "warmup_iters", "final_lr_frac",
                   "weight_decay", "max_steps", "grad_clip", "input_bin")


def _resume(ckpt, cfg, config, backend, train_loader, sample_rng, log):
    if ckpt.model_config != config:
        raise checkpoint.CheckpointError(
            f"{ckpt.path}: /model/@config: the checkpoint holds {ckpt.model_config}, but -e {cfg.model} is {config}")
    try:
        skipped = train_loader.load_state(ckpt.loader_state)
    except (ValueError, KeyError, TypeError) as error:
        raise checkpoint.CheckpointError(f"{ckpt.path}: /data/train_loader/@state: {error}") from None
    try:
        sample_rng.bit_generator.state = ckpt.sampling_rng
    except (ValueError, KeyError, TypeError) as error:
        raise checkpoint.CheckpointError(f"{ckpt.path}: /rng/@sampling: {error}") from None
    backend.load_optimizer_state(ckpt.optimizer_state())
    changed = [f"{name} {ckpt.train_config[name]!r} -> {getattr(cfg, name)!r}" for name in NOTED_ON_RESUME
               if name in ckpt.train_config and ckpt.train_config[name] != getattr(cfg, name)]
    ranks = ckpt.loader_state.get("world_size", 1)
    if ranks != train_loader.world_size or ckpt.train_config.get("zero_stage", 0) != cfg.zero_stage:
        changed.append(f"{ranks} rank(s) at -z {ckpt.train_config.get('zero_stage', 0)} -> {train_loader.world_size} "
                       f"at -z {cfg.zero_stage}: optimizer state re-sliced")
    if skipped:
        changed.append(f"B*processes {ckpt.loader_state['B'] * ranks} -> {train_loader.B * train_loader.world_size}: "
                       f"the data go on from the next shard")
    log.print(f"resuming from {ckpt.path} at step {ckpt.step}" + (f" (changed: {'; '.join(changed)})" if changed else ""))
    return ckpt.step


def main(argv=None):
    cfg = main_parse(argv)
    try:
        train(cfg)
    except BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except preemption.Interrupted as stop:
        if stop.immediate:
            newest = checkpoint.list_checkpoints(cfg.output_dir)
            print(f"{stop}; " + (f"the newest complete checkpoint is {newest[-1][1]}" if newest else
                                 "no checkpoint was written"), file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except Exception as error:  # the plan said it fits, but an allocation failed all the same
        if not memory_plan.out_of_memory(error):
            raise
        print(f"error: -b {cfg.batch_size}: out of memory although the memory plan fitted ({type(error).__name__}: "
              f"{error}); try a smaller -b with the same -d, or -r 1", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handlers (start-up)
        print("interrupted during start-up", file=sys.stderr)
        raise SystemExit(128 + 2) from None


class _CallableModule(types.ModuleType):
    """`nanollm.train` is both this module (python -m nanollm.train) and, called, the function:
    import nanollm; nanollm.train(cfg)."""

    def __call__(self, cfg=None, **overrides):
        return train(cfg, **overrides)


if __name__ == "__main__":
    main()
else:
    sys.modules[__name__].__class__ = _CallableModule
