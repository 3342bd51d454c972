"""Shared pieces of every nanollm kernel: the jit decorators, warp reductions, launch helpers.

Kernels are written once and run in two places: on a real GPU, and on Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), where CI tests them at tiny shapes. The simulator rejects GPU-only
compile options and lacks warp shuffles and libdevice bit casts; `kernel` and `device_function`
drop the options there, and tests/sim_shim.py supplies the rest. Everything is called as
`cuda.xxx` because the simulator swaps the `cuda` module object inside a running kernel.
"""

import ctypes
import math
import os

import numpy as np
from numba import cuda
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)
WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF


def kernel(fn=None, **options):
    """@cuda.jit for a kernel: cached on disk (a second process compiles nothing), lineinfo for
    profilers. Under the simulator only the options it understands are passed on."""
    def wrap(f):
        if SIMULATOR:
            return cuda.jit(f)
        opts = dict(cache=True, lineinfo=True)
        opts.update(options)
        return cuda.jit(**opts)(f)
    return wrap(fn) if fn is not None else wrap


def device_function(fn):
    """@cuda.jit(device=True), inlined: these are small helpers on the hot path."""
    if SIMULATOR:
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, inline="always", cache=True)(fn)


@device_function
def warp_reduce_sum(value):
    """Sum over the 32 lanes of a warp; every lane gets the result. All lanes must call it."""
    offset = 16
    while offset > 0:
        value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@device_function
def warp_reduce_max(value):
    """Max over the 32 lanes of a warp; every lane gets the result. All lanes must call it."""
    offset = 16
    while offset > 0:
        value = max(value, cuda.shfl_xor_sync(FULL_MASK, value, offset))
        offset //= 2
    return value


@device_function
def block_reduce_sum(value, shared):
    """Sum over the block; every thread gets the result, added in the same fixed order.
    shared: a (32,) fp32 shared array. blockDim.x a multiple of 32; every thread must call."""
    warp = cuda.threadIdx.x // WARP_SIZE
    value = warp_reduce_sum(value)
    if cuda.threadIdx.x % WARP_SIZE == 0:
        shared[warp] = value
    cuda.syncthreads()
    total = shared[0]
    for w in range(1, cuda.blockDim.x // WARP_SIZE):
        total += shared[w]
    cuda.syncthreads()  # the caller may reuse shared at once
    return total


@device_function
def block_reduce_max(value, shared):
    """Max over the block, as block_reduce_sum."""
    warp = cuda.threadIdx.x // WARP_SIZE
    value = warp_reduce_max(value)
    if cuda.threadIdx.x % WARP_SIZE == 0:
        shared[warp] = value
    cuda.syncthreads()
    biggest = shared[0]
    for w in range(1, cuda.blockDim.x // WARP_SIZE):
        biggest = max(biggest, shared[w])
    cuda.syncthreads()
    return biggest


def variant_from_environment(name, choices, default):
    """The kernel variant the environment variable `name` picks (default when it is unset), checked
    against `choices`: read once, at the import of the kernel module."""
    return check_variant(os.environ.get(name, default), choices, name)


def check_variant(variant, choices, what="variant"):
    """`variant` if it is one of `choices`, else a ValueError naming `what` (a launcher's argument or
    the environment variable it came from)."""
    if variant not in choices:
        raise ValueError(f"{what}={variant!r}: expected one of {', '.join(choices)}")
    return variant


def allow_large_dynamic_shared_memory(dispatcher, signature):
    """Let a kernel take all the shared memory a block may have (227 KB on Hopper) where CUDA allows
    48 KB of dynamic shared memory unless told otherwise, and prefer shared memory to L1 in the
    split. Returns the bytes of dynamic shared memory it may now be launched with. Compiles (or
    loads) the kernel for `signature`, the types it will be launched with. Numba has no call for
    this: the driver's attribute call on the compiled kernel (numba-cuda 0.30's internals)."""
    from numba.core import sigutils
    from numba.cuda.cudadrv.driver import binding, driver

    compiled = dispatcher.compile(sigutils.normalize_signature(signature)[0])
    function = compiled._codelibrary.get_cufunc()
    device = function.device
    allowed = device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN - function.attrs.shared  # less its static arrays
    attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attribute, allowed, function.handle, device.id)
    function.set_shared_memory_carveout(100)  # percent of the unified L1/shared array given to shared
    return allowed


def device_address(array):
    """Where an array's data starts (host address under the simulator): wide loads need alignment."""
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


def device_pointer(array):
    """The integer device address of a Numba (or any __cuda_array_interface__) array: what
    cuBLASLt and cuDNN take."""
    try:
        return int(array.__cuda_array_interface__["data"][0])
    except AttributeError:
        raise TypeError(f"expected a device array (__cuda_array_interface__), got {type(array).__name__}") from None


def stream_handle(stream):
    """0 / an int handle / a Numba Stream -> the integer cudaStream_t the libraries want."""
    if isinstance(stream, int):
        return stream
    handle = stream.handle
    if isinstance(handle, ctypes.c_void_p):  # Numba without the NVIDIA binding
        return handle.value or 0
    return int(handle)


def ceil_div(a, b):
    return (a + b - 1) // b


def check_contiguous(name, array, dtype, shape=None):
    """Launchers check what the kernels cannot: a wrong dtype or shape would silently read garbage."""
    if array.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(array.shape)}")
    if not _is_c_contiguous(array):
        raise ValueError(f"{name}: must be C-contiguous")


def _is_c_contiguous(array):
    flags = getattr(array, "flags", None)
    if flags is not None:
        return bool(flags["C_CONTIGUOUS"])
    return bool(array.is_c_contiguous())


# GELU's tanh approximation constant, shared by gelu.py and the matmul host fallback.
GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)
