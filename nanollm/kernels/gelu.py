"""GELU, tanh approximation (GPT-2's), forward and backward. After llm.c's gelu.cuh.

Elementwise and memory-bound: each thread moves one uint32 word, i.e. two bf16 values, because
wide loads reach ~87% of the copy bandwidth where scalar bf16 loads reach ~60% (DESIGN.md).
In the model the forward is fused into the fc matmul's epilogue (GELU_AUX_BIAS); these kernels
are the stand-alone versions llm.c also keeps, and the reference for that fusion.
"""

import math

import numpy as np
from numba import cuda, float32

from .bf16 import bf16x2_high, bf16x2_low, pack_bf16x2
from .cuda_common import GELU_SCALING_FACTOR, ceil_div, check_contiguous, device_function, kernel


@device_function
def gelu(x):
    cube = float32(0.044715) * x * x * x
    return float32(0.5) * x * (float32(1.0) + math.tanh(float32(GELU_SCALING_FACTOR) * (x + cube)))


@device_function
def gelu_grad(x):
    """d gelu(x) / dx."""
    cube = float32(0.044715) * x * x * x
    tanh_arg = float32(GELU_SCALING_FACTOR) * (x + cube)
    tanh_out = math.tanh(tanh_arg)
    cosh_out = math.cosh(tanh_arg)
    sech_out = float32(1.0) / (cosh_out * cosh_out)
    return (float32(0.5) * (float32(1.0) + tanh_out)
            + x * float32(0.5) * sech_out * float32(GELU_SCALING_FACTOR)
            * (float32(1.0) + float32(3.0 * 0.044715) * x * x))


@kernel
def gelu_forward_kernel(out, inp):
    # out, inp: (N/2,) uint32 words, each two bf16
    i = cuda.grid(1)
    if i < inp.shape[0]:
        word = inp[i]
        out[i] = pack_bf16x2(gelu(bf16x2_low(word)), gelu(bf16x2_high(word)))


@kernel
def gelu_backward_inplace_kernel(d_in_out, inp):
    # d_in_out: (N/2,) uint32 words holding dL/d(gelu out), overwritten with dL/d(inp)
    i = cuda.grid(1)
    if i < inp.shape[0]:
        word = inp[i]
        grad = d_in_out[i]
        d_low = gelu_grad(bf16x2_low(word)) * bf16x2_low(grad)
        d_high = gelu_grad(bf16x2_high(word)) * bf16x2_high(grad)
        d_in_out[i] = pack_bf16x2(d_low, d_high)


PTX_SIGNATURES = {
    gelu_forward_kernel: "void(uint32[::1], uint32[::1])",
    gelu_backward_inplace_kernel: "void(uint32[::1], uint32[::1])",
}

BLOCK_SIZE = 512


def _as_words(name, array):
    check_contiguous(name, array, np.uint16)
    if array.size % 2:
        raise ValueError(f"{name}: element count must be even (kernels move two bf16 per word)")
    return array.reshape(array.size).view(np.uint32)


def gelu_forward(out, inp, stream=0):
    """out = gelu(inp); both bf16 (uint16) arrays of the same shape, e.g. (B, T, 4C)."""
    if out.shape != inp.shape:
        raise ValueError(f"gelu_forward: out {out.shape} and inp {inp.shape} differ")
    out_words, inp_words = _as_words("out", out), _as_words("inp", inp)
    grid = ceil_div(inp_words.shape[0], BLOCK_SIZE)
    gelu_forward_kernel[grid, BLOCK_SIZE, stream](out_words, inp_words)


def gelu_backward_inplace(d_in_out, inp, stream=0):
    """d_in_out holds dL/dout on entry and dL/dinp on exit; inp is the forward's input."""
    if d_in_out.shape != inp.shape:
        raise ValueError(f"gelu_backward_inplace: d_in_out {d_in_out.shape} and inp {inp.shape} differ")
    grad_words, inp_words = _as_words("d_in_out", d_in_out), _as_words("inp", inp)
    grid = ceil_div(inp_words.shape[0], BLOCK_SIZE)
    gelu_backward_inplace_kernel[grid, BLOCK_SIZE, stream](grad_words, inp_words)
