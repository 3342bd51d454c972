"""LayerNorm forward/backward, residual and fused residual + layernorm kernels against the numpy
reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import layernorm
from nanollm.kernels.bf16 import bf16_ulp, from_bf16_bits, to_bf16_bits
from nanollm.kernels.cuda_common import SIMULATOR

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


def with_variants(shapes, variants, simulated, others_at_first_shape=True):
    """(shape, launch, variant) parameters: every variant at the GPU shapes; on the simulator, which
    is slow, the variants in `simulated` at every shape and the others at the first shape only
    (or nowhere)."""
    params = []
    for index, shape in enumerate(shapes):
        on_gpu = any(mark.name == "gpu" for mark in shape.marks)
        for variant in variants:
            if on_gpu or variant in simulated or (index == 0 and others_at_first_shape):
                params.append(pytest.param(*shape.values, variant, marks=shape.marks, id=f"{shape.id}-{variant}"))
    return params


# v1 against the reference at every shape; a candidate gives v1's bits (tests below), so against
# the reference only at the tiny shape on the simulator
FORWARD_SHAPES = with_variants(SHAPES, layernorm.FORWARD_VARIANTS, ["v1"])
BACKWARD_SHAPES = with_variants(SHAPES, layernorm.BACKWARD_VARIANTS, ["v1"])

# mean and rstd are fp32 sums of at most C exact bf16 values of size ~1: far below 1e-5
STATS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def bf16_input(rng, shape, scale=1.0, shift=0.0, spread=0):
    """Random values rounded to bf16, off-centre so the mean matters: (device uint16, exact float64).
    spread > 0 scales each by 2^k, k uniform in [-spread, spread]: then fp32 sums of a few of them
    are no longer exact, so a change of summation order changes bits (sums of bf16 values of one
    size mostly are exact in fp32, whatever the order)."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(scale) + np.float32(shift)
    if spread:
        values *= np.exp2(rng.integers(-spread, spread + 1, shape)).astype(np.float32)
    bits = to_bf16_bits(values)
    return cuda.to_device(bits), from_bf16_bits(bits).astype(np.float64)


def layernorm_params(rng, C):
    weight, weight_ref = bf16_input(rng, (C,), scale=0.2, shift=1.0)
    bias, bias_ref = bf16_input(rng, (C,), scale=0.2)
    return weight, weight_ref, bias, bias_ref


def forward_kwargs(launch):
    return {} if launch["warps"] is None else dict(warps_per_block=launch["warps"])


def backward_kwargs(launch):
    return {} if launch["rows"] is None else dict(rows_per_block=launch["rows"], num_blocks=launch["blocks"])


@pytest.mark.parametrize("shape,launch,variant", FORWARD_SHAPES)
def test_layernorm_forward(rng, shape, launch, variant):
    B, T, C = shape
    inp, inp_ref = bf16_input(rng, shape, scale=2.0, shift=0.5)
    weight, weight_ref, bias, bias_ref = layernorm_params(rng, C)
    out, mean, rstd = poisoned_bf16(shape), poisoned_f32((B, T)), poisoned_f32((B, T))
    layernorm.layernorm_forward(out, mean, rstd, inp, weight, bias, variant=variant, **forward_kwargs(launch))
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


@pytest.mark.parametrize("shape,launch,variant", FORWARD_SHAPES)
def test_fused_residual_layernorm_forward(rng, shape, launch, variant):
    B, T, C = shape
    inp1, inp1_ref = bf16_input(rng, shape, scale=2.0, shift=0.5)
    inp2, inp2_ref = random_bf16(rng, shape)
    weight, weight_ref, bias, bias_ref = layernorm_params(rng, C)
    residual, normed = poisoned_bf16(shape), poisoned_bf16(shape)
    mean, rstd = poisoned_f32((B, T)), poisoned_f32((B, T))
    layernorm.fused_residual_layernorm_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias,
                                               variant=variant, **forward_kwargs(launch))
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


