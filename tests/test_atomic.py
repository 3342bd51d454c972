"""atomic.atomic_write_with: all-or-nothing writes, and the clean-up of temp files that writers
killed mid-write left behind."""

import os
import subprocess
import sys

import pytest

from nanollm.atomic import atomic_write_with


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it (pids are not reused this quickly)


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    atomic_write_with(path, lambda tmp: open(tmp, "wb").write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_dead_writers_temps_are_removed_live_ones_kept(tmp_path):
    path = tmp_path / "checkpoint_00000100.h5"
    dead = tmp_path / f".checkpoint_00000100.h5.{_dead_pid()}.0a1b2c3d.tmp"
    live = tmp_path / f".checkpoint_00000100.h5.{os.getpid()}.deadbeef.tmp"  # a writer still running
    other = tmp_path / f".checkpoint_00000200.h5.{_dead_pid()}.0a1b2c3d.tmp"  # another file's: not ours to judge
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    atomic_write_with(path, lambda tmp: open(tmp, "wb").write(b"ok"))
    assert path.read_bytes() == b"ok"
    assert not dead.exists() and live.exists() and other.exists()
