"""Shared pieces of every nanollm kernel: the jit decorators, warp reductions, launch helpers.

Kernels are written once and run in two places: on a real GPU, and on Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), where CI tests them at tiny shapes. The simulator rejects GPU-only
compile options and lacks warp shuffles and libdevice bit casts; `kernel` and `device_function`
drop the options there, and tests/sim_shim.py supplies the rest. Everything is called as
`cuda.xxx` because the simulator swaps the `cuda` module object inside a running kernel.
"""

import ctypes
import math

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


# ---- 16-byte loads -----------------------------------------------------------------------------
# Numba emits one load per array element (8 bytes at most) and never merges neighbours (it cannot
# prove their 16-byte alignment), so these two are inline PTX. The caller guarantees the alignment:
# the element index a multiple of two (uint64) or four (float32) in a 16-byte aligned array. The
# simulator has no intrinsics: there they are plain element reads.

# ---- asynchronous copies global -> shared (sm_80+): loads in flight without registers -------------
# cp.async copies a 4- or 8-byte element from global to shared memory without passing through a
# register: a thread can have many rows in flight where register-held prefetches would cost
# occupancy. Copies are grouped by async_copy_commit(); async_copy_wait(n) returns once at most n
# of the thread's committed groups are still in flight. Each thread sees its own copies after the
# wait; other threads of the block only after a barrier as well. On the simulator the copy is an
# ordinary assignment and commit and wait do nothing.

if SIMULATOR:
    @device_function
    def load_u64x2(array, index):
        """array[index], array[index + 1] (uint64) in one 16-byte load, through the read-only
        (non-coherent) cache: only for data no thread writes while the kernel runs."""
        return array[index], array[index + 1]

    @device_function
    def load_f32x4_coherent(array, index):
        """array[index .. index + 3] (float32) in one 16-byte load that bypasses L1 (ld.cg) and is
        kept in program order: data other blocks of this launch wrote before a fence."""
        return array[index], array[index + 1], array[index + 2], array[index + 3]

    @device_function
    def async_copy(shared, shared_index, source, source_index):
        shared[shared_index] = source[source_index]

    @device_function
    def async_copy_commit():
        pass

    @device_function
    def async_copy_wait(pending):
        pass
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _element_pointer(context, builder, array_type, array, index_type, index):
        array = context.make_array(array_type)(context, builder, value=array)
        index = context.cast(builder, index, index_type, types.intp)
        return cgutils.get_item_pointer(context, builder, array_type, array, [index], wraparound=False)

    def _vector_load(element, count, ptx, side_effect):
        """An intrinsic (array, index) -> UniTuple(element, count) from one PTX vector load."""
        register = {types.uint64: "l", types.float32: "f"}[element]

        def typer(typingctx, array, index):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype == element
                    and isinstance(index, types.Integer)):
                return None
            signature = types.UniTuple(element, count)(array, index)

            def codegen(context, builder, sig, args):
                pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
                value = context.get_value_type(element)
                asm_type = ir.FunctionType(ir.LiteralStructType([value] * count), [pointer.type])
                outputs = ",".join(["=" + register] * count)
                # generic -> global address first: ld.global wants a global-space address
                code = ("{ .reg .u64 address; cvta.to.global.u64 address, $" + str(count) + "; "
                        + ptx + " {" + ", ".join(f"${i}" for i in range(count)) + "}, [address]; }")
                loaded = builder.call(ir.InlineAsm(asm_type, code, outputs + ",l", side_effect=side_effect), [pointer])
                return context.make_tuple(builder, sig.return_type,
                                          [builder.extract_value(loaded, i) for i in range(count)])

            return signature, codegen

        return intrinsic(typer)

    # dout-style inputs: free to schedule (nothing writes them during the kernel)
    load_u64x2 = _vector_load(types.uint64, 2, "ld.global.nc.v2.u64", side_effect=False)
    load_u64x2.__doc__ = "array[index], array[index + 1] (uint64) in one 16-byte read-only load."
    # another block's results after a fence: never hoisted above it, never served from a stale L1
    load_f32x4_coherent = _vector_load(types.float32, 4, "ld.global.cg.v4.f32", side_effect=True)
    load_f32x4_coherent.__doc__ = "array[index .. index + 3] (float32), one 16-byte ld.cg kept in program order."

    @intrinsic
    def async_copy(typingctx, shared, shared_index, source, source_index):
        """cp.async.ca.shared.global of shared[shared_index] = source[source_index] (4 or 8 bytes)."""
        if shared.dtype != source.dtype or shared.dtype.bitwidth not in (32, 64):
            return None
        size = shared.dtype.bitwidth // 8

        def codegen(context, builder, signature, args):
            destination = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
            origin = _element_pointer(context, builder, signature.args[2], args[2], signature.args[3], args[3])
            pointer = ir.IntType(64)
            copy = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [pointer, pointer]),
                                "{ .reg .u64 s, g; cvta.to.shared.u64 s, $0; cvta.to.global.u64 g, $1; "
                                f"cp.async.ca.shared.global [s], [g], {size}; }}", "l,l,~{memory}", side_effect=True)
            builder.call(copy, [builder.ptrtoint(destination, pointer), builder.ptrtoint(origin, pointer)])
        return types.void(shared, shared_index, source, source_index), codegen

    @intrinsic
    def async_copy_commit(typingctx):
        def codegen(context, builder, signature, args):
            commit = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "cp.async.commit_group;", "~{memory}",
                                  side_effect=True)
            builder.call(commit, [])
        return types.void(), codegen

    @intrinsic
    def async_copy_wait(typingctx, pending):
        if not isinstance(pending, types.IntegerLiteral):
            return None  # the count is part of the instruction: a constant

        def codegen(context, builder, signature, args):
            wait = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), f"cp.async.wait_group {pending.literal_value};",
                                "~{memory}", side_effect=True)
            builder.call(wait, [])
        return types.void(pending), codegen


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
