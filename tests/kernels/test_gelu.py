"""GELU forward and backward kernels against the numpy reference."""

import numpy as np
import pytest

from nanollm import reference
from nanollm.kernels import gelu

from .helpers import BF16_ONE_ROUNDING, download_bf16, poisoned_bf16, random_bf16, relative_error

SHAPES = [
    pytest.param((2, 3, 20), id="tiny"),
    pytest.param((2, 5, 1032), id="tail-block"),  # more than one block, partial last block
    pytest.param((8, 1024, 3072), id="gpt2-124M", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_forward(rng, shape):
    inp, inp_ref = random_bf16(rng, shape, scale=2.0)
    out = poisoned_bf16(shape)
    gelu.gelu_forward(out, inp)
    # inputs are exact bf16 values; the kernel computes in fp32 and rounds once to bf16
    assert relative_error(download_bf16(out), reference.gelu_forward(inp_ref)) < BF16_ONE_ROUNDING


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_backward_inplace(rng, shape):
    inp, inp_ref = random_bf16(rng, shape, scale=2.0)
    grad, grad_ref = random_bf16(rng, shape)
    gelu.gelu_backward_inplace(grad, inp)
    assert relative_error(download_bf16(grad), reference.gelu_backward(grad_ref, inp_ref)) < BF16_ONE_ROUNDING


def test_gelu_rejects_sizes_not_multiple_of_4():
    from numba import cuda

    odd = cuda.to_device(np.zeros(6, dtype=np.uint16))
    with pytest.raises(ValueError, match="multiple of 4"):
        gelu.gelu_forward(cuda.to_device(np.zeros(6, dtype=np.uint16)), odd)
