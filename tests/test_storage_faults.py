"""Storage faults under -o, injected (tests may run as root, where a read-only folder does not stop
writes): a full disk or an unwritable folder during a checkpoint, and a log that cannot be
written. The error names the file; the last complete checkpoint stays and -y 1 finds it;
--storage-errors continue trains on."""

import errno
import os

import numpy as np
import pytest

import nanollm
from nanollm import atomic, checkpoint
from nanollm.data import write_shard
from nanollm.storage import StorageError

train_module = nanollm.train  # the module (callable as the function)


@pytest.fixture
def shards(tmp_path, rng):
    pattern = rng.integers(0, 500, 64)
    write_shard(tmp_path / "tiny_train_000000.bin", np.tile(pattern, 40).astype(np.uint16))
    return tmp_path


def _args(shards, out, *extra):
    return ["-i", str(shards / "tiny_train_*.bin"), "-e", "d1", "-b", "2", "-t", "16", "-x", "4", "-v", "0",
            "-s", "0", "-l", "3e-3", "--device", "cpu", "-o", str(out), "-n", "2", *extra]


def _disk_full_at(monkeypatch, step):
    """The checkpoint of `step` fails mid-write with ENOSPC (h5py has written part of it)."""
    write = checkpoint._write

    def write_then_fail(path, ckpt, num_shards):
        if ckpt.step == step:
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, ckpt, num_shards)

    monkeypatch.setattr(checkpoint, "_write", write_then_fail)


def test_disk_full_stops_with_exit_2_and_keeps_the_last_checkpoint(shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _disk_full_at(monkeypatch, 4)
    with pytest.raises(SystemExit) as exit_:
        train_module.main(_args(shards, out))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = out / "checkpoint_00000002.h5"
    assert err.strip() == (f"error: {out / 'checkpoint_00000004.h5'}: cannot write the checkpoint: No space left "
                           f"on device (ENOSPC); the newest complete checkpoint, {last}, is intact (-y 1 resumes "
                           f"from it)")
    assert sorted(os.listdir(out)) == ["checkpoint_00000002.h5", "main.log"]  # no partial file, no temp
    monkeypatch.undo()
    resumed = nanollm.train(train_module.main_parse(_args(shards, out, "-y", "1")))
    assert resumed.resumed_from == str(last) and resumed.first_step == 2 and resumed.steps == 4


def test_unwritable_folder_is_named(shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_open = os.open

    def refuse_checkpoints(path, flags, *args):  # the folder turned read-only after main.log was opened
        if os.path.basename(path).startswith(".checkpoint_"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", refuse_checkpoints)
    with pytest.raises(StorageError, match=rf"^{out / 'checkpoint_00000002.h5'}: cannot write the checkpoint: "
                                           r"Permission denied \(EACCES\); there is no earlier checkpoint"):
        nanollm.train(train_module.main_parse(_args(shards, out)))
    assert os.listdir(out) == ["main.log"]


def test_continue_trains_on_after_a_failed_checkpoint(shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _disk_full_at(monkeypatch, 2)  # a transient fault: the step-4 checkpoint goes through
    result = nanollm.train(train_module.main_parse(_args(shards, out, "--storage-errors", "continue")))
    assert result.steps == 4 and result.checkpoints == [str(out / "checkpoint_00000004.h5")]
    assert "warning: " + str(out / "checkpoint_00000002.h5") + ": cannot write the checkpoint" in capsys.readouterr().out
    assert checkpoint.latest_checkpoint(out).step == 4


class _FullDisk:
    """A file whose writes fail once `lines` lines are in."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines -= 1
        if self.lines < 0:
            raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")  # its buffer cannot go out either


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_log_that_cannot_be_written(shards, tmp_path, monkeypatch, capsys, policy):
    out = tmp_path / "out"
    monkeypatch.setattr(train_module, "open", lambda path, mode: _FullDisk(lines=2), raising=False)
    cfg = train_module.main_parse(_args(shards, out, "-n", "0", "--storage-errors", policy))
    log = str(out / "main.log")
    if policy == "stop":
        with pytest.raises(StorageError, match=rf"^{log}: cannot write the log: No space left on device"):
            nanollm.train(cfg)
    else:
        assert nanollm.train(cfg).steps == 4
        assert f"warning: {log}: cannot write the log" in capsys.readouterr().out
