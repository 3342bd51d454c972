"""NANOLLM_STARTUP_TIMES=1: the start-up table, and the training loop printing it (CPU path)."""

import numpy as np

import nanollm
from nanollm import startup
from nanollm.data import write_shard


def test_phases_and_inner_costs(monkeypatch):
    monkeypatch.setattr(startup, "ENABLED", True)
    monkeypatch.setattr(startup, "_phases", [])
    monkeypatch.setattr(startup, "_inside", {})
    monkeypatch.setattr(startup, "_last", None)
    synchronized = []
    startup.mark("imports")
    with startup.accumulate("plans"):
        pass
    with startup.accumulate("plans"):
        pass
    startup.mark("model", synchronize=lambda: synchronized.append(1))
    assert synchronized == [1]
    names = [name for name, _ in startup._phases]
    assert names == ["imports", "model"]
    assert startup._phases[0][1] > 0  # from the process's start: the interpreter ran before this
    text = startup.report()
    assert text.splitlines()[0].startswith("start-up times")
    assert "imports" in text and "total" in text and "plans (2x)" in text


def test_disabled_is_silent(monkeypatch):
    monkeypatch.setattr(startup, "ENABLED", False)
    monkeypatch.setattr(startup, "_phases", [])
    startup.mark("anything")
    with startup.accumulate("anything"):
        pass
    assert startup.report() == "" and startup._phases == []


def test_training_prints_the_table(monkeypatch, tmp_path, capsys, rng):
    monkeypatch.setattr(startup, "ENABLED", True)
    monkeypatch.setattr(startup, "_phases", [])
    monkeypatch.setattr(startup, "_inside", {})
    monkeypatch.setattr(startup, "_last", None)
    write_shard(tmp_path / "t_train_000000.bin", rng.integers(0, 500, 4096).astype(np.uint16))
    write_shard(tmp_path / "t_val_000000.bin", rng.integers(0, 500, 1024).astype(np.uint16))
    nanollm.train(input_bin=str(tmp_path / "t_train_*.bin"), input_val_bin=str(tmp_path / "t_val_*.bin"),
                  model="d1", batch_size=2, seq_len=16, max_steps=3, val_loss_every=0, sample_every=0, device="cpu")
    out = capsys.readouterr().out
    table = out[out.index("start-up times"):]
    for phase in ("python start-up and imports", "data loaders", "first step", "second step", "total"):
        assert phase in table, phase
    assert out.count("start-up times") == 1
