"""Preemption: a stop signal finishes the step, writes a checkpoint, exits 128 + signal, and -y 1
resumes bit for bit; a second signal stops at once and leaves the last complete checkpoint alone.
End to end on the CPU path (a real `python -m nanollm.train` process, a real SIGTERM)."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import nanollm
from nanollm import checkpoint, preemption
from nanollm.data import write_shard

from .test_checkpoint import _same_state  # the whole training state, bit for bit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shards(tmp_path, rng):
    pattern = rng.integers(0, 500, 64)
    write_shard(tmp_path / "tiny_train_000000.bin", np.tile(pattern, 40).astype(np.uint16))
    write_shard(tmp_path / "tiny_val_000000.bin", np.tile(pattern, 4).astype(np.uint16))
    return tmp_path


def _args(shards, out, steps):
    # -k constant: the learning rate does not depend on -x, so runs of different lengths agree
    return ["-i", str(shards / "tiny_train_*.bin"), "-j", str(shards / "tiny_val_*.bin"), "-e", "d1", "-b", "2",
            "-t", "16", "-x", str(steps), "-v", "2", "-m", "1", "-s", "3", "-g", "2", "-k", "constant",
            "-l", "3e-3", "-c", "0.1", "--device", "cpu", "-o", str(out)]


def _cfg(shards, out, steps, **overrides):
    fields = dict(input_bin=str(shards / "tiny_train_*.bin"), input_val_bin=str(shards / "tiny_val_*.bin"),
                  model="d1", batch_size=2, seq_len=16, max_steps=steps, val_loss_every=2, val_max_steps=1,
                  sample_every=3, gen_tokens=2, lr_scheduler="constant", learning_rate=3e-3, weight_decay=0.1,
                  device="cpu", output_dir=str(out))
    fields.update(overrides)
    return nanollm.TrainConfig(**fields)


def test_sigterm_writes_a_checkpoint_and_resume_is_bit_exact(shards, tmp_path):
    """A run of 500 steps gets SIGTERM once step 2 is printed: it finishes its step, writes a
    checkpoint, says so and exits 143. Resumed to step k+3 it matches a straight k+3-step run."""
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "nanollm.train", *_args(shards, out, 500)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(150, proc.kill)  # a hung run fails the test instead of hanging CI
    timer.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step    2/"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout = "".join(lines) + proc.stdout.read()
    stderr = proc.stderr.read()
    proc.wait()
    timer.cancel()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM: finishing this step" in stderr and "Traceback" not in stderr
    (k, path), = checkpoint.list_checkpoints(out)
    assert 2 <= k < 500
    assert f"stopped by SIGTERM after step {k}: checkpoint {path} written; resume with -y 1" in stdout
    assert checkpoint.load_checkpoint(path).step == k
    assert sorted(os.listdir(out)) == [os.path.basename(path), "main.log"]  # no temp file left

    steps = k + 3  # covers a val loss (-v 2) and a sample (-s 3) after the resume
    resumed = nanollm.train(_cfg(shards, out, steps, checkpoint_every=steps, resume=1))
    straight = nanollm.train(_cfg(shards, tmp_path / "straight", steps, checkpoint_every=steps))
    assert resumed.first_step == k and resumed.train_losses == straight.train_losses[k:]
    assert {s: v for s, v in straight.val_losses.items() if s >= k} == resumed.val_losses
    assert {s: t for s, t in straight.samples.items() if s > k} == resumed.samples
    _same_state(out / f"checkpoint_{steps:08d}.h5", tmp_path / "straight" / f"checkpoint_{steps:08d}.h5")


SECOND_SIGNAL_RUN = """
import os, signal, sys
from nanollm import checkpoint, train
calls = {"micro": 0, "datasets": 0}
micro_step = train.CpuBackend.train_micro_step
def micro(self, *args):
    calls["micro"] += 1
    if calls["micro"] == 3:  # during step 3: the first signal
        os.kill(os.getpid(), signal.SIGTERM)
    return micro_step(self, *args)
train.CpuBackend.train_micro_step = micro
dataset = checkpoint._dataset
def second(*args, **kwargs):
    calls["datasets"] += 1
    if calls["datasets"] == 6:  # the preemption checkpoint's second dataset: the second signal
        os.kill(os.getpid(), signal.SIGTERM)
    return dataset(*args, **kwargs)
