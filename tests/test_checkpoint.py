"""HDF5 checkpoints: bit-exact resume (CPU training loop, and the GPU model on the simulator),
llm.c's -n/-nk/-nm/-y, atomic saves that survive a crash, and clear errors for bad files."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

import nanollm
from nanollm import checkpoint
from nanollm.checkpoint import Checkpoint, CheckpointError, CorruptCheckpointError
from nanollm.config import GPT2Config, num_parameters
from nanollm.data import write_shard
from nanollm.train_config import UsageError
from nanollm.zero import ShardLayout

TINY = GPT2Config(max_seq_len=8, vocab_size=97, padded_vocab_size=128, num_layers=1, num_heads=2, channels=16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_checkpoint(rng, step=3):
    n = num_parameters(TINY)
    master = rng.standard_normal(n).astype(np.float32)
    return Checkpoint(step=step, model_config=TINY, params_bf16=(master.view(np.uint32) >> 16).astype(np.uint16),
                      master=master, m=rng.standard_normal(n).astype(np.float32),
                      v=rng.random(n).astype(np.float32), adamw_step=step, seed=42,
                      sampling_rng=np.random.default_rng(1337).bit_generator.state,
                      loader_state={"epoch": 0, "B": 2, "T": 8}, train_config={"model": "tiny", "batch_size": 2})


def _info(path):
    return subprocess.run([sys.executable, "-m", "nanollm.checkpoint", "info", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def _train_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "nanollm.train", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, **kwargs)


@pytest.fixture
def shards(tmp_path, rng):
    pattern = rng.integers(0, 500, 64)
    write_shard(tmp_path / "tiny_train_000000.bin", np.tile(pattern, 40).astype(np.uint16))
    write_shard(tmp_path / "tiny_train_000001.bin", np.tile(pattern[::-1], 30).astype(np.uint16))
    write_shard(tmp_path / "tiny_val_000000.bin", np.tile(pattern, 4).astype(np.uint16))
    return tmp_path


def _cfg(shards, out, **overrides):
    fields = dict(input_bin=str(shards / "tiny_train_*.bin"), input_val_bin=str(shards / "tiny_val_*.bin"),
                  model="d1", batch_size=2, seq_len=16, max_steps=20, val_loss_every=10, val_max_steps=1,
                  sample_every=10, gen_tokens=3, learning_rate=3e-3, warmup_iters=3, weight_decay=0.1,
                  device="cpu", output_dir=str(out))
    fields.update(overrides)
    return nanollm.TrainConfig(**fields)


def _same_state(path_a, path_b):
    a, b = checkpoint.load_checkpoint(path_a), checkpoint.load_checkpoint(path_b)
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.step, a.adamw_step, a.seed) == (b.step, b.adamw_step, b.seed)
    assert a.loader_state == b.loader_state and a.sampling_rng == b.sampling_rng


# ---- bit-exact resume -----------------------------------------------------------------------------

def test_cpu_resume_is_bit_exact_and_history_is_pruned(shards, tmp_path):
    """20 steps straight (checkpoints every 5, keep 2, majors every 10) vs resume from step 10 in a new
    object and in a new process: the same losses, val losses, samples and final state, bit for bit."""
    straight = nanollm.train(_cfg(shards, tmp_path / "a", checkpoint_every=5, checkpoints_keep=2,
                                  major_checkpoint_every=10))
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "a")] == [10, 15, 20]  # 5 pruned, 10 major
    assert len(straight.checkpoints) == 4

    for name in ("b", "c"):
        os.makedirs(tmp_path / name)
        shutil.copy(tmp_path / "a" / "checkpoint_00000010.h5", tmp_path / name)
    resumed = nanollm.train(_cfg(shards, tmp_path / "b", checkpoint_every=10, resume=1))
    assert resumed.first_step == 10 and resumed.resumed_from.endswith("checkpoint_00000010.h5")
    assert resumed.train_losses == straight.train_losses[10:]  # exact float equality
    assert resumed.val_losses == {10: straight.val_losses[10], 20: straight.val_losses[20]}
    assert resumed.samples == {20: straight.samples[20]}       # the sampling generator resumed too
    assert resumed.checkpoints == [str(tmp_path / "b" / "checkpoint_00000020.h5")]  # none rewritten at 10
    _same_state(tmp_path / "a" / "checkpoint_00000020.h5", tmp_path / "b" / "checkpoint_00000020.h5")
    log = open(resumed.log_path).read()
    assert f"s:19 trl:{straight.train_losses[-1]:.6f}" in log

    # a new process, from the command line
    cfg = _cfg(shards, tmp_path / "c")
    proc = _train_cli("-i", cfg.input_bin, "-j", cfg.input_val_bin, "-e", "d1", "-b", "2", "-t", "16", "-x", "20",
                      "-v", "10", "-m", "1", "-s", "10", "-g", "3", "-l", "3e-3", "-u", "3", "-c", "0.1",
                      "--device", "cpu", "-o", str(tmp_path / "c"), "-n", "10", "-y", "1")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    _same_state(tmp_path / "a" / "checkpoint_00000020.h5", tmp_path / "c" / "checkpoint_00000020.h5")


def test_gpu_model_optimizer_state_round_trip_is_bit_exact(tmp_path, rng):
    """GPT2 (simulator): 2 updates, save to HDF5, a second GPT2 object (another init seed) loads it;
    one more forward/backward/update on both gives identical losses and bit-identical state."""
    from nanollm.model import GPT2
    from nanollm.kernels.bf16 import to_bf16_bits

    config = GPT2Config(max_seq_len=4, vocab_size=29, padded_vocab_size=32, num_layers=1, num_heads=2, channels=8)
    B, T = 1, 4
    a = GPT2(config, B, T, seed=3)
    n = a.num_parameters
    for _ in range(2):  # cheap updates from given gradients: no forward/backward needed to fill m and v
        grads = np.zeros(a.grads.memory.size, np.uint16)
        grads[:n] = to_bf16_bits(rng.standard_normal(n).astype(np.float32) * 0.1)
        a.grads.memory.copy_to_device(grads)  # the flat order matches: all views are contiguous here
        a.update(1e-2, weight_decay=0.1)
    state = a.optimizer_state()
    assert state["params_bf16"].dtype == np.uint16 and state["m"].dtype == np.float32 and state["step"] == 2
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint_00000002.h5", Checkpoint(
        step=2, model_config=config, params_bf16=state["params_bf16"], master=state["master"], m=state["m"],
        v=state["v"], adamw_step=state["step"], seed=state["seed"], sampling_rng={}, loader_state={}))

    b = GPT2(config, B, T, seed=11)
    b.load_optimizer_state(checkpoint.load_checkpoint(path).optimizer_state())
    tokens, targets = rng.integers(0, config.vocab_size, (2, B, T))
    losses = []
    for model in (a, b):
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        losses.append(model.losses())
        model.update(1e-2, weight_decay=0.1, grad_scale=0.5)
    assert losses[0] == losses[1]
    sa, sb = a.optimizer_state(), b.optimizer_state()
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
    assert sa["step"] == sb["step"] == 3 and sa["seed"] == sb["seed"] == 3


# ---- the file ---------------------------------------------------------------------------------------

def test_file_layout_is_readable_by_hand(tmp_path, rng):
    ckpt = _tiny_checkpoint(rng)
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint_00000003.h5", ckpt)
    with h5py.File(path) as f:
        assert f.attrs["format"] == "nanollm-checkpoint" and f.attrs["format_version"] == 1
        assert f.attrs["step"] == 3 and f.attrs["complete"] == 1
        ds = f["model/params_bf16"]
        assert ds.dtype == np.uint16 and "bfloat16" in ds.attrs["dtype"] and ds.attrs["meaning"]
        assert list(ds.attrs["shape"]) == [num_parameters(TINY)]
        shard = f["optimizer/shard_000"]
        assert dict(shard.attrs) == {"shard_index": 0, "num_shards": 1, "offset": 0, "count": num_parameters(TINY)}
        assert json.loads(f["model"].attrs["config"])["channels"] == 16
        assert json.loads(f["model"].attrs["tensors"])[0] == ["wte", [128, 16], 0]
    back = checkpoint.load_checkpoint(path)
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ckpt, name))
    assert back.sampling_rng == ckpt.sampling_rng and back.loader_state == ckpt.loader_state
    assert back.train_config == ckpt.train_config and back.model_config == TINY
    proc = _info(path)
    assert proc.returncode == 0, proc.stderr
    assert "step 3" in proc.stdout and "L=1 C=16 NH=2" in proc.stdout and "/optimizer/shard_000/m" in proc.stdout


def test_sharded_file_loads_whole_per_rank_and_resliced(tmp_path, rng):
    """A file of 2 ZeRO-1 shards (llm.c's slicing, zero.py) loads whole, as each rank's packed
    shard at N=2, and re-sliced for another number of ranks or -z 0."""
    ckpt = _tiny_checkpoint(rng)
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint_00000003.h5", ckpt, num_shards=2)
    whole = checkpoint.load_checkpoint(path)
    for name in ("master", "m", "v"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(ckpt, name))
    for world_size, zero_stage in ((2, 1), (4, 1), (1, 1), (1, 0), (2, 0)):
        for rank in range(world_size):
            layout = ShardLayout(TINY, world_size, rank, zero_stage)
            part = checkpoint.load_checkpoint(path, layout)
            for name in ("master", "m", "v"):
                np.testing.assert_array_equal(getattr(part, name), layout.pack(getattr(ckpt, name)))
    with h5py.File(path) as f:
        assert f["optimizer"].attrs["num_shards"] == 2 and "zero1" in f["optimizer"].attrs["slicing"]
        assert f["optimizer/shard_001"].attrs["count"] == num_parameters(TINY) // 2
    with pytest.raises(CheckpointError, match=r"/model/@config: the checkpoint holds"):
        checkpoint.load_checkpoint(path, ShardLayout(dataclasses.replace(TINY, num_layers=2), 2, 0, 1))


class _RankInOrder:
    """The communicator calls save_sharded_checkpoint makes, for ranks run one after another in
    this process (the last rank first, so that rank 0's commit comes last, as the barrier makes it)."""

    def __init__(self, rank, size, save_id):
        self.rank, self.size, self.save_id = rank, size, save_id

    def broadcast_object(self, obj, root=0):
        return self.save_id

    def barrier(self):
        pass


def _save_by_ranks(folder, ckpt, world_size, save_id):
    path = checkpoint.checkpoint_path(folder, ckpt.step)
    for rank in reversed(range(world_size)):
        layout = ShardLayout(TINY, world_size, rank, 1)
        part = dataclasses.replace(ckpt, master=layout.pack(ckpt.master), m=layout.pack(ckpt.m), v=layout.pack(ckpt.v))
        checkpoint.save_sharded_checkpoint(path, part, layout, _RankInOrder(rank, world_size, save_id))
    return path


def test_multi_rank_save_writes_a_file_per_rank_and_commits_last(tmp_path, rng):
    old = _save_by_ranks(tmp_path, _tiny_checkpoint(rng, step=3), 2, "aaaa0001")
    ckpt = _tiny_checkpoint(rng, step=6)
    path = _save_by_ranks(tmp_path, ckpt, 2, "bbbb0002")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000003.h5", "checkpoint_00000003.shard001of002.aaaa0001.h5",
                                            "checkpoint_00000006.h5", "checkpoint_00000006.shard001of002.bbbb0002.h5"]
    back = checkpoint.load_checkpoint(path)
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ckpt, name))
    proc = _info(path)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer shards: 2" in proc.stdout and "checkpoint_00000006.shard001of002.bbbb0002.h5" in proc.stdout
    # saving step 6 again (a resumed run reaching it): the new save's shard replaces the old one's
    _save_by_ranks(tmp_path, ckpt, 2, "cccc0003")
    assert "checkpoint_00000006.shard001of002.bbbb0002.h5" not in os.listdir(tmp_path)
    # a shard file missing, or from another save: the checkpoint does not count, resume takes the older one
    shard = tmp_path / "checkpoint_00000006.shard001of002.cccc0003.h5"
    os.rename(shard, tmp_path / "elsewhere.h5")
    with pytest.raises(CorruptCheckpointError, match="shard_001/@file: the shard file .* is missing"):
        checkpoint.load_checkpoint(path)
    shutil.copy(tmp_path / "checkpoint_00000003.shard001of002.aaaa0001.h5", shard)
    warnings = []
    assert checkpoint.latest_checkpoint(tmp_path, warn=warnings.append).path == old
    assert "belongs to another save" in warnings[0]
    # every rank of a job agrees: a part only one rank cannot read makes all of them skip the file
    agree = lambda problem: [problem, "rank 1: damaged"]  # noqa: E731
    assert checkpoint.latest_checkpoint(tmp_path, agree=agree, warn=warnings.append) is None
    # pruning deletes a checkpoint's shard files with it
    checkpoint.prune_checkpoints(tmp_path, keep=1)
    assert not any(name.startswith("checkpoint_00000003") for name in os.listdir(tmp_path))


