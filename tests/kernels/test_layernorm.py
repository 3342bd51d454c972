"""LayerNorm forward/backward, residual and fused residual + layernorm kernels against the numpy
reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import layernorm
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

from .helpers import (BF16_ONE_ROUNDING, download_bf16, poisoned_bf16, poisoned_f32, random_bf16,
                      relative_error)

# (B, T, C), then launch sizes: the simulator gets small blocks and grids so that several blocks
# run and each block visits several rows; None takes the launcher's defaults (the real GPU).
SHAPES = [
    pytest.param((2, 3, 20), dict(warps=2, rows=2, blocks=2), id="tiny"),  # C/4 = 5 words: one partial warp
    # 14 rows over 3 blocks of 2 row slots (the last pass half empty); C/4 = 66 words = 2 warps + 2 lanes
    pytest.param((2, 7, 264), dict(warps=2, rows=2, blocks=3), id="multi-block"),
    pytest.param((8, 1024, 768), dict(warps=None, rows=None, blocks=None), id="gpt2-124M", marks=pytest.mark.gpu),
]

# mean and rstd are fp32 sums of at most C exact bf16 values of size ~1: far below 1e-5
STATS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def bf16_input(rng, shape, scale=1.0, shift=0.0):
    """Random values rounded to bf16, off-centre so the mean matters: (device uint16, exact float64)."""
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale) + np.float32(shift))
    return cuda.to_device(bits), from_bf16_bits(bits).astype(np.float64)


def layernorm_params(rng, C):
    weight, weight_ref = bf16_input(rng, (C,), scale=0.2, shift=1.0)
    bias, bias_ref = bf16_input(rng, (C,), scale=0.2)
    return weight, weight_ref, bias, bias_ref


def forward_kwargs(launch):
    return {} if launch["warps"] is None else dict(warps_per_block=launch["warps"])


def backward_kwargs(launch):
    return {} if launch["rows"] is None else dict(rows_per_block=launch["rows"], num_blocks=launch["blocks"])


@pytest.mark.parametrize("shape,launch", SHAPES)
def test_layernorm_forward(rng, shape, launch):
    B, T, C = shape
    inp, inp_ref = bf16_input(rng, shape, scale=2.0, shift=0.5)
    weight, weight_ref, bias, bias_ref = layernorm_params(rng, C)
    out, mean, rstd = poisoned_bf16(shape), poisoned_f32((B, T)), poisoned_f32((B, T))
    layernorm.layernorm_forward(out, mean, rstd, inp, weight, bias, **forward_kwargs(launch))
    out_ref, mean_ref, rstd_ref = reference.layernorm_forward(inp_ref, weight_ref, bias_ref)
    # inputs are exact bf16 values; fp32 arithmetic, the output rounded once to bf16
    assert relative_error(download_bf16(out), out_ref) < BF16_ONE_ROUNDING
    np.testing.assert_allclose(mean.copy_to_host(), mean_ref, **STATS_TOLERANCE)
    np.testing.assert_allclose(rstd.copy_to_host(), rstd_ref, **STATS_TOLERANCE)


@pytest.mark.parametrize("shape,launch", SHAPES)
def test_residual_forward(rng, shape, launch):
    inp1, inp1_ref = random_bf16(rng, shape)
    inp2, inp2_ref = random_bf16(rng, shape)
    out = poisoned_bf16(shape)
    layernorm.residual_forward(out, inp1, inp2)
    # one fp32 add of exact bf16 values, rounded once
    assert relative_error(download_bf16(out), reference.residual_forward(inp1_ref, inp2_ref)) < BF16_ONE_ROUNDING


@pytest.mark.parametrize("shape,launch", SHAPES)
def test_fused_residual_layernorm_forward(rng, shape, launch):
    B, T, C = shape
    inp1, inp1_ref = bf16_input(rng, shape, scale=2.0, shift=0.5)
    inp2, inp2_ref = random_bf16(rng, shape)
    weight, weight_ref, bias, bias_ref = layernorm_params(rng, C)
    residual, normed = poisoned_bf16(shape), poisoned_bf16(shape)
    mean, rstd = poisoned_f32((B, T)), poisoned_f32((B, T))
    layernorm.fused_residual_layernorm_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias,
                                               **forward_kwargs(launch))
    residual_ref, normed_ref, mean_ref, rstd_ref = reference.fused_residual_layernorm_forward(
        inp1_ref, inp2_ref, weight_ref, bias_ref)
    assert relative_error(download_bf16(residual), residual_ref) < BF16_ONE_ROUNDING
    # normalises the residual as stored (rounded to bf16, as llm.c), then rounds once more: two
    # roundings of ~1.1e-3 each add in quadrature, still below the bound
    assert relative_error(download_bf16(normed), normed_ref) < BF16_ONE_ROUNDING
    # the saved statistics are those of the stored (bf16) residual
    _, stored_mean, stored_rstd = reference.layernorm_forward(download_bf16(residual), weight_ref, bias_ref)
    np.testing.assert_allclose(mean.copy_to_host(), stored_mean, **STATS_TOLERANCE)
    np.testing.assert_allclose(rstd.copy_to_host(), stored_rstd, **STATS_TOLERANCE)


def run_backward(rng, shape, launch):
    """Random inputs and random starting gradients; returns the kernel's and the reference's results."""
    B, T, C = shape
    inp, inp_ref = bf16_input(rng, shape, scale=2.0, shift=0.5)
    weight, weight_ref, _, bias_ref = layernorm_params(rng, C)
    dout, dout_ref = random_bf16(rng, shape)
    _, mean_ref, rstd_ref = reference.layernorm_forward(inp_ref, weight_ref, bias_ref)
    mean = cuda.to_device(mean_ref.astype(np.float32))
    rstd = cuda.to_device(rstd_ref.astype(np.float32))
    # gradients start random, of the size of what is added (dweight/dbias sum ~sqrt(B*T) rows), so a
    # kernel that overwrote instead of adding would miss by ~100% of the expected norm
    grad_scale = np.sqrt(B * T)
    dinp, dinp_start = random_bf16(rng, shape)
    dweight, dweight_start = random_bf16(rng, (C,), scale=grad_scale)
    dbias, dbias_start = random_bf16(rng, (C,), scale=grad_scale)
    kwargs = backward_kwargs(launch)
    scratch = cuda.to_device(np.full(layernorm.layernorm_backward_scratch_size(C, kwargs.get(
        "num_blocks", layernorm.BACKWARD_BLOCKS)), np.nan, dtype=np.float32))
    layernorm.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, **kwargs)
    expected = [dinp_start.copy(), dweight_start.copy(), dbias_start.copy()]
    reference.layernorm_backward(*expected, dout_ref, inp_ref, weight_ref, mean_ref, rstd_ref)
    return [dinp, dweight, dbias], expected


@pytest.mark.parametrize("shape,launch", SHAPES)
def test_layernorm_backward(rng, shape, launch):
    actual, expected = run_backward(rng, shape, launch)
    # dinp: start + fp32 sum, rounded once; dweight/dbias: fp32 sums over all rows, added to the
    # start and rounded once
    for name, got, want in zip(["dinp", "dweight", "dbias"], actual, expected):
        assert relative_error(download_bf16(got), want) < BF16_ONE_ROUNDING, name


@pytest.mark.parametrize("shape,launch", [SHAPES[0], SHAPES[2]])  # the simulator itself is deterministic
def test_layernorm_backward_is_deterministic(rng, shape, launch):
    """The same inputs give the same bits (no atomics: fixed summation order)."""
    seed = int(rng.integers(2**32))
    results = []
    for _ in range(2):
        actual, _ = run_backward(np.random.default_rng(seed), shape, launch)
        results.append([a.copy_to_host() for a in actual])
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)


def test_layernorm_rejects_bad_inputs():
    weight = cuda.to_device(np.zeros(6, dtype=np.uint16))
    bits = cuda.to_device(np.zeros((1, 2, 6), dtype=np.uint16))
    mean = cuda.to_device(np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 4"):
        layernorm.layernorm_forward(bits, mean, mean, bits, weight, weight)
    with pytest.raises(TypeError, match="dtype"):
        as_f32 = cuda.to_device(np.zeros((1, 2, 8), dtype=np.float32))
        weight8 = cuda.to_device(np.zeros(8, dtype=np.uint16))
        layernorm.layernorm_forward(as_f32, mean, mean, as_f32, weight8, weight8)
    big = layernorm.MAX_C + 4
    with pytest.raises(ValueError, match="at most"):
        wide = cuda.to_device(np.zeros((1, 1, big), dtype=np.uint16))
        layernorm.residual_forward(wide, wide, wide)  # fine: elementwise has no row limit
        one = cuda.to_device(np.zeros((1, 1), dtype=np.float32))
        wide_weight = cuda.to_device(np.zeros(big, dtype=np.uint16))
        layernorm.layernorm_forward(wide, one, one, wide, wide_weight, wide_weight)
    with pytest.raises(ValueError, match="scratch"):
        C = 8
        x = cuda.to_device(np.zeros((1, 2, C), dtype=np.uint16))
        w = cuda.to_device(np.zeros(C, dtype=np.uint16))
        small = cuda.to_device(np.zeros(2 * C - 1, dtype=np.float32))
        layernorm.layernorm_backward(x, w, w, small, x, x, w, mean, mean)
