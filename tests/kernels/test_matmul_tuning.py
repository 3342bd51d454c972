"""cuBLASLt algorithm choice by timing (matmul_tuning), through matmul's real cuBLASLt path against
the numpy stand-in of test_matmul: which answer runs, what is saved and read back, that timing does
not change what the product computes (outputs that add into themselves or alias an input are put
back), and the file's errors. The stand-in's answers are ranked 1..n; a fake timer gives each rank
its own time. `pytest -m gpu` times the real library (test_timed_choice_on_the_gpu)."""

import json
import math
import os

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import matmul, matmul_tuning

from .helpers import BF16_ONE_ROUNDING, download_bf16, random_bf16, relative_error
from .test_matmul import _host_bf16, _host_bf16_values, fake_cublaslt, host_as_device  # noqa: F401 (a fixture)

DEVICE = {"name": "Fake GPU 80GB", "compute_capability": [9, 0], "sms": 132, "cublasLt": 130500}


class FakeTimer:
    """matmul_tuning.time_launches for the stand-in: runs the launches (so they compute) and says
    the time `ms` gives the rank of the algorithm they ran."""

    def __init__(self, fake, ms):
        self.fake, self.ms, self.launches = fake, ms, 0

    def __call__(self, launch, count, stream):
        for _ in range(count):
            launch()
        self.launches += count
        return self.ms[self.fake.algorithms[-1]]


@pytest.fixture
def timed(fake_cublaslt, monkeypatch, tmp_path):
    """test_matmul's stand-in with four answers per product, in the timed mode, on a fresh file."""
    fake_cublaslt.answers = 4
    _timed_mode(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(matmul, "_device_description", lambda: dict(DEVICE))
    return fake_cublaslt


def _timed_mode(monkeypatch, cache_folder):
    monkeypatch.setattr(matmul, "ALGORITHM", "timed")
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(cache_folder))
    _new_process(monkeypatch)


def _new_process(monkeypatch):
    """What a later run starts with: no plans, the file not yet read."""
    monkeypatch.setattr(matmul, "_plans", {})
    monkeypatch.setattr(matmul, "_algorithm_file", None)


def _saved_file():
    return matmul_tuning.algorithm_file(DEVICE["name"], DEVICE["compute_capability"], DEVICE["sms"],
                                        DEVICE["cublasLt"])


def _backward_case(rng):
    rows, C, OC = 16, 8, 24
    dout, dout_ref = _host_bf16(rng, (rows, OC))
    inp, inp_ref = _host_bf16(rng, (rows, C))
    weight, weight_ref = _host_bf16(rng, (OC, C), 0.25)
    dweight, dweight_ref = _host_bf16(rng, (OC, C))
    dinp = host_as_device(np.full((rows, C), 0xFFFF, np.uint16))
    expected = (dout_ref @ weight_ref, dweight_ref + dout_ref.T @ inp_ref)
    return (dinp, dweight, dout, inp, weight), expected


def test_pick_keeps_the_first_answer_unless_another_is_clearly_faster():
    assert matmul_tuning.pick([1.0, 0.7, 0.9]) == 1
    assert matmul_tuning.pick([1.0, 0.99, 0.995]) == 0  # within the margin: llm.c's choice
    assert matmul_tuning.pick([1.0, 0.5, 0.5]) == 1  # ties: the better-ranked answer
    assert matmul_tuning.pick([1.0, math.inf, 0.8]) == 2
    assert matmul_tuning.pick([math.inf, 1.2, 1.1]) == 2  # the first could not run
    with pytest.raises(RuntimeError, match="no cuBLASLt candidate ran"):
        matmul_tuning.pick([math.inf, math.inf])


