"""The memory plan against what is really allocated: every device and pinned allocation GPT2
makes (simulator), the CPU path's numpy peak (tracemalloc), ZeRO-1's arithmetic, the advice when a
run does not fit, and --plan. benchmarks/memory_plan_check.py compares the GPU plan with a GPU."""

import math
import tracemalloc

import numpy as np
import pytest

import nanollm
from nanollm import memory_plan
from nanollm.config import GPT2Config, from_descriptor, num_parameters
from nanollm.train_config import TrainConfig

train_module = nanollm.train

SMALL = GPT2Config(max_seq_len=16, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=16)
BUFFERS = ("parameters (bf16)", "gradients (bf16)", "master weights (fp32)", "AdamW m, v (fp32)", "activations",
           "inputs (int32)")


@pytest.mark.parametrize("recompute, grad_accum", [(1, 1), (0, 3)])
def test_gpu_plan_counts_every_allocation_of_the_model(monkeypatch, recompute, grad_accum):
    from numba import cuda

    from nanollm.kernels import global_norm
    from nanollm.model import GPT2

    device, pinned = [], []
    device_array, pinned_array = cuda.device_array, cuda.pinned_array

    def count(record, allocate):
        def allocation(shape, dtype=np.float64, *args, **kwargs):
            record.append(math.prod(np.atleast_1d(shape)) * np.dtype(dtype).itemsize)
            return allocate(shape, dtype, *args, **kwargs)
        return allocation

    monkeypatch.setattr(cuda, "device_array", count(device, device_array))
    monkeypatch.setattr(cuda, "pinned_array", count(pinned, pinned_array))
    monkeypatch.setattr(memory_plan, "NORM_SCRATCH", global_norm.global_norm_scratch_size())
    B, T = 2, 8
    GPT2(SMALL, B, T, recompute=recompute, grad_accum_steps=grad_accum, attention="numba", cuda_graphs=False)
    plan = memory_plan.gpu_plan(SMALL, B, T, grad_accum, recompute, "numba")
    assert sum(device) == sum(plan.item(name).nbytes for name in BUFFERS)
    assert sum(pinned) == plan.item("pinned host buffers").nbytes


def test_gpu_plan_attention_and_recompute_arithmetic(monkeypatch):
    from nanollm import model

    c, B, T = from_descriptor("d12"), 64, 1024
    cudnn = memory_plan.gpu_plan(c, B, T, attention="cudnn")
    numba = memory_plan.gpu_plan(c, B, T, attention="numba")
    keep_gelu = memory_plan.gpu_plan(c, B, T, recompute=0, attention="cudnn")
    L, C, NH = c.num_layers, c.channels, c.num_heads
    # -r 0 keeps L GELU outputs instead of one; llm.c's attention keeps (L,B,NH,T,T) weights and
    # (B,NH,T,T) + (3,B,NH,T,HS) backward scratch, cuDNN (L,B,NH,T) fp32 statistics and a workspace.
    # -r 1 at d12 B=64 runs the lm head in 4 blocks of rows (GPT2.lm_head_plan): a quarter of the
    # (B*T, Vp) logits, an fp32 (Vp, C) wte gradient, and so room for all L GELU outputs again
    Vp = c.padded_vocab_size
    assert keep_gelu.total - cudnn.total == 2 * (B * T - B * T // 4) * Vp - 4 * Vp * C
    monkeypatch.setattr(model, "LM_HEAD_CHUNKS", 1)  # the lm head whole: llm.c's -r 1, one GELU buffer
    assert keep_gelu.total - memory_plan.gpu_plan(c, B, T, attention="cudnn").total == 2 * (L - 1) * B * T * 4 * C
    acts = lambda plan: plan.item("activations").nbytes
    assert acts(numba) - acts(cudnn) == 2 * ((L + 1) * B * NH * T * T + 3 * B * T * C) - 4 * L * B * NH * T
    assert "cuDNN workspace" not in [item.name for item in numba.items]


def test_zero_1_divides_master_weights_and_adamw_state():
    c = from_descriptor("d12")
    one = memory_plan.gpu_plan(c, 4, 1024)
    eight = memory_plan.gpu_plan(c, 4, 1024, world_size=8, zero_stage=1)
    unsharded = memory_plan.gpu_plan(c, 4, 1024, world_size=8, zero_stage=0)
    for name in ("master weights (fp32)", "AdamW m, v (fp32)"):
        assert eight.item(name).nbytes == pytest.approx(one.item(name).nbytes / 8, abs=64)
        assert unsharded.item(name).nbytes == one.item(name).nbytes
    for name in ("parameters (bf16)", "gradients (bf16)", "activations"):  # ZeRO-1 keeps these whole
        assert eight.item(name).nbytes == one.item(name).nbytes
    assert eight.item("NCCL buffers").nbytes == memory_plan.NCCL_BYTES


@pytest.mark.parametrize("config, B, T, saves, peak_phase", [
    (from_descriptor("d1"), 4, 64, False, "logits and probabilities"),  # the classifier's (B,T,V) arrays
    (GPT2Config(max_seq_len=128, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=4, channels=32), 2, 128,
     False, "activations kept for backward"),                          # the (B,NH,T,T) attention weights
    (GPT2Config(max_seq_len=16, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=128), 4, 16,
     False, "AdamW update temporaries"),
    (from_descriptor("d1"), 2, 64, True, "checkpoint copies"),
], ids=["vocabulary", "attention", "update", "save"])
def test_cpu_plan_matches_the_numpy_peak(config, B, T, saves, peak_phase, tmp_path):
    """The CPU path's plan (less the interpreter) vs tracemalloc's peak over a whole step (forward,
    backward, grad norm, AdamW) and, with saves, a checkpoint save; each case peaks in another phase."""
    from nanollm import checkpoint
    from nanollm.train import CpuBackend

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, config.vocab_size, (2, B, T))
    tracemalloc.start()
    try:
        backend = CpuBackend(config, TrainConfig(), 1)
        backend.zero_grad()
        backend.train_micro_step(x, y, 0)
        backend.update(1e-3, 0.1, 1.0 / max(1.0, backend.grad_norm()))
        if saves:
            state = backend.optimizer_state()
            checkpoint.save_checkpoint(tmp_path / "checkpoint_00000001.h5", checkpoint.Checkpoint(
                step=1, model_config=config, params_bf16=state["params_bf16"], master=state["master"], m=state["m"],
                v=state["v"], sampling_rng={}, loader_state={}))
            del state
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    plan = memory_plan.cpu_plan(config, B, T, saves=saves)
    assert plan.item(peak_phase).counted
    planned = plan.total - memory_plan.CPU_INTERPRETER_BYTES
    assert 0.98 * peak <= planned <= 1.05 * peak, (planned, peak)