def _damage_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _damage_random(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))


def _damage_missing_dataset(path):
    with h5py.File(path, "r+") as f:
        del f["optimizer/shard_000/v"]


def _damage_flip_bytes(path):
    with h5py.File(path, "r") as f:
        offset = f["optimizer/shard_000/m"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 40)
        f.write(b"\xff\xff\xff\xff")


def _damage_unfinished(path):
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = 0


@pytest.mark.parametrize("damage, field", [
    (_damage_truncate, "HDF5"), (_damage_random, "not a readable HDF5 file"),
    (_damage_missing_dataset, "/optimizer/shard_000/v: missing dataset"),
    (_damage_flip_bytes, "/optimizer/shard_000/m: checksum mismatch"),
    (_damage_unfinished, "/@complete"),
])
def test_damaged_files_are_clear_errors(tmp_path, rng, damage, field):
    path = checkpoint.save_checkpoint(tmp_path / "checkpoint_00000003.h5", _tiny_checkpoint(rng))
    damage(path)
    with pytest.raises(CorruptCheckpointError) as error:
        checkpoint.load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ") and field in str(error.value)
    proc = _info(path)
    assert proc.returncode == 2 and path in proc.stderr and field in proc.stderr


def test_info_on_missing_file_exits_2(tmp_path):
    proc = _info(tmp_path / "nope.h5")
    assert proc.returncode == 2 and "nope.h5" in proc.stderr


