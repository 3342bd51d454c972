"""Compile every nanollm kernel to PTX for sm_90 with no GPU present (run as a subprocess by
tests/test_ptx.py, since the tests' own process runs the CUDA simulator). The kernels compile in
parallel through nanollm.precompile's pool (target "ptx"), the pool the first training run on a
GPU machine uses to fill Numba's cache.

Prints one JSON line: {"module.kernel": null | "error text"}.
"""

import importlib
import json
import pkgutil
import sys

import nanollm.kernels
from nanollm import precompile


def main():
    results = {}
    for info in pkgutil.iter_modules(nanollm.kernels.__path__):  # every module, with or without signatures
        module = importlib.import_module(f"nanollm.kernels.{info.name}")
        signatures = getattr(module, "PTX_SIGNATURES", {})
        for attribute, obj in vars(module).items():
            is_kernel = hasattr(obj, "py_func") and not getattr(obj.targetoptions, "get", lambda k: None)("device")
            if is_kernel and obj.__module__ == module.__name__ and obj not in signatures:
                results[f"{info.name}.{attribute}"] = "kernel has no entry in PTX_SIGNATURES"
    for module_name, kernel_name, _, error in precompile.compile_kernels(precompile.kernel_jobs(), target="ptx"):
        results[f"{module_name.rsplit('.', 1)[-1]}.{kernel_name}"] = error
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
