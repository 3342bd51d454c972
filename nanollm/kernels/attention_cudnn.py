"""Causal self-attention through cuDNN's flash attention, after llm.c's llmc/cudnn_att.cpp.

llm.c's optional cuDNN path (its fastest build: 516K tok/s on GPT-2 124M against 338K with its own
kernels) hands attention to cuDNN's fused SDPA (FlashAttention-2): no (B,NH,T,T) matrix in memory,
no permutes. Here it goes through the cuDNN frontend's Python graph API (nvidia-cudnn-frontend,
written against 1.16.0), with the same graphs as llm.c:

- q, k, v are strided views straight into the qkv matmul's output (B, T, 3, NH, HS): dims
  (B, NH, T, HS), strides (T*3C, HS, 3C, 1), k and v starting C and 2C elements further on;
- out is written straight into (B, T, NH, HS) = (B, T, C): strides (T*C, HS, C, 1);
- the forward also writes stats (B, NH, T) fp32, the logsumexp of each query's scaled scores
  (natural log), which the backward needs instead of the attention matrix;
- the backward writes dq, dk, dv with q/k/v's strides into dinp (B, T, 3C), which is thereby
  overwritten whole (as llm.c);
- bf16 in and out, fp32 softmax and accumulation, scale 1/sqrt(HS) (a pass-by-value scalar),
  causal mask (top-left diagonal, right bound 0), the deterministic backward algorithm (bitwise
  reproducible runs; the non-deterministic one was only 1.6 ms a d12 step faster on an H200,
  benchmarks/RESULTS.md, session 22).

Building a graph is slow (cuDNN may compile kernels), so graphs are built once per
(B, T, NH, HS, forward/inference/backward) and cached, as llm.c's; a call only fills a variant pack
of raw integer device pointers and executes. One cuDNN handle per process and one workspace
(a Numba device array grown to the largest any built graph asks for) serve every graph.
Build graphs before any CUDA graph capture: a build may allocate (the workspace) and synchronize.

Loading. The frontend's Python module dlopens libcudnn itself: it looks for
<site-packages>/nvidia/cudnn/lib/libcudnn.so.9 under sysconfig's purelib only, else falls back to
dlopen("libcudnn.so.9") (LD_LIBRARY_PATH, the ld.so cache), and silently does nothing if that
fails. It also dlopens libcudart.so.12 / libcudart.so.13 by name when a graph is validated (and
refuses to run if both load), and cuDNN's runtime-compiled engines dlopen libnvrtc. None of those
are found when they were pip-installed into a --target folder on PYTHONPATH or only live in a pip
package's folder (nvidia/cu13/lib). So at import this module has nanollm.cuda_libraries load
libcudnn.so.9, RTLD_GLOBAL, from this environment's nvidia-cudnn-cu13 package first (a later dlopen
by the same soname, from the frontend or from cuDNN, gets that copy), and likewise the CUDA runtime
and NVRTC of cuDNN's CUDA major version when the loader cannot find them by name; only then does
it import the frontend.
Nothing here touches the GPU at import (a rank picks its device first); the handle is created on
first use. Any failure becomes the reason is_available() returns, never an exception at import, so
the model can fall back to attention.py (llm.c's default path) and say why.
"""

import ctypes
import math
import sys

import numpy as np
from numba import cuda

from .. import cuda_libraries, startup
from ..cuda_libraries import dlopen as _dlopen, find_in_wheels as _find_in_wheels
from .cuda_common import SIMULATOR, check_contiguous
from .cuda_common import device_pointer as _pointer, stream_handle as _stream_handle

CUDNN_SONAME = cuda_libraries.LIBRARIES["cudnn"].soname
# where pip packages put the libraries, relative to a site-packages folder
CUDART_WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cu12/lib", "nvidia/cuda_runtime/lib")
NVRTC_WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cu12/lib", "nvidia/cuda_nvrtc/lib")

# Tensor ids of the variant packs (llm.c's UIDs enum; the pass-by-value scale gets one of its own).
Q_UID, K_UID, V_UID, O_UID, STATS_UID, DO_UID, DQ_UID, DK_UID, DV_UID = range(1, 10)

# ---- loading cuDNN and its frontend (at import, no GPU calls) --------------------------------------

cudnn = None  # the frontend module, once loaded
_load_error = None  # why cuDNN cannot be used here (None: loaded)
_load_notes = []  # what was loaded from where, for is_available()'s description