def run_backward(rng, shape, launch, variants=(None,), with_reference=True, spread=0, inputs=None):
    """Random inputs (spread: see bf16_input) and random starting gradients; each variant runs on
    its own copy of the starting gradients. Returns the kernels' results (dinp, dweight, dbias
    device arrays; a list per variant) and the reference's (or None). `inputs`, a dict, gets the
    float64 values of the inputs and of the starting dinp."""
    B, T, C = shape
    inp, inp_ref = bf16_input(rng, shape, scale=2.0, shift=0.5, spread=spread)
    weight, weight_ref, _, bias_ref = layernorm_params(rng, C)
    dout, dout_ref = bf16_input(rng, shape, spread=spread)
    _, mean_ref, rstd_ref = reference.layernorm_forward(inp_ref, weight_ref, bias_ref)
    mean = cuda.to_device(mean_ref.astype(np.float32))
    rstd = cuda.to_device(rstd_ref.astype(np.float32))
    # gradients start random, of the size of what is added (dweight/dbias sum ~sqrt(B*T) rows), so a
    # kernel that overwrote instead of adding would miss by ~100% of the expected norm
    grad_scale = np.sqrt(B * T)
    starts = [random_bf16(rng, shape), random_bf16(rng, (C,), scale=grad_scale),
              random_bf16(rng, (C,), scale=grad_scale)]
    if inputs is not None:
        inputs.update(inp=inp_ref, weight=weight_ref, dout=dout_ref, mean=mean_ref, rstd=rstd_ref, dinp=starts[0][1])
    kwargs = backward_kwargs(launch)
    scratch = cuda.to_device(np.full(layernorm.layernorm_backward_scratch_size(C, kwargs.get(
        "num_blocks", layernorm.BACKWARD_BLOCKS)), np.nan, dtype=np.float32))
    results = []
    for variant in variants:
        grads = [cuda.to_device(start.copy_to_host()) for start, _ in starts]
        layernorm.layernorm_backward(*grads, scratch, dout, inp, weight, mean, rstd, variant=variant, **kwargs)
        results.append(grads)
    expected = None
    if with_reference:
        expected = [values.copy() for _, values in starts]
        reference.layernorm_backward(*expected, dout_ref, inp_ref, weight_ref, mean_ref, rstd_ref)
    return results, expected


def backward_inputs(rng, shape):
    """Device inputs of one backward: inp, dout, weight, and mean and rstd of inp's forward."""
    inp, _ = bf16_input(rng, shape, scale=2.0, shift=0.5)
    weight, weight_ref, _, bias_ref = layernorm_params(rng, shape[-1])
    dout, _ = bf16_input(rng, shape)
    _, mean_ref, rstd_ref = reference.layernorm_forward(download_bf16(inp), weight_ref, bias_ref)
    return inp, dout, weight, cuda.to_device(mean_ref.astype(np.float32)), cuda.to_device(rstd_ref.astype(np.float32))


@pytest.mark.parametrize("shape,launch,variant", BACKWARD_SHAPES)
def test_layernorm_backward(rng, shape, launch, variant):
    (actual,), expected = run_backward(rng, shape, launch, [variant])
    # dinp: start + fp32 sum, rounded once; dweight/dbias: fp32 sums over all rows, added to the
    # start and rounded once
    for name, got, want in zip(["dinp", "dweight", "dbias"], actual, expected):
        assert relative_error(download_bf16(got), want) < BF16_ONE_ROUNDING, name


@pytest.mark.parametrize("variant", layernorm.BACKWARD_VARIANTS)
@pytest.mark.parametrize("shape,launch", [SHAPES[0], SHAPES[2]])  # the simulator itself is deterministic
def test_layernorm_backward_is_deterministic(rng, shape, launch, variant):
    """The same inputs give the same bits (no atomics: fixed summation order)."""
    (first, second), _ = run_backward(rng, shape, launch, [variant, variant], with_reference=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.copy_to_host(), b.copy_to_host())


