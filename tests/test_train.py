"""The training loop end to end on the CPU path (numpy reference model), the Python API and the
command line's errors."""

import subprocess
import sys

import numpy as np
import pytest

import nanollm
from nanollm.data import write_shard


@pytest.fixture
def shards(tmp_path, rng):
    # a repetitive token stream, so a few steps can lower the loss
    pattern = rng.integers(0, 500, 64)
    write_shard(tmp_path / "tiny_train_000000.bin", np.tile(pattern, 200).astype(np.uint16))
    write_shard(tmp_path / "tiny_val_000000.bin", np.tile(pattern, 20).astype(np.uint16))
    return tmp_path


def test_train_api_on_cpu(shards, tmp_path):
    cfg = nanollm.TrainConfig(input_bin=str(shards / "tiny_train_*.bin"), input_val_bin=str(shards / "tiny_val_*.bin"),
                              model="d1", batch_size=2, seq_len=16, max_steps=6, val_loss_every=3, val_max_steps=2,
                              sample_every=6, gen_tokens=4, learning_rate=3e-3, device="cpu",
                              output_dir=str(tmp_path / "out"))
    result = nanollm.train(cfg)
    assert result.steps == 6 and len(result.train_losses) == 6
    assert sorted(result.val_losses) == [0, 3, 6]
    assert result.final_val_loss < result.val_losses[0]
    assert isinstance(result.samples[6], str)
    log = open(result.log_path).read().splitlines()
    assert log[0] == f"s:0 tel:{result.val_losses[0]:.6f}"
    assert f"s:5 trl:{result.train_losses[-1]:.6f}" in log


def test_gradient_accumulation_steps(shards):
    result = nanollm.train(input_bin=str(shards / "tiny_train_*.bin"), input_val_bin=str(shards / "tiny_val_*.bin"),
                           model="d1", batch_size=2, seq_len=16, total_batch_size=64, max_steps=2,
                           val_loss_every=0, sample_every=0, device="cpu")
    assert result.steps == 2 and np.isfinite(result.train_losses).all()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nanollm.train", *args], capture_output=True, text=True, timeout=120)


def test_command_line_missing_data_exits_2():
    proc = _run("-i", "/nonexistent/x_train_*.bin", "--device", "cpu")
    assert proc.returncode == 2
    assert "no file matches the pattern '/nonexistent/x_train_*.bin'" in proc.stderr


def test_command_line_bad_batch_arithmetic_exits_2(shards):
    proc = _run("-i", str(shards / "tiny_train_*.bin"), "-j", str(shards / "tiny_val_*.bin"), "-e", "d1",
                "-b", "2", "-t", "16", "-d", "50", "--device", "cpu")
    assert proc.returncode == 2
    assert "-d 50 must be a multiple of B*T*processes = 32" in proc.stderr
