"""The CUDA libraries nanollm loads, found in nanollm's own Python environment first.

    cuBLASLt  libcublasLt.so.13  every matrix product (through nvmath-python)    pip: nvidia-cublas
    cuDNN     libcudnn.so.9      flash attention (through the cuDNN frontend)     pip: nvidia-cudnn-cu13
    NCCL      libnccl.so.2       several GPUs (through nccl4py)                  pip: nvidia-nccl-cu13

`pip install "nanollm[gpu]"` (what `make train` does on a machine with a GPU, and `make test`
everywhere) installs all three; the NVIDIA driver is the only thing a GPU machine needs besides.

The bindings (nvmath-python, the cuDNN frontend, nccl4py) each look for their library on their own,
some only in the interpreter's site-packages, some only on the loader's search path, and fail
with a message from deep inside the binding, or (the cuDNN frontend) silently. So nanollm loads
each library itself, before the binding's first call, RTLD_GLOBAL: from a pip package's folder
in this environment (site-packages, then every sys.path entry, so `pip install --target DIR` on
PYTHONPATH works too), else through cuda-pathfinder (conda, the loader's search path, CUDA_HOME).
A later dlopen of the same soname, by the binding or by the library itself, gets that copy. The
file loaded is recorded (`loaded`) so a run can print it, and a missing library is a
MissingCudaLibrary naming the pip package to install.

Nothing here touches a GPU or needs the driver: the libraries load without one (a test in
`make test` loads each, which proves the install). Importing nanollm loads none of them.
"""

import ctypes
import os
import sys
import sysconfig
from dataclasses import dataclass


@dataclass(frozen=True)
class CudaLibrary:
    title: str           # as people write it
    soname: str          # what the bindings dlopen
    package: str         # the pip package that ships it (in nanollm's `gpu` extra)
    wheel_dirs: tuple    # where that package puts it, relative to a site-packages folder
    pathfinder_name: str  # cuda-pathfinder's name for it


LIBRARIES = {
    "cublasLt": CudaLibrary("cuBLASLt", "libcublasLt.so.13", "nvidia-cublas", ("nvidia/cu13/lib",), "cublasLt"),
    "cudnn": CudaLibrary("cuDNN", "libcudnn.so.9", "nvidia-cudnn-cu13", ("nvidia/cudnn/lib",), "cudnn"),
    "nccl": CudaLibrary("NCCL", "libnccl.so.2", "nvidia-nccl-cu13", ("nvidia/nccl/lib",), "nccl"),
}

loaded = {}  # name -> absolute path of the file loaded


class MissingCudaLibrary(RuntimeError):
    """A CUDA library nanollm needs did not load; the message names the pip package."""


def site_dirs():
    """site-packages folders in the order to prefer them: sysconfig's purelib and platlib (this
    interpreter's environment), then every sys.path entry (pip --target folders, user site)."""
    dirs = []
    for path in [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *sys.path]:
        if path and os.path.isdir(path) and os.path.realpath(path) not in (os.path.realpath(d) for d in dirs):
            dirs.append(path)
    return dirs


def find_in_wheels(filename, wheel_dirs):
    """The first site_dirs() folder's <wheel_dir>/<filename> that exists, or None."""
    for site in site_dirs():
        for sub in wheel_dirs:
            path = os.path.join(site, sub, filename)
            if os.path.isfile(path):
                return path
    return None


def dlopen(name):
    """(ctypes.CDLL(name, RTLD_GLOBAL), None), or (None, the loader's message)."""
    try:
        return ctypes.CDLL(name, mode=os.RTLD_GLOBAL), None
    except OSError as error:
        return None, str(error)


def load(name):
    """Load library `name` (a key of LIBRARIES) once; returns the absolute path of the file."""
    if name in loaded:
        return loaded[name]
    lib = LIBRARIES[name]
    path = find_in_wheels(lib.soname, lib.wheel_dirs)
    errors = []
    if path is not None:
        handle, error = dlopen(path)
        if handle is None:
            errors.append(error)
            path = None
    if path is None:
        path = _load_with_pathfinder(lib, errors)
    if path is None:
        raise MissingCudaLibrary(
            f"cannot load {lib.title} ({lib.soname}): install the {lib.package} pip package "
            f"(pip install \"nanollm[gpu]\"; make train does this on a machine with a GPU). Searched "
            f"{', '.join(lib.wheel_dirs)} under {site_dirs()}, then the loader's search path"
            + (f" ({'; '.join(errors)})" if errors else ""))
    loaded[name] = os.path.realpath(path)
    return loaded[name]


def _load_with_pathfinder(lib, errors):
    """conda, the loader's search path (LD_LIBRARY_PATH, ld.so.cache), CUDA_HOME: cuda-pathfinder's
    search, the one nvmath-python and nccl4py use themselves."""
    try:
        from cuda import pathfinder
    except ImportError as error:
        errors.append(f"cuda-pathfinder: {error}")
        return None
    try:
        return pathfinder.load_nvidia_dynamic_lib(lib.pathfinder_name).abs_path
    except Exception as error:  # DynamicLibNotFoundError and kin: reported in the message
        errors.append(f"cuda-pathfinder: {error}")
        return None


def describe(names):
    """'cuBLASLt /path/libcublasLt.so.13' for each of names that is loaded, for start-up lines."""
    return "; ".join(f"{LIBRARIES[n].title} {loaded[n]}" for n in names if n in loaded)