def test_the_fastest_answer_runs_and_is_saved(rng, timed, monkeypatch):
    timer = FakeTimer(timed, {1: 1.0, 2: 0.6, 3: 0.9, 4: 1.3})
    monkeypatch.setattr(matmul_tuning, "time_launches", timer)
    (dinp, dweight, dout, inp, weight), (dinp_ref, dweight_ref) = _backward_case(rng)
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    # dweight += dout^T inp (beta = 1) was launched many times while timing: it was put back first
    assert relative_error(_host_bf16_values(dinp), dinp_ref) < BF16_ONE_ROUNDING
    assert relative_error(_host_bf16_values(dweight), dweight_ref) < BF16_ONE_ROUNDING
    assert timer.launches > 0 and timed.algorithms[-1] == 2
    with open(_saved_file()) as f:
        saved = json.load(f)
    assert saved["device"] == DEVICE and len(saved["choices"]) == 2
    for name, choice in saved["choices"].items():
        assert choice["index"] == 1 and choice["config"]["ID"] == 2 and choice["ms"] == [1.0, 0.6, 0.9, 1.3], name

    # a later run reads the choices and times nothing
    _new_process(monkeypatch)
    monkeypatch.setattr(matmul_tuning, "time_launches", lambda *args: pytest.fail("timed again"))
    calls = timed.calls
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    assert timed.calls == calls + 2 and timed.algorithms[-2:] == [2, 2]


def test_heuristic_mode_runs_the_first_answer_and_saves_nothing(rng, timed, monkeypatch):
    monkeypatch.setattr(matmul, "ALGORITHM", "heuristic")
    monkeypatch.setattr(matmul_tuning, "time_launches", lambda *args: pytest.fail("timed"))
    (dinp, dweight, dout, inp, weight), _ = _backward_case(rng)
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    assert timed.algorithms == [1, 1] and not os.path.exists(_saved_file())


def test_timing_an_in_place_product_leaves_its_input_as_it_was(rng, timed, monkeypatch):
    monkeypatch.setattr(matmul_tuning, "time_launches", FakeTimer(timed, {1: 1.0, 2: 1.0, 3: 0.5, 4: 1.0}))
    a, a_ref = _host_bf16(rng, (8, 8))
    b, b_ref = _host_bf16(rng, (8, 8))
    matmul.matmul_batched(a, a, b)  # out is a: each timed launch would have fed on the last one's output
    assert relative_error(_host_bf16_values(a), a_ref @ b_ref) < BF16_ONE_ROUNDING
    assert timed.algorithms[-1] == 3


def test_timing_the_gelu_forward_keeps_its_outputs_right(rng, timed, monkeypatch):
    monkeypatch.setattr(matmul_tuning, "time_launches", FakeTimer(timed, {1: 1.0, 2: 0.9, 3: 0.5, 4: 1.0}))
    inp, inp_ref = _host_bf16(rng, (12, 8))
    weight, weight_ref = _host_bf16(rng, (16, 8), 0.25)
    bias, bias_ref = _host_bf16(rng, (16,))
    out = host_as_device(np.full((12, 16), 0xFFFF, np.uint16))
    pre_gelu = host_as_device(np.full((12, 16), 0xFFFF, np.uint16))
    matmul.matmul_forward(out, inp, weight, bias, pre_gelu)
    expected = reference.matmul_forward(inp_ref, weight_ref, bias_ref)
    assert relative_error(_host_bf16_values(pre_gelu), expected) < BF16_ONE_ROUNDING
    assert relative_error(_host_bf16_values(out), reference.gelu_forward(expected)) < BF16_ONE_ROUNDING


def test_a_choice_saved_by_another_process_meanwhile_wins(tmp_path):
    path = str(tmp_path / "choices.json")
    mine, theirs = matmul_tuning.AlgorithmFile(path, DEVICE), matmul_tuning.AlgorithmFile(path, DEVICE)
    theirs.put("product A", {"index": 3, "config": {"ID": 4}})
    theirs.put("product B", {"index": 0, "config": {"ID": 1}})
    kept = mine.put("product A", {"index": 1, "config": {"ID": 2}})
    assert kept == {"index": 3, "config": {"ID": 4}}
    assert matmul_tuning.AlgorithmFile(path, DEVICE).choices == {"product A": kept,
                                                                 "product B": {"index": 0, "config": {"ID": 1}}}


