"""Learning-rate schedules against their definitions (llm.c's schedulers.h), and MFU peaks."""

import math

import pytest

from nanollm.mfu import mfu, peak_bf16_tflops
from nanollm.schedulers import learning_rate


def test_warmup_is_linear_from_lr_over_warmup():
    for schedule in ("cosine", "linear", "wsd"):
        assert learning_rate(schedule, 0, 1e-3, 10, 100, 0.0) == pytest.approx(1e-4)
        assert learning_rate(schedule, 9, 1e-3, 10, 100, 0.0) == pytest.approx(1e-3)


def test_cosine_ends_at_final_fraction_and_is_half_way_in_the_middle():
    lr, warm, total, frac = 6e-4, 10, 110, 0.1
    assert learning_rate("cosine", warm, lr, warm, total, frac) == pytest.approx(lr)
    assert learning_rate("cosine", total, lr, warm, total, frac) == pytest.approx(lr * frac)
    mid = learning_rate("cosine", warm + 50, lr, warm, total, frac)
    assert mid == pytest.approx(lr * frac + 0.5 * (lr - lr * frac))


def test_linear_and_constant():
    assert learning_rate("linear", 60, 1.0, 10, 110, 0.0) == pytest.approx(0.5)
    assert learning_rate("constant", 0, 3e-4, 10, 100, 0.0) == 3e-4


def test_wsd_holds_then_decays_as_one_minus_sqrt():
    assert learning_rate("wsd", 79, 1.0, 0, 100, 0.0) == 1.0
    assert learning_rate("wsd", 85, 1.0, 0, 100, 0.0) == pytest.approx(1.0 - math.sqrt(5 / 20))
    assert learning_rate("wsd", 100, 1.0, 0, 100, 0.0) == pytest.approx(0.0)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown learning rate schedule 'cosin'"):
        learning_rate("cosin", 0, 1.0, 0, 10, 0.0)


def test_mfu_peaks():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("Some Future GPU") is None
    assert mfu(989.4e12 * 0.5, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert mfu(1e12, 1.0, "Some Future GPU") is None
