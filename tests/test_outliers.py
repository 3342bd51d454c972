"""-sl / -sg (llm.c's outlier detector), the step line's z-scores, tokens seen and ETA.

The detector is checked against numpy's mean and std over the same window; the loop is driven by a
scripted back end (no model arithmetic) so 140 steps take a second, with a spike injected."""

import importlib
import math

import numpy as np
import pytest

from nanollm.data import write_shard
from nanollm.outliers import WINDOW, OutlierDetector, skip_reason

train_module = importlib.import_module("nanollm.train")


def test_detector_is_nan_until_the_window_fills_then_a_window_z_score(rng):
    values = rng.normal(3.0, 0.5, 3 * WINDOW)
    detector = OutlierDetector()
    for i, value in enumerate(values):
        z = detector.update(value)
        if i < WINDOW:
            assert math.isnan(z)
        else:  # the window holds the last WINDOW values, the new one included
            window = values[i - WINDOW + 1:i + 1]
            assert z == pytest.approx((value - window.mean()) / window.std(), rel=1e-9, abs=1e-9)


def test_detector_constant_window_and_non_finite_values():
    detector = OutlierDetector(window=4)
    assert all(math.isnan(detector.update(2.0)) for _ in range(4))
    assert detector.update(2.0) == 0.0  # std 0: llm.c returns 0
    assert math.isnan(detector.update(float("nan")))  # not added: the window stays clean
    assert detector.update(2.0) == 0.0
    assert detector.update(4.0) == pytest.approx((4.0 - 2.5) / np.std([2.0, 2.0, 2.0, 4.0]))


def test_skip_reason():
    nan = float("nan")
    assert skip_reason(3.0, 5.0, 1.0, 0.0, 0.0, 0.0) is None  # both off
    assert skip_reason(3.0, 5.0, 1.0, 0.0, 4.0, 0.0) == "loss z-score of 5.000000"
    assert skip_reason(3.0, 3.9, 1.0, 9.0, 4.0, 0.0) is None
    assert skip_reason(3.0, 1.0, 1.0, 9.0, 4.0, 8.0) == "grad z-score of 9.000000"
    assert skip_reason(3.0, nan, 1.0, nan, 4.0, 8.0) is None  # window still filling
    assert skip_reason(nan, nan, 1.0, 0.0, 4.0, 0.0) == "a non-finite loss (nan)"
    assert skip_reason(nan, nan, 1.0, 0.0, 0.0, 8.0) is None  # -sg alone does not cover the loss
    assert skip_reason(3.0, 0.0, float("inf"), nan, 0.0, 8.0) == "a non-finite grad norm (inf)"


class ScriptedBackend:
    """Stands in for CpuBackend: losses and norms from the class's script, and updates counted."""
    loss = {}   # step -> loss (default: a noisy 3.0)
    norm = {}   # step -> norm (default: a noisy 1.0)
    updates = []

    def __init__(self, config, cfg, grad_accum, init_params=None, comm=None, layout=None):
        self.device_name, self.placement, self.description = "cpu", "CPU", "scripted back end"
        self.step = -1
        self.noise = np.random.default_rng(0)
        type(self).updates = []

    def zero_grad(self):
        self.step += 1

    def train_micro_step(self, x, y, micro_step):
        pass

    def grad_norm(self):
        return self.norm.get(self.step, 1.0 + 0.01 * self.noise.normal())

    def step_loss(self):
        return self.loss.get(self.step, 3.0 + 0.01 * self.noise.normal())

    def update(self, lr, weight_decay, grad_scale):
        type(self).updates.append(self.step)

    def update_clipped(self, lr, weight_decay, grad_clip):  # the loop's path without -sl/-sg
        self.update(lr, weight_decay, 1.0)

    def step_results(self):
        return self.step_loss(), self.grad_norm()

    def synchronize(self):
        pass

    def close(self):
        pass


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    write_shard(tmp_path / "t_train_000000.bin", np.arange(200, dtype=np.uint16))
    monkeypatch.setattr(train_module, "CpuBackend", ScriptedBackend)
    ScriptedBackend.loss, ScriptedBackend.norm = {}, {}

    def run(*flags, steps=140):
        cfg = train_module.TrainConfig(input_bin=str(tmp_path / "t_train_*.bin"), model="d1", batch_size=1, seq_len=8,
                                       max_steps=steps, val_loss_every=0, sample_every=0, device="cpu")
        for flag, value in zip(flags[::2], flags[1::2]):
            setattr(cfg, {"-sl": "skip_update_lossz", "-sg": "skip_update_gradz"}[flag], value)
        return train_module.train(cfg)

    return run


def test_injected_loss_spike_skips_that_update(scripted, capsys):
    ScriptedBackend.loss = {135: 3.5}  # ~50 standard deviations above a window of 3.0 +- 0.01
    result = scripted("-sl", 5.0)
    assert result.skipped_updates == [135]
    assert ScriptedBackend.updates == [s for s in range(140) if s != 135]
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("step  136/140"))
    z = float(line.split("(")[1].split("z)")[0])
    assert z > 5 and "skipping update due to loss z-score of" in out
    # steps before the window fills print llm.c's "(+nanz)"
    first = next(l for l in out.splitlines() if l.startswith("step    1/140"))
    assert "(+nanz)| norm" in first and "(+nanz)| lr" in first


def test_spikes_not_skipped_when_off_or_before_the_window_fills(scripted):
    ScriptedBackend.loss = {135: 3.5}
    assert scripted("-sl", 0.0).skipped_updates == []
    assert scripted("-sg", 5.0).skipped_updates == []  # -sg watches the norm only
    ScriptedBackend.loss = {100: 30.0, 135: 3.5}
    # step 100: no z-score yet; but it enters the window (as in llm.c), so 3.5 at step 135 is no outlier
    assert scripted("-sl", 5.0).skipped_updates == []


def test_injected_grad_norm_spike_skips_with_sg(scripted):
    ScriptedBackend.norm = {130: 1.5}
    result = scripted("-sg", 6.0)
    assert result.skipped_updates == [130] and 130 not in ScriptedBackend.updates


def test_non_finite_loss_is_an_error_unless_sl_skips_it(scripted):
    ScriptedBackend.loss = {3: float("nan")}
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan"):
        scripted(steps=6)
    result = scripted("-sl", 3.0, steps=6)
    assert result.skipped_updates == [3] and result.steps == 6
    assert math.isnan(result.train_losses[3])


def test_step_line_has_tokens_seen_and_eta(scripted, capsys):
    scripted(steps=3)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert len(lines) == 3
    assert lines[0].endswith(" | 8 tokens | ETA 0s") and lines[2].endswith(" | 24 tokens | ETA 0s")


def test_count_and_duration_formats():
    assert [train_module._count(n) for n in (512, 65536, 1_310_720, 2_100_000_000)] == ["512", "65.54K", "1.31M", "2.10B"]
    assert [train_module._duration(s) for s in (0.4, 59.6, 200, 3900)] == ["0s", "1m00s", "3m20s", "1h05m"]


def test_the_new_flags_parse_as_llmc_spells_them():
    from nanollm.train_config import parse_args

    cfg = parse_args("-sl 5 -sg 4.5 -lg 10 -h 1 --hellaswag-data hs.bin -b 8".split())
    assert (cfg.skip_update_lossz, cfg.skip_update_gradz, cfg.log_gpu_every) == (5.0, 4.5, 10)
    assert (cfg.hellaswag, cfg.hellaswag_data) == (1, "hs.bin")
