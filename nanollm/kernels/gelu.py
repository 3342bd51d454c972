"""GELU, tanh approximation (GPT-2's), forward and backward. After llm.c's gelu.cuh.

Elementwise and memory-bound: threads move uint64 words, four bf16 values each. On an H100 one
uint64 word per thread ran at ~1.9 TB/s where one uint32 word ran at 1.2-1.5 TB/s, and fastmath
(tanh.approx, approximate division: errors far below one bf16 rounding) lifted it to ~2.3 TB/s,
85% of the card's copy bandwidth (.scratch experiment, 2026-11-28). On an H200 (4.3 TB/s copy) the
bf16 rounding became the hardware's conversion instruction, and each thread now loads
WORDS_PER_THREAD words before using the first: the forward at 97% of copy (benchmarks/RESULTS.md).
In the model the forward is fused into the fc matmul's epilogue (GELU_AUX_BIAS) and runs here as
-r 1's recompute; the backward is fused into fcproj's DGELU epilogue at -ge 2, or, at -ge 0/1, into
the fc bias gradient's pass (matmul.matmul_backward_bias(pre_gelu=), this module's arithmetic).
These kernels are also the stand-alone versions llm.c keeps, and the reference for those fusions.
"""

import math

from numba import cuda, float32, uint64

from .bf16 import as_words, bf16x2_high, bf16x2_low, high_half, join_halves, low_half, pack_bf16x2_rn
from .cuda_common import GELU_SCALING_FACTOR, SIMULATOR, ceil_div, device_function, kernel


@device_function
def fast_tanh(x):
    """tanh(x) = 1 - 2 / (1 + e^2x): branch-free on the fast ex2 and reciprocal instructions under
    fastmath (libdevice's tanhf branches on |x| and costs several times more). Saturates
    correctly: e^2x -> inf gives 1, e^2x -> 0 gives -1. Error ~1e-7 absolute, far below bf16's."""
    return float32(1.0) - float32(2.0) / (float32(1.0) + math.exp(float32(2.0) * x))


@device_function
def gelu(x):
    cube = float32(0.044715) * x * x * x
    return float32(0.5) * x * (float32(1.0) + fast_tanh(float32(GELU_SCALING_FACTOR) * (x + cube)))


@device_function
def gelu_grad(x):
    """d gelu(x) / dx."""
    cube = float32(0.044715) * x * x * x
    tanh_out = fast_tanh(float32(GELU_SCALING_FACTOR) * (x + cube))
    sech2 = float32(1.0) - tanh_out * tanh_out
    return (float32(0.5) * (float32(1.0) + tanh_out)
            + x * float32(0.5) * sech2 * float32(GELU_SCALING_FACTOR)
            * (float32(1.0) + float32(3.0 * 0.044715) * x * x))


# bf16 rounding by the GPU's cvt.rn.bf16x2.f32 (pack_bf16x2_rn): pack_bf16x2's bits (NaN aside) in
# one instruction instead of about sixteen integer ones per pair (bf16.py), which an H200's
# bandwidth leaves exposed
@device_function
def gelu_bf16x2(word):
    return pack_bf16x2_rn(gelu(bf16x2_low(word)), gelu(bf16x2_high(word)))


@device_function
def gelu_backward_bf16x2(grad, word):
    d_low = gelu_grad(bf16x2_low(word)) * bf16x2_low(grad)
    d_high = gelu_grad(bf16x2_high(word)) * bf16x2_high(grad)
    return pack_bf16x2_rn(d_low, d_high)


@device_function
def gelu_backward_word(grad, word):
    """The GELU backward of a uint64 word of gradients (four bf16) at the pre-activation's word:
    gelu_backward_inplace's arithmetic, and the fc bias gradient's pass (matmul.py)."""
    return join_halves(gelu_backward_bf16x2(low_half(grad), low_half(word)),
                       gelu_backward_bf16x2(high_half(grad), high_half(word)))


# words (four bf16 each) per thread, WORDS_PER_THREAD * blockDim.x a block: a thread's words sit
# blockDim.x apart (each load coalesced across the warp) and are all loaded before the first is
# used. One word per thread kept 16 KB in flight per SM, short of what HBM3 needs (~40-64 KB):
# the forward ran at 74% of copy in the d12 step.
WORDS_PER_THREAD = 4


@kernel(fastmath=True)
def gelu_forward_kernel(out, inp):
    # out, inp: (N/4,) uint64 words, each four bf16
    first = uint64(cuda.blockIdx.x * cuda.blockDim.x * WORDS_PER_THREAD + cuda.threadIdx.x)
    step = uint64(cuda.blockDim.x)
    n = uint64(inp.shape[0])
    words = cuda.local.array(WORDS_PER_THREAD, uint64)  # registers: constant indices once unrolled
    for k in range(WORDS_PER_THREAD):
        i = first + uint64(k) * step
        if i < n:
            words[k] = inp[i]
    for k in range(WORDS_PER_THREAD):
        i = first + uint64(k) * step
        if i < n:
            out[i] = join_halves(gelu_bf16x2(low_half(words[k])), gelu_bf16x2(high_half(words[k])))


@kernel(fastmath=True)
def gelu_backward_inplace_kernel(d_in_out, inp):
    # d_in_out: (N/4,) uint64 words holding dL/d(gelu out), overwritten with dL/d(inp)
    first = uint64(cuda.blockIdx.x * cuda.blockDim.x * WORDS_PER_THREAD + cuda.threadIdx.x)
    step = uint64(cuda.blockDim.x)
    n = uint64(inp.shape[0])
    words = cuda.local.array(WORDS_PER_THREAD, uint64)
    grads = cuda.local.array(WORDS_PER_THREAD, uint64)
    for k in range(WORDS_PER_THREAD):
        i = first + uint64(k) * step
        if i < n:
            words[k] = inp[i]
            grads[k] = d_in_out[i]
    for k in range(WORDS_PER_THREAD):
        i = first + uint64(k) * step
        if i < n:
            d_in_out[i] = gelu_backward_word(grads[k], words[k])


PTX_SIGNATURES = {
    gelu_forward_kernel: "void(uint64[::1], uint64[::1])",
    gelu_backward_inplace_kernel: "void(uint64[::1], uint64[::1])",
}

BLOCK_SIZE = 32 if SIMULATOR else 256  # the simulator runs a Python thread per GPU thread: small blocks there


def gelu_forward(out, inp, stream=0):
    """out = gelu(inp); both bf16 (uint16) arrays of the same shape, e.g. (B, T, 4C)."""
    if out.shape != inp.shape:
        raise ValueError(f"gelu_forward: out {out.shape} and inp {inp.shape} differ")
    out_words, inp_words = as_words("out", out, out.shape), as_words("inp", inp, inp.shape)
    grid = ceil_div(inp_words.shape[0], BLOCK_SIZE * WORDS_PER_THREAD)
    gelu_forward_kernel[grid, BLOCK_SIZE, stream](out_words, inp_words)


def gelu_backward_inplace(d_in_out, inp, stream=0):
    """d_in_out holds dL/dout on entry and dL/dinp on exit; inp is the forward's input."""
    if d_in_out.shape != inp.shape:
        raise ValueError(f"gelu_backward_inplace: d_in_out {d_in_out.shape} and inp {inp.shape} differ")
    grad_words, inp_words = as_words("d_in_out", d_in_out, d_in_out.shape), as_words("inp", inp, inp.shape)
    grid = ceil_div(inp_words.shape[0], BLOCK_SIZE * WORDS_PER_THREAD)
    gelu_backward_inplace_kernel[grid, BLOCK_SIZE, stream](grad_words, inp_words)