def _cfg(**fields):
    return TrainConfig(**{"model": "d12", "batch_size": 8, "seq_len": 1024, **fields})


def test_advice_names_the_largest_batch_and_the_flags_that_help():
    cfg, c = _cfg(recompute=0, attention="numba"), from_descriptor("d12")
    fits_5 = memory_plan.plan_for(cfg, c, "cuda", 1, B=5)
    free = fits_5.total - fits_5.already_in_use
    text = memory_plan.advice(cfg, c, "cuda", 1, 1, free, "numba")
    assert text.startswith("the largest -b that fits is 5; -b 4 -d 8192 keeps the total batch of 8,192 tokens "
                           "through 2-step gradient accumulation")
    assert "-r 1 needs" in text and "--attention cudnn needs" in text and "-z 1 over N GPUs divides" in text
    assert memory_plan.advice(cfg, c, "cuda", 1, 1, 1, "numba").startswith("even -b 1 does not fit")


def test_check_refuses_a_run_that_does_not_fit(monkeypatch):
    cfg, c = _cfg(model="d2", batch_size=64), from_descriptor("d2")
    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: 8 * 2**30)
    printed = []
    with pytest.raises(memory_plan.MemoryPlanError, match=r"^-b 64: the run needs 51\.\d\d GiB of host memory but "
                                                          r"8\.00 GiB is available"):
        memory_plan.check(cfg, c, "cpu", 1, print=printed.append)
    assert "does NOT fit" in printed[0]
    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: 64 * 2**30)
    assert memory_plan.check(cfg, c, "cpu", 1, print=printed.append).total < 64 * 2**30


def test_plan_flag_prints_and_exits_0_without_data_or_gpu(capsys, monkeypatch):
    train_module.main(["-e", "d48", "-b", "16", "-t", "1024", "-r", "0", "-i", "/nonexistent/*.bin", "--plan"])
    out = capsys.readouterr().out
    assert "memory plan (GPU memory): -e d48 -b 16 -t 1024" in out and "1,557,686,400 parameters" in out
    assert "(no GPU here: the arithmetic alone" in out
    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: 16 * 2**30)
    result = nanollm.train(model="d2", batch_size=64, seq_len=1024, device="cpu", plan=1)
    out = capsys.readouterr().out
    assert result.steps == 0 and result.memory_plan in out and "MemAvailable: does NOT fit" in out
    assert "to fit: the largest -b that fits is" in out


def test_plan_ranks_sizes_one_rank_of_a_bigger_job(capsys):
    """llm.c's 1.5B run (-z 1 on 8 GPUs), planned from one process: the optimizer state is 1/8, the
    gradient accumulation that of 8 processes, and the same plan as gpu_plan's at world size 8."""
    result = nanollm.train(model="d48", batch_size=16, seq_len=1024, total_batch_size=1048576, recompute=0,
                           zero_stage=1, plan=1, plan_ranks=8, attention="cudnn")
    out = capsys.readouterr().out
    assert "grad accumulation 8," in out and "8 GPUs, -z 1" in out and "1/8 each (-z 1)" in out
    c = from_descriptor("d48")
    expected = memory_plan.gpu_plan(c, 16, 1024, 8, 0, "cudnn", world_size=8, zero_stage=1).total
    total = [line for line in result.memory_plan.splitlines() if line.strip().startswith("total")]
    assert total and total[0].split()[1] == f"{expected / 2**30:.2f}", (total, expected)
    one_rank = memory_plan.gpu_plan(c, 16, 1024, 64, 0, "cudnn").total
    # one process keeps all the fp32 master weights, m and v, a rank of 8 an eighth plus NCCL's buffers;
    # the one process also keeps 64 micro-steps' losses (B*T fp32 each) where a rank keeps 8
    saved = 7 / 8 * 3 * 4 * num_parameters(c) - memory_plan.NCCL_BYTES + (64 - 8) * 16 * 1024 * 4
    assert (one_rank - expected) == saved, (one_rank - expected, saved)
