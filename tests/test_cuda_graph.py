"""cuda_graph.GraphReplayer's bookkeeping: eager first, captured second, replayed after, and a
failed capture leaves the stream out of capture mode. The driver is a recording fake here (the
simulator has no graphs); `pytest -m gpu` checks graphed training against eager bit for bit
(test_model_gpu.py)."""

import pytest

from nanollm import cuda_graph


class FakeDriver:
    class CUstreamCaptureMode:
        CU_STREAM_CAPTURE_MODE_RELAXED = "relaxed"

    def __init__(self):
        self.calls = []

    def cuStreamBeginCapture(self, stream, mode):
        self.calls.append(("begin", stream, mode))
        return (0,)

    def cuStreamEndCapture(self, stream):
        self.calls.append(("end", stream))
        return (0, f"graph{len(self.calls)}")

    def cuGraphInstantiate(self, graph, flags):
        self.calls.append(("instantiate", graph))
        return (0, f"exec-of-{graph}")

    def cuGraphLaunch(self, executable, stream):
        self.calls.append(("launch", executable, stream))
        return (0,)

    def cuGraphExecDestroy(self, executable):
        self.calls.append(("destroy exec", executable))
        return (0,)

    def cuGraphDestroy(self, graph):
        self.calls.append(("destroy", graph))
        return (0,)

    def cuGetErrorName(self, error):
        return (0, b"CUDA_ERROR_FAKE")


class FakeStream:
    handle = 1234


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(cuda_graph, "_driver", fake)
    return fake


def test_eager_then_capture_then_replay(driver):
    replayer = cuda_graph.GraphReplayer(FakeStream())
    queued = []
    replayer.run("step", lambda: queued.append("step"))
    assert queued == ["step"] and driver.calls == []  # first call: eager
    replayer.run("step", lambda: queued.append("step"))
    assert queued == ["step", "step"]
    assert [c[0] for c in driver.calls] == ["begin", "end", "instantiate", "launch"]
    assert driver.calls[0] == ("begin", 1234, "relaxed")
    driver.calls.clear()
    replayer.run("step", lambda: queued.append("never"))
    assert queued == ["step", "step"]  # replayed, not queued again
    assert driver.calls == [("launch", "exec-of-graph2", 1234)]
    assert replayer.captured == ["step"]
    replayer.run(("forward", 1), lambda: queued.append("other key"))  # a new key starts eager
    assert queued[-1] == "other key" and replayer.captured == ["step"]


def test_clear_destroys_graphs_and_starts_over(driver, monkeypatch):
    monkeypatch.setattr(cuda_graph.cuda, "synchronize", lambda: None)
    replayer = cuda_graph.GraphReplayer(FakeStream())
    for _ in range(2):
        replayer.run("step", lambda: None)
    driver.calls.clear()
    replayer.clear()
    assert driver.calls == [("destroy exec", "exec-of-graph2"), ("destroy", "graph2")]
    assert replayer.captured == []
    queued = []
    replayer.run("step", lambda: queued.append(1))  # eager again
    assert queued == [1]


def test_failed_capture_ends_capture_and_reraises(driver):
    replayer = cuda_graph.GraphReplayer(FakeStream())
    replayer.run("step", lambda: None)

    def broken():
        raise ValueError("bad launch")

    with pytest.raises(ValueError, match="bad launch"):
        replayer.run("step", broken)
    assert [c[0] for c in driver.calls] == ["begin", "end"]
    assert replayer.captured == []


def test_driver_errors_are_named(driver, monkeypatch):
    monkeypatch.setattr(driver, "cuGraphInstantiate", lambda graph, flags: (7, None))
    replayer = cuda_graph.GraphReplayer(FakeStream())
    replayer.run("step", lambda: None)
    with pytest.raises(RuntimeError, match="instantiation of 'step' failed: CUDA_ERROR_FAKE"):
        replayer.run("step", lambda: None)


def test_not_supported_on_the_simulator():
    assert cuda_graph.is_supported() is False