@pytest.mark.parametrize("shape,launch,variant", [
    pytest.param(*SHAPES[0].values, layernorm.BACKWARD_VARIANT, id="tiny"),
    pytest.param(*SHAPES[2].values, layernorm.BACKWARD_VARIANT, marks=pytest.mark.gpu, id="gpt2-124M"),
])
def test_layernorm_backward_without_accumulate_overwrites(rng, shape, launch, variant):
    """accumulate=False (the first micro-step after zero_grad): dweight and dbias start poisoned
    (NaN) and end with the bits += leaves in zeros; dinp is still added to."""
    B, T, C = shape
    inp, dout, weight, mean, rstd = backward_inputs(rng, shape)
    start_dinp = random_bf16(rng, shape)[0].copy_to_host()
    kwargs = backward_kwargs(launch)
    scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C, kwargs.get(
        "num_blocks", layernorm.BACKWARD_BLOCKS)), np.float32)
    results = []
    for accumulate in (True, False):
        zeros_or_poison = (lambda s: cuda.to_device(np.zeros(s, np.uint16))) if accumulate else poisoned_bf16
        grads = [cuda.to_device(start_dinp), zeros_or_poison((C,)), zeros_or_poison((C,))]
        layernorm.layernorm_backward(*grads, scratch, dout, inp, weight, mean, rstd, variant=variant,
                                     accumulate=accumulate, **kwargs)
        results.append([g.copy_to_host() for g in grads])
    for name, added, written in zip(["dinp", "dweight", "dbias"], *results):
        np.testing.assert_array_equal(written, added, err_msg=name)
    assert np.isfinite(from_bf16_bits(results[1][1])).all()


# dinp_sums: on the simulator (slow) v5, which fuses the sums, over several blocks and both ways,
# and v1 and v3 (their fallback: matmul_backward_bias over dinp) once each; every case on a GPU
SUMS_CASES = [
    pytest.param((2, 3, 20), dict(warps=2, rows=2, blocks=2), "v5", True, id="tiny-v5-accumulate"),
    pytest.param((2, 3, 20), dict(warps=2, rows=2, blocks=2), "v5", False, id="tiny-v5-overwrite"),
    # 14 rows over 3 blocks of 2 row slots; C/4 = 34 words = a warp and 2 lanes
    pytest.param((2, 7, 136), dict(warps=2, rows=2, blocks=3), "v5", True, id="multi-block-v5-accumulate"),
    pytest.param((2, 3, 20), dict(warps=2, rows=2, blocks=2), "v1", False, id="tiny-v1-overwrite"),
    pytest.param((2, 3, 20), dict(warps=2, rows=2, blocks=2), "v3", True, id="tiny-v3-accumulate"),
] + [pytest.param(*SHAPES[2].values, variant, accumulate, marks=pytest.mark.gpu,
                  id=f"gpt2-124M-{variant}-{'accumulate' if accumulate else 'overwrite'}")
     for variant in layernorm.BACKWARD_VARIANTS for accumulate in (True, False)]


