"""llm.c's GPT-2 kernels as Numba @cuda.jit functions, one module per kernel family.

Each module: a header docstring, the kernels, then their launchers (`*_forward`/`*_backward`),
and a `PTX_SIGNATURES` dict naming the types of every kernel so tests compile it for sm_90.
"""
