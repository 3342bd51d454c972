"""matmul_tuning's choice among the heuristic's candidates, on a fake clock (timings never decide a
test): the fastest wins only by more than MARGIN, failing candidates are skipped, accumulating
products are timed into scratch, and choices are reused from the cache file without timing."""

import pytest

from nanollm.kernels import matmul_tuning


class FakePlan:
    description = "out(8x8) = a @ b^T (K=8), epilogue DEFAULT"

    def __init__(self, found):
        self.found = found
        self.choice = None

    def use(self, candidate):
        self.choice = candidate


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(matmul_tuning.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(matmul_tuning, "_capturing", lambda stream: False)
    monkeypatch.setattr(matmul_tuning, "_choices", None)
    monkeypatch.setattr(matmul_tuning, "ENABLED", True)
    monkeypatch.setenv("NANOLLM_CUBLASLT_CACHE", str(tmp_path / "algorithms.json"))
    return clock


def runner(clock, ms, calls, fail=()):
    def run(candidate, out):
        calls.append((candidate, out))
        if candidate in fail:
            raise RuntimeError("not supported")
        clock[0] += ms[candidate] / 1e3
    return run


def test_fastest_candidate_by_more_than_the_margin(tuning):
    calls = []
    plan = FakePlan(4)
    matmul_tuning.choose(plan, ("key", 1), runner(tuning, [1.0, 0.99, 0.80, 0.90], calls, fail={1}), 128, False, 0, 1)
    assert plan.choice == 2
    assert {c for c, _ in calls} == {0, 1, 2, 3} and all(out is None for _, out in calls)  # own output: beta 0
    assert matmul_tuning.tuned[-1][1][1] == float("inf")  # the failing candidate is never chosen

    # a second plan of the same key (a new process, say) takes the cached choice and times nothing
    matmul_tuning._choices = None
    calls.clear()
    again = FakePlan(4)
    matmul_tuning.choose(again, ("key", 1), runner(tuning, [1, 1, 1, 1], calls), 128, False, 0, 1)
    assert again.choice == 2 and calls == []


def test_ties_keep_the_heuristics_first_choice(tuning):
    plan = FakePlan(3)
    matmul_tuning.choose(plan, ("tie",), runner(tuning, [1.0, 0.99, 1.2], []), 128, False, 0, 1)
    assert plan.choice == 0


def test_accumulating_products_are_timed_into_scratch(tuning):
    calls = []
    plan = FakePlan(2)
    matmul_tuning.choose(plan, ("acc",), runner(tuning, [1.0, 0.5], calls), 128, True, 0, 1)
    assert plan.choice == 1
    assert calls and all(out is not None for _, out in calls)


def test_disabled_or_single_candidate_times_nothing(tuning, monkeypatch):
    calls = []
    plan = FakePlan(1)
    matmul_tuning.choose(plan, ("one",), runner(tuning, [1.0], calls), 128, False, 0, 1)
    monkeypatch.setattr(matmul_tuning, "ENABLED", False)
    plan = FakePlan(3)
    matmul_tuning.choose(plan, ("off",), runner(tuning, [1.0, 0.1, 0.1], calls), 128, False, 0, 1)
    assert calls == [] and plan.choice is None