def _load_cudnn_library():
    """libcudnn.so.9 from a pip package's folder or the loader's search path; its CUDA major version."""
    try:
        path = cuda_libraries.load("cudnn")
    except cuda_libraries.MissingCudaLibrary as error:
        raise RuntimeError(str(error)) from None
    lib, _ = _dlopen(path)  # already loaded: the same handle
    _load_notes.append(f"{CUDNN_SONAME} from {path}")
    try:
        get_cudart_version = lib.cudnnGetCudartVersion
    except AttributeError:  # not exported by this build: try both majors below
        return (13, 12)
    get_cudart_version.restype = ctypes.c_size_t
    cudart_version = int(get_cudart_version())  # e.g. 13000
    if cudart_version // 1000 not in (12, 13):
        raise RuntimeError(f"cuDNN at {path} reports CUDA runtime version {cudart_version}: "
                           f"expected a CUDA 12 or 13 build of cuDNN 9 (0 means its sub-library "
                           f"libcudnn_graph.so.9 did not load)")
    return (cudart_version // 1000,)


def _load_cuda_runtime(cuda_majors):
    """The frontend dlopens libcudart.so.12 and libcudart.so.13 by name, and fails if both load."""
    loadable = [name for name in ("libcudart.so.12", "libcudart.so.13") if _dlopen(name)[0] is not None]
    if len(loadable) == 2:
        raise RuntimeError("both libcudart.so.12 and libcudart.so.13 load in this process, and the cuDNN "
                           "frontend refuses to choose ('Multiple libcudart libraries found'): keep one of "
                           "them off LD_LIBRARY_PATH")
    if loadable:
        _load_notes.append(f"{loadable[0]} from the loader search path")
        return
    for major in cuda_majors:
        name = f"libcudart.so.{major}"
        path = _find_in_wheels(name, CUDART_WHEEL_DIRS)
        if path is not None and _dlopen(path)[0] is not None:
            _load_notes.append(f"{name} from {path}")
            return
    raise RuntimeError(f"cannot load the CUDA runtime (libcudart.so.{cuda_majors[0]}), which the cuDNN frontend "
                       f"needs: install the nvidia-cuda-runtime pip package or put the CUDA toolkit's lib64 on "
                       f"LD_LIBRARY_PATH")


def _load_nvrtc(cuda_majors):
    """cuDNN's runtime-compiled engines (flash attention among them) dlopen NVRTC by name."""
    for major in cuda_majors:
        name = f"libnvrtc.so.{major}"
        if _dlopen(name)[0] is not None:
            _load_notes.append(f"{name} from the loader search path")
            return
        path = _find_in_wheels(name, NVRTC_WHEEL_DIRS)
        if path is not None and _dlopen(path)[0] is not None:
            _load_notes.append(f"{name} from {path}")
            return
    # not fatal here: a graph build will say whether an engine needed it
    _load_notes.append(f"libnvrtc.so.{cuda_majors[0]} NOT FOUND (cuDNN's runtime-compiled engines will fail)")


def _load():
    global cudnn
    if SIMULATOR:
        raise RuntimeError("the Numba CUDA simulator is active: no GPU, no cuDNN")
    import importlib.util

    if importlib.util.find_spec("cudnn") is None:
        raise RuntimeError("the cuDNN frontend's Python module is not installed (pip install "
                           "nvidia-cudnn-frontend, or pip install \"nanollm[gpu]\")")
    cuda_majors = _load_cudnn_library()
    _load_cuda_runtime(cuda_majors)
    _load_nvrtc(cuda_majors)
    # The frontend's wrapper module imports PyTorch when it is installed, for helpers nanollm never
    # uses (it hands cuDNN raw pointers): 2-3 s of start-up on a machine with PyTorch, and PyTorch's
    # own copies of the CUDA libraries in the process. An import of torch fails while cudnn loads
    # (the wrapper catches the ImportError), unless the program imported torch itself already.
    block_torch = "torch" not in sys.modules
    if block_torch:
        sys.modules["torch"] = None
    try:
        import cudnn as frontend  # its own loader now finds the libcudnn.so.9 loaded above
    finally:
        if block_torch and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]

    if not hasattr(frontend, "pygraph"):
        raise RuntimeError(f"the module 'cudnn' at {getattr(frontend, '__file__', '?')} is not the cuDNN frontend")
    version = frontend.backend_version()  # cudnnGetVersion(), e.g. 91900
    if version < 90000:
        raise RuntimeError(f"cuDNN {frontend.backend_version_string()} is too old: flash attention here needs cuDNN 9")
    _load_notes.insert(0, f"cuDNN {frontend.backend_version_string()} (CUDA {'/'.join(map(str, cuda_majors))}), "
                          f"frontend {getattr(frontend, '__version__', '?')}")
    cudnn = frontend


