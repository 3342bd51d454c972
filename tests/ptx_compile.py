"""Compile every nanollm kernel to PTX for sm_90 with no GPU present (run as a subprocess by
tests/test_ptx.py, since the tests' own process runs the CUDA simulator).

Prints one JSON line: {"module.kernel": null | "error text"}.
"""

import importlib
import json
import pkgutil
import sys
import types


def stand_in_hopper():
    """Kernels that call non-inlined device functions ask numba for the current GPU's compute
    capability while compiling; with no GPU that fails at driver init. Answer sm_90."""
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))


def main():
    stand_in_hopper()
    from numba import cuda

    import nanollm.kernels

    results = {}
    for info in pkgutil.iter_modules(nanollm.kernels.__path__):
        module = importlib.import_module(f"nanollm.kernels.{info.name}")
        signatures = getattr(module, "PTX_SIGNATURES", {})
        for name, obj in vars(module).items():
            is_kernel = hasattr(obj, "py_func") and not getattr(obj.targetoptions, "get", lambda k: None)("device")
            if is_kernel and obj.__module__ == module.__name__ and obj not in signatures:
                results[f"{info.name}.{name}"] = "kernel has no entry in PTX_SIGNATURES"
        for fn, signature in signatures.items():
            key = f"{info.name}.{fn.py_func.__name__}"
            try:
                ptx, _ = cuda.compile_ptx(fn.py_func, signature, cc=(9, 0))
                results[key] = None if ".target sm_90" in ptx else "PTX does not target sm_90"
            except Exception as error:  # reported per kernel by the test
                results[key] = f"{type(error).__name__}: {error}"
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
