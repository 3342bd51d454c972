"""The CUDA libraries nanollm loads (cuBLASLt, cuDNN, NCCL) come with its install: each loads from
the environment `make` built, with no GPU or driver needed. Where one is missing, the error names
the pip package; and importing nanollm needs none of them (CPU-only machines)."""

import os
import subprocess
import sys
import textwrap

import pytest

from nanollm import cuda_libraries


def _mapped(fragment):
    """Files mapped into this process whose path contains fragment."""
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if fragment in line and "/" in line}


@pytest.mark.parametrize("name", sorted(cuda_libraries.LIBRARIES))
def test_library_loads_from_this_environment(name):
    lib = cuda_libraries.LIBRARIES[name]
    try:
        path = cuda_libraries.load(name)
    except cuda_libraries.MissingCudaLibrary as error:
        pytest.fail(f"{error}")
    # from the pip package in this interpreter's environment, not from some other copy on the machine
    assert path.startswith(os.path.realpath(sys.prefix) + os.sep), f"{lib.title} loaded from {path}, outside {sys.prefix}"
    assert any(path.endswith(os.path.join(sub, lib.soname)) for sub in lib.wheel_dirs), path
    assert path in _mapped(lib.soname)
    assert lib.title in cuda_libraries.describe([name]) and path in cuda_libraries.describe([name])


def test_bindings_import_and_find_their_library():
    """The Python bindings nanollm calls are installed and see the loaded libraries."""
    import cudnn  # the cuDNN frontend
    from nccl.bindings import nccl  # noqa: F401  (nccl4py's raw bindings)
    from nvmath.bindings import cublasLt  # noqa: F401

    cuda_libraries.load("cudnn")
    assert hasattr(cudnn, "pygraph"), f"the module 'cudnn' at {cudnn.__file__} is not the cuDNN frontend"
    assert cudnn.backend_version() >= 90000  # cuDNN 9: flash attention's graph API


def test_missing_library_names_the_package(monkeypatch):
    fake = cuda_libraries.CudaLibrary("FakeLib", "libnanollm_fake_missing.so.1", "nvidia-fakelib-cu13",
                                      ("nvidia/fakelib/lib",), "nanollm_fakelib")
    monkeypatch.setitem(cuda_libraries.LIBRARIES, "fakelib", fake)
    with pytest.raises(cuda_libraries.MissingCudaLibrary) as error:
        cuda_libraries.load("fakelib")
    message = str(error.value)
    assert "cannot load FakeLib (libnanollm_fake_missing.so.1)" in message
    assert "install the nvidia-fakelib-cu13 pip package" in message and 'pip install "nanollm[gpu]"' in message
    assert "fakelib" not in cuda_libraries.loaded


# A CPU-only machine, simulated: every dlopen of the three libraries fails, as where the gpu extra
# is not installed. Importing and training-loop set-up must not need them; asking for one says
# which package to install.
CPU_ONLY_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    BLOCKED = ("libcublasLt", "libcublas.", "libcudnn", "libnccl")
    original = ctypes.CDLL.__init__
    def refuse(self, name, *args, **kwargs):
        if name and any(b in str(name) for b in BLOCKED):
            raise OSError(f"{name}: cannot open shared object file (blocked by the test)")
        original(self, name, *args, **kwargs)
    ctypes.CDLL.__init__ = refuse

    import nanollm, nanollm.train, nanollm.model, nanollm.checkpoint, nanollm.interop
    from nanollm.kernels import matmul, attention_cudnn
    from nanollm import cuda_libraries
    result = {"gpu_available": nanollm.train.gpu_available(),
              "cudnn_available": attention_cudnn.is_available(1, 64, 1, 64)[0]}
    try:
        cuda_libraries.load("cublasLt")
        result["cublasLt"] = "loaded"
    except cuda_libraries.MissingCudaLibrary as error:
        result["cublasLt"] = str(error)
    result["mapped"] = sorted({line.split()[-1] for line in open("/proc/self/maps")
                               if any(b in line for b in BLOCKED)})
    print(json.dumps(result))
""")


def test_importing_nanollm_needs_no_gpu_library():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}  # the real numba.cuda, as a user's machine
    proc = subprocess.run([sys.executable, "-c", CPU_ONLY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mapped"] == []
    assert result["gpu_available"] is False and result["cudnn_available"] is False
    assert "install the nvidia-cublas pip package" in result["cublasLt"]


# The cuDNN frontend's wrapper imports PyTorch when it can (seconds of start-up, and PyTorch's own
# CUDA libraries in the process); nanollm loads the frontend without it. A stand-in torch package
# that fails loudly on import shows whether anything imported it, and that it can be imported after.
FAKE_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from nanollm.kernels import attention_cudnn
    result = {"load_error": attention_cudnn._load_error, "torch_imported": "torch" in sys.modules,
              "frontend": attention_cudnn.cudnn is not None}
    try:
        import torch
        result["later_import"] = "no error"
    except RuntimeError as error:
        result["later_import"] = str(error)
    print(json.dumps(result))
""")


def test_cudnn_frontend_loads_without_importing_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('the stand-in torch was imported')\n")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FAKE_TORCH_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["load_error"] is None and result["frontend"], result
    assert result["torch_imported"] is False
    assert result["later_import"] == "the stand-in torch was imported"  # the block was lifted