try:
    _load()
except Exception as error:  # anything at all: the reason is_available() gives, never an import failure
    _load_error = f"{error}" if isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}"

# ---- the process's handle, workspace and graphs --------------------------------------------------

_handle = None
_handle_error = None
_stream = None  # the stream last set on the handle
_workspace = None
_workspace_ptr = 0
_replaced_workspaces = []  # earlier, smaller workspaces, alive for the CUDA graphs that captured them
_graphs = {}  # (B, T, NH, HS, "forward" | "inference" | "backward") -> built cudnn.pygraph


def _last_cudnn_error():
    try:
        message = cudnn.get_last_error_string()
    except Exception:
        return ""
    return f" (cuDNN: {message})" if message else ""


def _cudnn_handle():
    """The process's cuDNN handle, created on first use on the device Numba has current."""
    global _handle, _handle_error
    if _handle is not None:
        return _handle
    if _load_error is not None:
        raise RuntimeError(f"cuDNN attention is not available: {_load_error}")
    if _handle_error is not None:
        raise RuntimeError(_handle_error)
    try:
        if not cuda.is_available():
            raise RuntimeError("no CUDA GPU is available to Numba")
        cuda.current_context()  # cuDNN (the CUDA runtime) adopts Numba's current (primary) context
        capability = cuda.get_current_device().compute_capability
        if tuple(capability) < (8, 0):
            raise RuntimeError(f"cuDNN flash attention needs compute capability 8.0 or newer, this GPU has "
                               f"{capability[0]}.{capability[1]}")
        _handle = cudnn.create_handle()
    except Exception as error:
        _handle_error = f"cuDNN attention is not available: {error}{_last_cudnn_error()}"
        raise RuntimeError(_handle_error) from error
    return _handle


def _reserve_workspace(nbytes):
    """Grow the shared workspace to at least nbytes (at graph build time, never during a step).
    A replaced buffer is kept, never freed: a CUDA graph captured before the growth (the model's
    step) holds its address, and a graph built later (an evaluation or generation shape) must not
    leave that graph pointing at freed memory."""
    global _workspace, _workspace_ptr
    if nbytes > 0 and (_workspace is None or _workspace.size < nbytes):
        if _workspace is not None:
            _replaced_workspaces.append(_workspace)
        workspace = cuda.device_array(nbytes, dtype=np.uint8)
        _workspace, _workspace_ptr = workspace, _pointer(workspace)


def workspace_bytes():
    """Size of the shared workspace so far (0 before the first graph needing one)."""
    return 0 if _workspace is None else int(_workspace.size)


def _qkv_strides(T, NH, HS):
    # one of q, k, v as (B, NH, T, HS) inside (B, T, 3, NH, HS)
    C = NH * HS
    return [T * 3 * C, HS, 3 * C, 1]


def _out_strides(T, NH, HS):
    # (B, NH, T, HS) inside (B, T, NH, HS)
    C = NH * HS
    return [T * C, HS, C, 1]


def _new_graph():
    return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16,
                         intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT,
                         handle=_cudnn_handle())


def _bf16_tensor(graph, name, uid, dims, strides):
    return graph.tensor(name=name, dim=dims, stride=strides, data_type=cudnn.data_type.BFLOAT16, uid=uid)


def _mark_output(tensor, uid, dims, strides, data_type):
    # one setter per statement: the pybind setters return references, chaining them is not needed
    tensor.set_output(True)
    tensor.set_uid(uid)
    tensor.set_dim(dims)
    tensor.set_stride(strides)
    tensor.set_data_type(data_type)