# ---- crashes and resume -----------------------------------------------------------------------------

def test_failed_save_leaves_previous_checkpoint(tmp_path, rng, monkeypatch):
    good = checkpoint.save_checkpoint(tmp_path / "checkpoint_00000003.h5", _tiny_checkpoint(rng, 3))
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(*args, **kwargs)

    original = checkpoint._dataset
    monkeypatch.setattr(checkpoint, "_dataset", failing)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(tmp_path / "checkpoint_00000006.h5", _tiny_checkpoint(rng, 6))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000003.h5"]  # no temp file left behind
    assert checkpoint.latest_checkpoint(tmp_path).path == good


CRASHING_RUN = """
import os, signal, sys
from nanollm import checkpoint, train
calls = []
original = checkpoint._dataset
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 6:  # the second checkpoint's second dataset: mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
checkpoint._dataset = dying
train.main(sys.argv[1:])
"""


def test_killed_save_resumes_from_the_last_complete_checkpoint(shards, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(shards, out, max_steps=4, checkpoint_every=2, val_loss_every=0, sample_every=0)
    args = ["-i", cfg.input_bin, "-e", "d1", "-b", "2", "-t", "16", "-x", "4", "-v", "0", "-s", "0",
            "-l", "3e-3", "-u", "3", "-c", "0.1", "--device", "cpu", "-o", str(out), "-n", "2"]
    proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(os.listdir(out))
    assert "checkpoint_00000002.h5" in names and "checkpoint_00000004.h5" not in names
    assert any(name.startswith(".checkpoint_00000004.h5.") and name.endswith(".tmp") for name in names)
    # a partial copy of a newer checkpoint (not written by nanollm's atomic save) is skipped too
    with open(out / "checkpoint_00000003.h5", "wb") as f:
        f.write(open(out / "checkpoint_00000002.h5", "rb").read()[:5000])
    warnings = []
    assert checkpoint.latest_checkpoint(out, warn=warnings.append).step == 2
    assert len(warnings) == 1 and "checkpoint_00000003.h5" in warnings[0]
    os.remove(out / "checkpoint_00000003.h5")

    resumed = nanollm.train(dataclasses.replace(cfg, resume=1))
    assert resumed.first_step == 2 and resumed.resumed_from.endswith("checkpoint_00000002.h5")
    straight = nanollm.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "straight")))
    assert resumed.train_losses == straight.train_losses[2:]
    _same_state(out / "checkpoint_00000004.h5", tmp_path / "straight" / "checkpoint_00000004.h5")


