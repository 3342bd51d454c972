"""Global gradient norm (squared), for clipping. After llm.c's global_norm.cuh.

Deterministic, no float atomics: a first kernel, launched once per gradient tensor, has each of
its blocks reduce a grid-strided share of the tensor to one fp32 partial sum and add it into its
own slot of a fixed-size scratch buffer (the first tensor overwrites the slots, so the scratch
needs no zeroing); a second kernel, one block, sums the slots in a fixed order into one fp32 value
on the device. Same grid, same order, same bits on every run.

The partial kernel is a pure read, so its speed is the number of bytes it keeps in flight: HBM3
needs ~40-64 KB outstanding per SM (~8 MB on an H100) to stream at full bandwidth. Each thread
reads bf16 as uint64 words (four values per load) and issues four independent loads before it
adds anything (a thread stalls at the first use of a load, so loads written one per iteration
would keep only 16 KB per SM in flight); at 2048 resident threads per SM that is 64 KB.
The grid is exactly one wave of resident blocks (llm.c's choice: a grid-stride loop over one
wave keeps every SM busy to the end, while a second, partly filled wave would run on its own
after the first and double the time of a tensor); max_registers=32 keeps the kernel at full
occupancy, which the wave count assumes. The scratch holds one slot per block, so its size sets
the grid, and with it the summation order.

Also here: block-wide sum and max (warp shuffles, then one value per warp through shared memory),
used by the classifier too.
"""

import numpy as np
from numba import cuda, float32

from .bf16 import bf16_to_float, bf16x2_high, bf16x2_low, high_half, low_half
from .cuda_common import SIMULATOR, WARP_SIZE, block_reduce_sum, check_contiguous, device_address, device_function, \
    kernel


@device_function
def sum_of_squares_bf16x4(word):
    a, b = bf16x2_low(low_half(word)), bf16x2_high(low_half(word))
    c, d = bf16x2_low(high_half(word)), bf16x2_high(high_half(word))
    return (a * a + b * b) + (c * c + d * d)


@kernel(max_registers=32)
def global_norm_squared_kernel(partials, words, values, accumulate):
    # partials: (gridDim.x,) fp32, one slot per block; words: the first len(values)//4 * 4 values
    # as uint64 words (four bf16 each); values: the whole tensor, for its last 0-3 elements.
    # accumulate: 0 for the first tensor (overwrite the slot), 1 for the rest (add to it).
    # max_registers=32: 2048 threads per SM stay resident, so a grid of global_norm_scratch_size()
    # blocks is exactly one wave (a block that had to wait for a second wave would double the time).
    shared = cuda.shared.array(32, float32)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    n = words.shape[0]
    accumulator = float32(0.0)
    # Four independent loads before any arithmetic: a thread stalls at the first use of a load, so
    # this keeps 4 x 8 B x 2048 threads = 64 KB in flight per SM, what HBM3 needs to stream.
    while i + 3 * stride < n:
        w0 = words[i]
        w1 = words[i + stride]
        w2 = words[i + 2 * stride]
        w3 = words[i + 3 * stride]
        accumulator += (sum_of_squares_bf16x4(w0) + sum_of_squares_bf16x4(w1)) \
            + (sum_of_squares_bf16x4(w2) + sum_of_squares_bf16x4(w3))
        i += 4 * stride
    while i < n:  # the last 0-3 words of this thread
        accumulator += sum_of_squares_bf16x4(words[i])
        i += stride
    if cuda.grid(1) == 0:
        for j in range(4 * n, values.shape[0]):
            x = bf16_to_float(values[j])
            accumulator += x * x
    block_sum = block_reduce_sum(accumulator, shared)
    if cuda.threadIdx.x == 0:
        if accumulate:
            partials[cuda.blockIdx.x] += block_sum
        else:
            partials[cuda.blockIdx.x] = block_sum


@kernel
def global_norm_aggregate_kernel(out, partials):
    # out: (1,) fp32 <- the sum of partials, always added in the same order; one block
    shared = cuda.shared.array(32, float32)
    accumulator = float32(0.0)
    for j in range(cuda.threadIdx.x, partials.shape[0], cuda.blockDim.x):
        accumulator += partials[j]
    total = block_reduce_sum(accumulator, shared)
    if cuda.threadIdx.x == 0:
        out[0] = total


PTX_SIGNATURES = {
    global_norm_squared_kernel: "void(float32[::1], uint64[::1], uint16[::1], int32)",
    global_norm_aggregate_kernel: "void(float32[::1], float32[::1])",
}

BLOCK_SIZE = 512
AGGREGATE_BLOCK_SIZE = 1024


def global_norm_scratch_size(block_size=BLOCK_SIZE):
    """Number of fp32 partial sums (= blocks per tensor) for global_norm_squared's scratch: one
    wave of resident blocks on the current GPU (528 on an H100 SXM with 512 threads a block).
    Allocate the scratch once: cuda.device_array(global_norm_scratch_size(), np.float32)."""
    if SIMULATOR:
        return 4
    device = cuda.get_current_device()
    # an SM also holds at most MAX_BLOCKS_PER_MULTIPROCESSOR blocks (32 on Hopper): small blocks
    # must not be counted past it, or the grid would need a second wave
    blocks_per_sm = min(device.MAX_THREADS_PER_MULTIPROCESSOR // block_size, device.MAX_BLOCKS_PER_MULTIPROCESSOR)
    return device.MULTIPROCESSOR_COUNT * blocks_per_sm


def _validate_block_size(name, block_size):
    if block_size % WARP_SIZE or not WARP_SIZE <= block_size <= 1024:
        raise ValueError(f"{name}: block_size must be a multiple of 32 in [32, 1024], got {block_size}")


def global_norm_squared(out, scratch, grads, block_size=BLOCK_SIZE, stream=0):
    """out[0] = sum of the squares of every element of grads (fp32, on the device, no sync).

    out: (1,) fp32 device array. grads: one bf16 (uint16) device array of any shape, or a list of
    them. scratch: (n,) fp32 device array of partial sums; n is the number of blocks per tensor,
    so it must stay the same between runs that should agree bit for bit; size it with
    global_norm_scratch_size(). Its contents on entry do not matter. Each tensor's data must start
    8-byte aligned (every whole allocation does; a view must start at a multiple of 4 elements).
    """
    check_contiguous("out", out, np.float32, (1,))
    check_contiguous("scratch", scratch, np.float32)
    if scratch.ndim != 1 or scratch.shape[0] < 1:
        raise ValueError(f"scratch: expected a non-empty 1-D array, got shape {scratch.shape}")
    _validate_block_size("global_norm_squared", block_size)
    tensors = [grads] if hasattr(grads, "dtype") else list(grads)
    if not tensors:
        raise ValueError("grads: no tensors given")
    for k, grad in enumerate(tensors):
        check_contiguous(f"grads[{k}]", grad, np.uint16)
        if grad.size and device_address(grad) % 8:
            raise ValueError(f"grads[{k}]: data must start 8-byte aligned for uint64 loads")
    grid = scratch.shape[0]
    for k, grad in enumerate(tensors):
        values = grad.reshape(grad.size)
        words = values[: grad.size // 4 * 4].view(np.uint64)
        global_norm_squared_kernel[grid, block_size, stream](scratch, words, values, np.int32(k > 0))
    aggregate_threads = min(AGGREGATE_BLOCK_SIZE, max(WARP_SIZE, -(-grid // WARP_SIZE) * WARP_SIZE))
    global_norm_aggregate_kernel[1, aggregate_threads, stream](out, scratch)