def _define_forward(graph, B, T, NH, HS, training):
    dims = [B, NH, T, HS]
    q = _bf16_tensor(graph, "Q", Q_UID, dims, _qkv_strides(T, NH, HS))
    k = _bf16_tensor(graph, "K", K_UID, dims, _qkv_strides(T, NH, HS))
    v = _bf16_tensor(graph, "V", V_UID, dims, _qkv_strides(T, NH, HS))
    out, stats = graph.sdpa(name="flash_attention", q=q, k=k, v=v,
                            generate_stats=bool(training),
                            attn_scale=1.0 / math.sqrt(HS),
                            diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                            diagonal_band_right_bound=0)  # causal: key position <= query position
    _mark_output(out, O_UID, dims, _out_strides(T, NH, HS), cudnn.data_type.BFLOAT16)
    if training:
        _mark_output(stats, STATS_UID, [B, NH, T, 1], [NH * T, T, 1, 1], cudnn.data_type.FLOAT)


def _define_backward(graph, B, T, NH, HS):
    dims = [B, NH, T, HS]
    q = _bf16_tensor(graph, "Q", Q_UID, dims, _qkv_strides(T, NH, HS))
    k = _bf16_tensor(graph, "K", K_UID, dims, _qkv_strides(T, NH, HS))
    v = _bf16_tensor(graph, "V", V_UID, dims, _qkv_strides(T, NH, HS))
    out = _bf16_tensor(graph, "O", O_UID, dims, _out_strides(T, NH, HS))
    dout = _bf16_tensor(graph, "dO", DO_UID, dims, _out_strides(T, NH, HS))
    stats = graph.tensor(name="stats", dim=[B, NH, T, 1], stride=[NH * T, T, 1, 1],
                         data_type=cudnn.data_type.FLOAT, uid=STATS_UID)
    dq, dk, dv = graph.sdpa_backward(name="flash_attention_backward", q=q, k=k, v=v, o=out, dO=dout, stats=stats,
                                     attn_scale=1.0 / math.sqrt(HS),
                                     diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                                     diagonal_band_right_bound=0,
                                     use_deterministic_algorithm=True)  # bitwise reproducible, as llm.c
    for tensor, uid in ((dq, DQ_UID), (dk, DK_UID), (dv, DV_UID)):
        _mark_output(tensor, uid, dims, _qkv_strides(T, NH, HS), cudnn.data_type.BFLOAT16)


def _graph(B, T, NH, HS, kind):
    """The built graph for this shape and kind, from the cache or built now (the slow part)."""
    key = (B, T, NH, HS, kind)
    graph = _graphs.get(key)
    if graph is None:
        with startup.accumulate("cuDNN attention graphs: handle, build, plans"):
            graph = _graphs[key] = _build_graph(B, T, NH, HS, kind)
    return graph


def _build_graph(B, T, NH, HS, kind):
    _cudnn_handle()  # raises the plain "not available: why" when cuDNN cannot run here
    stage = "define"
    try:
        graph = _new_graph()
        if kind == "backward":
            _define_backward(graph, B, T, NH, HS)
        else:
            _define_forward(graph, B, T, NH, HS, training=(kind == "forward"))
        stage = "validate"
        graph.validate()
        stage = "build_operation_graph"
        graph.build_operation_graph()
        stage = "create_execution_plans"
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        stage = "check_support"
        graph.check_support()
        stage = "build_plans"
        graph.build_plans()
        stage = "get_workspace_size"
        _reserve_workspace(int(graph.get_workspace_size()))
    except Exception as error:
        raise RuntimeError(f"cuDNN attention {kind} graph (B={B}, T={T}, NH={NH}, HS={HS}) failed at {stage}: "
                           f"{type(error).__name__}: {error}{_last_cudnn_error()}") from error
    return graph


def is_available(B=None, T=None, NH=None, HS=None):
    """(True, what was loaded) if cuDNN flash attention can run here, else (False, why), never raising.
    Given a shape, also builds (and caches) the training forward and backward graphs for it, so a
    shape cuDNN does not support is found here rather than in the first step."""
    if _load_error is not None:
        return False, _load_error
    try:
        _cudnn_handle()
        if B is not None:
            _graph(int(B), int(T), int(NH), int(HS), "forward")
            _graph(int(B), int(T), int(NH), int(HS), "backward")
    except Exception as error:
        return False, str(error)
    return True, "; ".join(_load_notes)


# ---- launchers -------------------------------------------------------------------------------