@pytest.mark.parametrize("shape,launch,variant,accumulate", SUMS_CASES)
def test_layernorm_backward_dinp_sums(rng, shape, launch, variant, accumulate):
    """dinp_sums gets dinp's column sums after the update (added to its start, or written over a
    NaN start without accumulate), each within one bf16 rounding of the float64 sum of the
    written dinp plus fp32 summation's error; dinp, dweight and dbias keep the bits of a call
    without dinp_sums."""
    B, T, C = shape
    N = B * T
    inp, dout, weight, mean, rstd = backward_inputs(rng, shape)
    start_dinp = random_bf16(rng, shape)[0].copy_to_host()
    start_grads = [random_bf16(rng, (C,), scale=np.sqrt(N))[0].copy_to_host() for _ in range(2)]
    kwargs = backward_kwargs(launch)
    scratch = poisoned_f32(layernorm.layernorm_backward_scratch_size(C, kwargs.get("num_blocks",
                                                                                   layernorm.BACKWARD_BLOCKS)))
    outputs = []
    sums_start, sums_start_ref = random_bf16(rng, (C,), scale=np.sqrt(N))
    sums = sums_start if accumulate else poisoned_bf16((C,))
    for dinp_sums in (None, sums):
        grads = [cuda.to_device(start_dinp)] + [cuda.to_device(g) for g in start_grads]
        layernorm.layernorm_backward(*grads, scratch, dout, inp, weight, mean, rstd, variant=variant,
                                     accumulate=accumulate, dinp_sums=dinp_sums, **kwargs)
        outputs.append([g.copy_to_host() for g in grads])
    for name, without, with_sums in zip(["dinp", "dweight", "dbias"], *outputs):
        np.testing.assert_array_equal(with_sums, without, err_msg=name)
    dinp = from_bf16_bits(outputs[1][0]).astype(np.float64).reshape(N, C)
    expected = dinp.sum(axis=0) + (sums_start_ref if accumulate else 0.0)
    got = download_bf16(sums)
    bound = bf16_ulp(expected) + N * 2.0 ** -24 * np.abs(dinp).sum(axis=0)
    assert (np.abs(got - expected) <= bound).all(), \
        f"{np.count_nonzero(np.abs(got - expected) > bound)} of {C} column sums off by more than their bound"


# Candidates against v1 on the same inputs: the design keeps every output bit (same per-row
# arithmetic in the same order). N = 7 rows is no multiple of the rows per block, and C/4 = 34
# words is one whole warp and 2 lanes. On a GPU, at the training step's shapes. Inputs span
# 2^-8..2^8 so that fp32 sums are inexact and a different order shows in mean and rstd; in bf16
# outputs (dinp, dweight, dbias) it shows only where it moves a rounding, which the GPU's millions
# of elements catch and the simulator's hundreds mostly do not.
SPREAD = 8
BITS_SHAPES = [
    pytest.param((1, 7, 136), dict(warps=4, rows=2, blocks=2), id="odd"),
    # C/4 = 66 words: 3 warps a row, so the backward's v5 adds the warps' sums in another order than v1
    pytest.param((1, 5, 264), dict(warps=4, rows=1, blocks=2), id="three-warps"),
    pytest.param((64, 1024, 768), dict(warps=None, rows=None, blocks=None), id="d12", marks=pytest.mark.gpu),
    pytest.param((16, 1024, 1600), dict(warps=None, rows=None, blocks=None), id="d48", marks=pytest.mark.gpu),
]
# v3 differs from v2 on a GPU only (the conversion instruction; on the simulator both run integer
# code), so the simulator checks v2
FORWARD_CANDIDATES = with_variants(BITS_SHAPES, layernorm.FORWARD_VARIANTS[1:], ["v2", "v4"], False)
BACKWARD_CANDIDATES = with_variants(BITS_SHAPES, layernorm.BACKWARD_VARIANTS[1:], ["v3", "v5"], False)
# compiled for a GPU, the backward's v3 moves a few dinp outputs per million away from v1's (see the
# module docstring of layernorm): in at most this share of the elements, and by no more than two
# fp32 evaluations of the same formula can differ (dinp_evaluation_bound). v5 adds the warps' row
# sums in another order (a butterfly), on the simulator too: any share may move, within the bound.
BACKWARD_DIFFERING = {"v3": 1e-5, "v5": 1.0}
BACKWARD_V1_BITS_ON_SIMULATOR = ("v3",)