def test_resume_with_another_model_or_batch_is_refused(shards, tmp_path):
    out = tmp_path / "out"
    nanollm.train(_cfg(shards, out, max_steps=1, checkpoint_every=1, val_loss_every=0, sample_every=0))
    common = ["-i", str(shards / "tiny_train_*.bin"), "-t", "16", "-x", "2", "-v", "0", "-s", "0",
              "--device", "cpu", "-o", str(out), "-y", "1"]
    path = str(out / "checkpoint_00000001.h5")
    proc = _train_cli(*common, "-e", "d2", "-b", "2")
    assert proc.returncode == 2 and f"{path}: /model/@config" in proc.stderr
    proc = _train_cli(*common, "-e", "d1", "-b", "4")
    assert proc.returncode == 2 and f"{path}: /data/train_loader/@state" in proc.stderr
    assert "B is 2 in the state, 4 here" in proc.stderr


def test_resume_without_checkpoint_starts_fresh_and_flags_need_output_dir(shards, tmp_path):
    result = nanollm.train(_cfg(shards, tmp_path / "empty", max_steps=1, resume=1, val_loss_every=0, sample_every=0))
    assert result.first_step == 0 and result.steps == 1
    with pytest.raises(UsageError, match="need an output directory"):
        nanollm.train(_cfg(shards, "", max_steps=1, checkpoint_every=1))