@pytest.mark.parametrize("text, complaint", [
    ("{not json", "not a JSON file"),
    ('{"format": 2, "choices": {}}', "not a format-1 file"),
    ('{"format": 1, "choices": {"p": {"index": -1, "config": {}}}}', "no valid 'index'"),
])
def test_a_bad_file_is_named_and_left_alone(rng, timed, monkeypatch, text, complaint):
    path = _saved_file()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)
    (dinp, dweight, dout, inp, weight), _ = _backward_case(rng)
    with pytest.raises(ValueError, match=complaint) as error:
        matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    assert path in str(error.value) and "delete it" in str(error.value)
    with open(path) as f:
        assert f.read() == text


def test_a_saved_choice_this_library_does_not_offer_is_an_error(rng, timed, monkeypatch):
    monkeypatch.setattr(matmul_tuning, "time_launches", FakeTimer(timed, {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.5}))
    (dinp, dweight, dout, inp, weight), _ = _backward_case(rng)
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    _new_process(monkeypatch)
    timed.answers = 2  # the saved answer (rank 4) is no longer among them
    with pytest.raises(RuntimeError, match="only 2 candidates") as error:
        matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    assert _saved_file() in str(error.value)


def test_the_file_is_per_gpu_model_and_library(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path))
    h200 = matmul_tuning.algorithm_file("NVIDIA H200", (9, 0), 132, 130500)
    assert h200 == str(tmp_path / "cublaslt-algorithms-NVIDIA-H200-sm90-132sms-cublasLt130500.json")
    assert len({h200, matmul_tuning.algorithm_file("NVIDIA H100 80GB HBM3", (9, 0), 132, 130500),
                matmul_tuning.algorithm_file("NVIDIA H200", (9, 0), 132, 130400)}) == 3
    monkeypatch.delenv("NANOLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert matmul_tuning.cache_folder() == str(tmp_path / "xdg" / "nanollm")


def test_the_mode_comes_from_the_environment():
    with pytest.raises(ValueError, match="NANOLLM_MATMUL_ALGORITHM='fastest': expected one of timed, heuristic"):
        matmul.variant_from_environment("NANOLLM_MATMUL_ALGORITHM", matmul_tuning.MODES, "fastest")


@pytest.mark.gpu
def test_timed_choice_on_the_gpu(rng, monkeypatch, tmp_path):
    """The real library: every answer the timing may pick computes the product (checked against the
    reference), the choice is saved, and a fresh plan reads the same choice back."""
    _timed_mode(monkeypatch, tmp_path)
    rows, C, OC = 8192, 768, 3072
    dout, dout_ref = random_bf16(rng, (rows, OC))
    inp, inp_ref = random_bf16(rng, (rows, C))
    weight, weight_ref = random_bf16(rng, (OC, C), 0.05)
    dweight, dweight_ref = random_bf16(rng, (OC, C))
    dinp = cuda.to_device(np.full((rows, C), 0xFFFF, np.uint16))
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    rows_checked = np.sort(rng.choice(rows, 256, replace=False))
    assert relative_error(download_bf16(dinp)[rows_checked], dout_ref[rows_checked] @ weight_ref) < BF16_ONE_ROUNDING
    assert relative_error(download_bf16(dweight), dweight_ref + dout_ref.T @ inp_ref) < BF16_ONE_ROUNDING
    plans = {key: plan.index for key, plan in matmul._plans.items()}
    with open(matmul._algorithm_file.path) as f:
        assert len(json.load(f)["choices"]) == 2
    _new_process(monkeypatch)
    monkeypatch.setattr(matmul_tuning, "time_launches", lambda *args: pytest.fail("timed again"))
    matmul.matmul_backward(dinp, dweight, None, dout, inp, weight)
    assert {key: plan.index for key, plan in matmul._plans.items()} == plans