def _dimensions(inp, NH):
    """B, T, C, HS from inp (B,T,3C); the shape rules both launchers share."""
    if len(inp.shape) != 3 or inp.shape[2] % 3:
        raise ValueError(f"inp: expected shape (B, T, 3C), got {tuple(inp.shape)}")
    B, T, C3 = inp.shape
    C = C3 // 3
    if NH <= 0 or C % NH:
        raise ValueError(f"C={C} is not divisible by NH={NH}")
    HS = C // NH
    if HS % 8:  # cuDNN's SDPA: head size a multiple of 8 (16-byte aligned rows of q, k, v)
        raise ValueError(f"head size HS={HS} must be a multiple of 8 for cuDNN attention")
    return B, T, C, HS


def _aligned_pointer(name, array):
    pointer = _pointer(array)
    if pointer % 16:
        raise ValueError(f"{name}: cuDNN needs 16-byte aligned buffers, got address {pointer:#x}")
    return pointer


def _execute(graph, variant_pack, stream, what):
    global _stream
    handle = _cudnn_handle()
    stream = _stream_handle(stream)
    try:
        if stream != _stream:
            cudnn.set_stream(handle=handle, stream=stream)
            _stream = stream
        graph.execute(variant_pack, _workspace_ptr, handle=handle)
    except Exception as error:
        raise RuntimeError(f"cuDNN attention {what} failed: {type(error).__name__}: {error}"
                           f"{_last_cudnn_error()}") from error


def attention_forward_cudnn(out, stats, inp, NH, stream=0):
    """Causal multi-head attention by cuDNN, as llm.c's attention_forward_cudnn.
    inp: (B,T,3C) bf16, the qkv matmul's output laid out (B, T, 3, NH, HS); only read.
    out: (B,T,C) bf16, written.
    stats: (B,NH,T) fp32, written: each query's logsumexp of its scaled causal scores, for the
      backward; None runs the inference graph, which writes no stats."""
    B, T, C, HS = _dimensions(inp, NH)
    check_contiguous("inp", inp, np.uint16, (B, T, 3 * C))
    check_contiguous("out", out, np.uint16, (B, T, C))
    if stats is not None:
        check_contiguous("stats", stats, np.float32, (B, NH, T))
    graph = _graph(B, T, NH, HS, "forward" if stats is not None else "inference")
    qkv = _aligned_pointer("inp", inp)
    variant_pack = {Q_UID: qkv, K_UID: qkv + 2 * C, V_UID: qkv + 2 * 2 * C,  # bytes: bf16 is 2
                    O_UID: _aligned_pointer("out", out)}
    if stats is not None:
        variant_pack[STATS_UID] = _aligned_pointer("stats", stats)
    _execute(graph, variant_pack, stream, f"forward (B={B}, T={T}, NH={NH}, HS={HS})")


def attention_backward_cudnn(dinp, dout, inp, out, stats, NH, stream=0):
    """Backward of attention_forward_cudnn, as llm.c's attention_backward_cudnn.
    dout: (B,T,C) bf16, the gradient of out.
    inp, out, stats: as the forward read and left them.
    dinp: (B,T,3C) bf16, overwritten with the gradient of inp (dq, dk, dv in the qkv layout; not
      accumulated, as llm.c)."""
    B, T, C, HS = _dimensions(inp, NH)
    check_contiguous("inp", inp, np.uint16, (B, T, 3 * C))
    check_contiguous("dinp", dinp, np.uint16, (B, T, 3 * C))
    check_contiguous("dout", dout, np.uint16, (B, T, C))
    check_contiguous("out", out, np.uint16, (B, T, C))
    check_contiguous("stats", stats, np.float32, (B, NH, T))
    graph = _graph(B, T, NH, HS, "backward")
    qkv = _aligned_pointer("inp", inp)
    dqkv = _aligned_pointer("dinp", dinp)
    variant_pack = {Q_UID: qkv, K_UID: qkv + 2 * C, V_UID: qkv + 2 * 2 * C,
                    O_UID: _aligned_pointer("out", out), DO_UID: _aligned_pointer("dout", dout),
                    STATS_UID: _aligned_pointer("stats", stats),
                    DQ_UID: dqkv, DK_UID: dqkv + 2 * C, DV_UID: dqkv + 2 * 2 * C}
    _execute(graph, variant_pack, stream, f"backward (B={B}, T={T}, NH={NH}, HS={HS})")