checkpoint._dataset = second
train.main(sys.argv[1:])
"""


def test_second_signal_mid_save_stops_at_once_and_keeps_the_last_checkpoint(shards, tmp_path):
    out = tmp_path / "out"
    args = _args(shards, out, 50) + ["-n", "2", "-s", "0"]
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_RUN, *args], capture_output=True, text=True,
                          timeout=150, cwd=ROOT)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr
    last = str(out / "checkpoint_00000002.h5")
    assert f"stopped at once by a second signal (SIGTERM); the newest complete checkpoint is {last}" in proc.stderr
    assert sorted(os.listdir(out)) == ["checkpoint_00000002.h5", "main.log"]  # the step-3 save left nothing
    assert checkpoint.latest_checkpoint(out).path == last


def test_stop_signals_flag_agreement_and_restore():
    previous = signal.getsignal(signal.SIGUSR1)
    with preemption.StopSignals() as stop:
        assert stop.installed and stop.stop_now() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.stop_now() == signal.SIGUSR1
        with pytest.raises(preemption.Interrupted) as second:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs as the call returns
        assert second.value.immediate and second.value.exit_status == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous

    # several ranks: one that got no signal stops too when the all-reduce (max) says another did
    other_rank = {"flag": signal.SIGTERM}
    quiet = preemption.StopSignals(agree=lambda flag: max(flag, other_rank["flag"]))
    assert quiet.stop_now() == signal.SIGTERM
    other_rank["flag"] = 0
    assert quiet.stop_now() == 0

    # off the main thread nothing is installed (Python allows handlers only there)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(preemption.StopSignals().install().installed))
    worker.start()
    worker.join()
    assert seen == [False]


def test_stop_without_output_dir_says_so(shards, monkeypatch):
    """nanollm.train(...) raises Interrupted; without -o there is no checkpoint, and it says so."""
    stops = iter([0, 0, signal.SIGINT])  # a SIGINT arrives during step 2
    monkeypatch.setattr(preemption.StopSignals, "stop_now", lambda self: next(stops))
    with pytest.raises(preemption.Interrupted) as stopped:
        nanollm.train(_cfg(shards, "", 10, val_loss_every=0, sample_every=0))
    assert stopped.value.step == 2 and stopped.value.checkpoint == "" and stopped.value.exit_status == 130
    assert "stopped by SIGINT after step 2: no checkpoint written (no -o)" in str(stopped.value)


def test_stop_on_a_sample_step_resumes_bit_exact(shards, tmp_path, monkeypatch):
    """A stop decided at step 3, where a sample (-s 3) and no val loss (-v 2) falls: the sample is
    drawn before the checkpoint, as at a regular checkpoint, so the resumed run samples as a
    straight one does."""
    stops = iter([0, 0, 0, signal.SIGUSR1])
    with monkeypatch.context() as patch:
        patch.setattr(preemption.StopSignals, "stop_now", lambda self: next(stops))
        with pytest.raises(preemption.Interrupted) as stopped:
            nanollm.train(_cfg(shards, tmp_path / "a", 6))
    assert stopped.value.checkpoint == str(tmp_path / "a" / "checkpoint_00000003.h5")
    resumed = nanollm.train(_cfg(shards, tmp_path / "a", 6, checkpoint_every=6, resume=1))
    straight = nanollm.train(_cfg(shards, tmp_path / "b", 6, checkpoint_every=6))
    assert resumed.train_losses == straight.train_losses[3:]
    assert resumed.samples == {6: straight.samples[6]}
    _same_state(tmp_path / "a" / "checkpoint_00000006.h5", tmp_path / "b" / "checkpoint_00000006.h5")


def test_ctrl_c_during_start_up_is_one_line_and_130(monkeypatch, capsys):
    """Before the loop takes over the signals, Ctrl-C is Python's KeyboardInterrupt: no traceback."""
    def start_up(cfg):
        raise KeyboardInterrupt

    train_module = nanollm.train
    monkeypatch.setattr(train_module, "train", start_up)
    with pytest.raises(SystemExit) as exit_:
        train_module.main(["-e", "d1"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted during start-up\n"