def dinp_evaluation_bound(inputs):
    """Per element, how far two fp32 evaluations of dinp + (w g - mean(w g) - n mean(w g n)) s, then
    rounded to bf16, can land apart when they differ only in rounding (the order or contraction of
    multiply-adds): one bf16 ulp of the result, plus 8 fp32 ulps of each term's size, the row
    means counted at the size of their terms' absolute sums (sums of inputs spread over 2^-8..2^8
    cancel, so a term may be far larger than the result)."""
    x, w, g, mean, rstd, old = (inputs[k] for k in ("inp", "weight", "dout", "mean", "rstd", "dinp"))
    s = rstd[..., None]
    norm = (x - mean[..., None]) * s
    dnorm = w * g
    sum_abs = np.abs(dnorm).mean(axis=-1, keepdims=True)
    sum_abs_norm = np.abs(dnorm * norm).mean(axis=-1, keepdims=True)
    dval = (dnorm - dnorm.mean(axis=-1, keepdims=True) - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * s
    terms = np.abs(old) + (np.abs(dnorm) + sum_abs + np.abs(norm) * sum_abs_norm) * s
    return bf16_ulp(old + dval) + 8 * 2.0 ** -24 * terms


def forward_outputs(variant, shape, launch, inputs, fused):
    """{name: bits} of a forward's outputs (host arrays), written into fresh poisoned buffers."""
    B, T, C = shape
    outputs = {name: poisoned_bf16(shape) for name in (["residual", "normed"] if fused else ["out"])}
    outputs["mean"], outputs["rstd"] = poisoned_f32((B, T)), poisoned_f32((B, T))
    forward = layernorm.fused_residual_layernorm_forward if fused else layernorm.layernorm_forward
    forward(*outputs.values(), *inputs, variant=variant, **forward_kwargs(launch))
    return {name: array.copy_to_host().view(np.uint16 if array.dtype == np.uint16 else np.uint32)
            for name, array in outputs.items()}


@pytest.mark.parametrize("fused", [False, True], ids=["layernorm", "fused"])
@pytest.mark.parametrize("shape,launch,variant", FORWARD_CANDIDATES)
def test_forward_candidate_gives_v1_bits(rng, shape, launch, fused, variant):
    weight, _, bias, _ = layernorm_params(rng, shape[-1])
    inputs = [bf16_input(rng, shape, scale=2.0, shift=0.5, spread=SPREAD)[0]]
    if fused:
        inputs.append(bf16_input(rng, shape, spread=SPREAD)[0])
    want = forward_outputs("v1", shape, launch, inputs + [weight, bias], fused)
    got = forward_outputs(variant, shape, launch, inputs + [weight, bias], fused)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("shape,launch,variant", BACKWARD_CANDIDATES)
def test_backward_candidate_agrees_with_v1(rng, shape, launch, variant):
    """dweight's and dbias's bits of v1 (the same sums in the same order); dinp's bits on the
    simulator (v3), or, where the variant's arithmetic differs, dinp within what rounding
    differences can explain in all but BACKWARD_DIFFERING of the elements."""
    inputs = {}
    (want, got), _ = run_backward(rng, shape, launch, ["v1", variant], with_reference=False, spread=SPREAD,
                                  inputs=inputs)
    for name, a, b in zip(["dinp", "dweight", "dbias"], got, want):
        a, b = a.copy_to_host(), b.copy_to_host()
        if name != "dinp" or (SIMULATOR and variant in BACKWARD_V1_BITS_ON_SIMULATOR):
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        differ = a != b
        assert np.count_nonzero(differ) <= BACKWARD_DIFFERING[variant] * a.size, \
            f"{name}: {np.count_nonzero(differ)} of {a.size} differ"
        if differ.any():
            apart = np.abs(from_bf16_bits(a[differ]).astype(np.float64) - from_bf16_bits(b[differ]))
            bound = dinp_evaluation_bound(inputs)[differ]
            assert (apart <= bound).all(), f"{name}: {apart[apart > bound][:5]} apart, bounds {bound[apart > bound][:5]}"


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
