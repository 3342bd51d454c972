"""Registers, spills and shared memory of nanollm's kernels as ptxas assigns them for sm_90, with no
GPU: each kernel is compiled to PTX by Numba (its PTX_SIGNATURES entry) and linked to SASS by
nvJitLink (libnvJitLink from the nvidia-cu13 wheels numba-cuda installs), whose verbose log is
ptxas's "Used N registers" line. Registers decide how many blocks fit an SM (65,536 per SM, given
out in units of 8 per thread), so a kernel change can be checked for occupancy before a GPU job.

    python benchmarks/kernel_registers.py [NAME_SUBSTRING ...]      # e.g. layernorm_backward adamw
"""

import ctypes
import glob
import importlib
import os
import pkgutil
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NVJITLINK_INPUT_PTX = 2  # nvJitLinkInputType: NONE, CUBIN, PTX, ...
VERSION = "13_0"  # the first API version of libnvJitLink.so.13: every later library keeps it


def _library():
    import nvidia.cu13
    folders = [os.path.join(path, "lib") for path in nvidia.cu13.__path__]
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "libnvJitLink.so*")))
        if found:
            return ctypes.CDLL(found[0])
    raise SystemExit(f"libnvJitLink not found in {folders}")


def ptxas_info(ptx, arch="sm_90", max_registers=None):
    """ptxas's verbose log for one PTX module linked for `arch` (with a kernel's max_registers cap,
    which Numba hands to the linker, not to the PTX)."""
    lib = _library()
    handle = ctypes.c_void_p()
    flags = [f"-arch={arch}".encode(), b"-verbose"]
    if max_registers:
        flags.append(f"-maxrregcount={max_registers}".encode())
    options = (ctypes.c_char_p * len(flags))(*flags)

    def call(name, *args):
        result = getattr(lib, f"__nvJitLink{name}_{VERSION}")(*args)
        if result != 0:
            raise RuntimeError(f"nvJitLink{name} returned {result}: {log()}")

    def log():
        size = ctypes.c_size_t()
        lib[f"__nvJitLinkGetErrorLogSize_{VERSION}"](handle, ctypes.byref(size))
        text = ctypes.create_string_buffer(size.value + 1)
        lib[f"__nvJitLinkGetErrorLog_{VERSION}"](handle, text)
        return text.value.decode(errors="replace")

    call("Create", ctypes.byref(handle), len(flags), options)
    data = ptx.encode()
    call("AddData", handle, NVJITLINK_INPUT_PTX, data, len(data), b"kernel.ptx")
    call("Complete", handle)
    size = ctypes.c_size_t()
    lib[f"__nvJitLinkGetInfoLogSize_{VERSION}"](handle, ctypes.byref(size))
    text = ctypes.create_string_buffer(size.value + 1)
    lib[f"__nvJitLinkGetInfoLog_{VERSION}"](handle, text)
    lib[f"__nvJitLinkDestroy_{VERSION}"](ctypes.byref(handle))
    return text.value.decode(errors="replace")


def main():
    from numba import cuda

    import nanollm.kernels
    wanted = sys.argv[1:]
    print(f"{'kernel':60} {'registers':>9} {'stack (B)':>9} {'spill st/ld (B)':>15} {'smem (B)':>8}")
    for info in pkgutil.iter_modules(nanollm.kernels.__path__):
        module = importlib.import_module(f"nanollm.kernels.{info.name}")
        for kernel, signature in getattr(module, "PTX_SIGNATURES", {}).items():
            name = f"{info.name}.{kernel.__name__}"
            if wanted and not any(w in name for w in wanted):
                continue
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0), lineinfo=False,
                                      **({"launch_bounds": kernel.targetoptions["launch_bounds"]}
                                         if kernel.targetoptions.get("launch_bounds") else {}))
            text = ptxas_info(ptx, max_registers=kernel.targetoptions.get("max_registers"))
            registers = re.search(r"Used (\d+) registers", text)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            smem = re.search(r"(\d+) bytes smem", text)
            stack = re.search(r"(\d+) bytes stack frame", text)
            print(f"{name:60} {registers.group(1) if registers else '?':>9} {stack.group(1) if stack else '?':>9} "
                  f"{(spills.group(1) + '/' + spills.group(2)) if spills else '?':>15} "
                  f"{smem.group(1) if smem else '0':>8}")


if __name__ == "__main__":
    main()
