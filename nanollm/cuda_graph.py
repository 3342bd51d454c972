"""Replay a fixed sequence of launches as a CUDA graph: one launch instead of hundreds.

A GPT-2 d12 micro-step is ~600 launches (Numba kernels, cuBLASLt, cuDNN). Queuing them from Python
costs ~130 ms of host time at B=64, T=1024, more than the GPU needs to run them (~118 ms), so the
eager step is host-bound. Captured once into a graph (stream capture), the same launches replay
with one cuGraphLaunch. What a graph fixes: every kernel argument, pointer and grid size, so
only sequences whose launches do not change from call to call are captured (the model keys its
graphs by what varies, e.g. the micro-step's loss row), and inputs reach the captured buffers by
copies queued before the replay.

The first call of each key runs eagerly (it compiles and loads kernels, builds cuBLASLt and
cuDNN plans and grows workspaces: none of that may happen during a capture); the second captures
and replays; later calls replay. Capture uses relaxed mode (this thread only).
"""

from numba import cuda

from .kernels.cuda_common import stream_handle

_driver = None


def _cu():
    global _driver
    if _driver is None:
        from cuda.bindings import driver
        _driver = driver
    return _driver


def _check(result, what):
    error = result[0]
    if int(error) != 0:
        name = _cu().cuGetErrorName(error)[1]
        raise RuntimeError(f"CUDA graph {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return result[1] if len(result) > 1 else None  # the calls used here return (error,) or (error, value)


def is_supported():
    """Graphs need a real GPU and the NVIDIA CUDA Python bindings (not the simulator)."""
    from numba import config
    if config.ENABLE_CUDASIM:
        return False
    try:
        _cu()
    except ImportError:
        return False
    return True


class GraphReplayer:
    """run(key, queue) queues `queue()`'s launches on `stream`: eagerly the first time a key is
    seen, captured into a graph the second time, replayed from then on."""

    def __init__(self, stream):
        self.stream = stream
        self._seen = set()
        self._graphs = {}  # key -> executable graph
        self._sources = {}  # key -> the captured graph (kept alive with its executable)

    def run(self, key, queue):
        executable = self._graphs.get(key)
        if executable is None:
            if key not in self._seen:
                self._seen.add(key)
                queue()
                return
            executable = self._capture(key, queue)
        _check(_cu().cuGraphLaunch(executable, stream_handle(self.stream)), "launch")

    def _capture(self, key, queue):
        cu = _cu()
        handle = stream_handle(self.stream)
        _check(cu.cuStreamBeginCapture(handle, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED),
               "begin capture")
        try:
            queue()
        except BaseException:
            cu.cuStreamEndCapture(handle)  # leave the stream usable; the error is queue()'s
            raise
        graph = _check(cu.cuStreamEndCapture(handle), f"capture of {key!r}")
        executable = _check(cu.cuGraphInstantiate(graph, 0), f"instantiation of {key!r}")
        self._sources[key], self._graphs[key] = graph, executable
        return executable

    @property
    def captured(self):
        """Keys replayed from a graph now."""
        return sorted(self._graphs, key=repr)

    def clear(self):
        """Destroy every graph (e.g. before the buffers they point into are freed)."""
        if self._graphs:
            cuda.synchronize()
            cu = _cu()
            for key, executable in self._graphs.items():
                cu.cuGraphExecDestroy(executable)
                cu.cuGraphDestroy(self._sources[key])
        self._graphs.clear()
        self._sources.clear()
        self._seen.clear()
