"""cuBLASLt matmuls (forward with BIAS / GELU_AUX_BIAS, backward with DGELU, the bias-gradient
kernels, strided-batched products) against the numpy reference.

On the simulator the products run through matmul's numpy fallback and the bias kernels as Numba
code; under `pytest -m gpu` the same tests run cuBLASLt at GPT-2 124M shapes.
Tolerances: inputs are exact bf16 values, products accumulate in fp32 (error ~1e-6 relative even
over K=8192) and every output is rounded to bf16 once, so BF16_ONE_ROUNDING bounds them all.
"""

import ctypes

import numpy as np
import pytest
from numba import cuda
from nvmath.bindings import cublasLt as real_cublaslt

from nanollm import reference
from nanollm.kernels import gelu, matmul
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

from .helpers import BF16_ONE_ROUNDING, BF16_POISON, download_bf16, poisoned_bf16, random_bf16, relative_error

# (rows = B*T, C, OC)
FORWARD_SHAPES = [
    pytest.param((12, 16, 24), id="tiny"),
    pytest.param((8192, 768, 2304), id="gpt2-qkv", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 768), id="gpt2-attproj", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 3072), id="gpt2-fc", marks=pytest.mark.gpu),
    pytest.param((8192, 3072, 768), id="gpt2-fcproj", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 50304), id="gpt2-lmhead", marks=pytest.mark.gpu),
]

# On a GPU the float64 reference of the big shapes would take minutes: check a random subset of
# output rows (forward, dinp) or dweight rows, exactly, plus every element for NaN (the poison).
CHECKED_ROWS = 512


def _sample(rng, n):
    return np.sort(rng.choice(n, size=min(n, CHECKED_ROWS), replace=False))


def _case(shape, bias, gelu):
    return f"shape (B*T, C, OC)={shape}, bias={bias}, gelu={gelu}"


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
@pytest.mark.parametrize("bias, gelu", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["plain", "bias", "bias-gelu", "gelu"])
def test_matmul_forward(rng, shape, bias, gelu):
    rows, C, OC = shape
    if OC > 3072 and (bias or gelu):
        pytest.skip("the lm head has no bias and no GELU")
    inp, inp_ref = random_bf16(rng, (rows, C))
    weight, weight_ref = random_bf16(rng, (OC, C), scale=1 / np.sqrt(C))  # keeps outputs ~N(0,1): GELU's curved part
    bias_dev, bias_ref = random_bf16(rng, (OC,), scale=0.5) if bias else (None, None)
    out = poisoned_bf16((rows, OC))
    pre_gelu = poisoned_bf16((rows, OC)) if gelu else None
    matmul.matmul_forward(out, inp, weight, bias_dev, pre_gelu)

    check = _sample(rng, rows)
    expected = reference.matmul_forward(inp_ref[check], weight_ref, bias_ref)
    result = download_bf16(out)
    assert np.isfinite(result).all(), f"unwritten (NaN) outputs, {_case(shape, bias, gelu)}"
    if gelu:
        pre = download_bf16(pre_gelu)
        assert np.isfinite(pre).all(), f"unwritten pre_gelu, {_case(shape, bias, gelu)}"
        err = relative_error(pre[check], expected)
        assert err < BF16_ONE_ROUNDING, f"pre_gelu rel. error {err:.2e}, {_case(shape, bias, gelu)}"
        expected = reference.gelu_forward(expected)
    err = relative_error(result[check], expected)
    assert err < BF16_ONE_ROUNDING, f"out rel. error {err:.2e}, {_case(shape, bias, gelu)}"


@pytest.mark.parametrize("shape", [
    pytest.param((12, 16, 24), id="tiny"),
    pytest.param((8192, 768, 768), id="gpt2-attproj", marks=pytest.mark.gpu),
    pytest.param((8192, 3072, 768), id="gpt2-fcproj", marks=pytest.mark.gpu),
    pytest.param((4096, 6400, 1600), id="d48-fcproj", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "plain"])
def test_matmul_forward_adds_the_residual(rng, shape, bias):
    """matmul_forward(out, ..., residual=r): out = r + inp @ weight^T (+ bias), rounded once, into a
    poisoned out; the residual is left as it was."""
    rows, C, OC = shape
    inp, inp_ref = random_bf16(rng, (rows, C))
    weight, weight_ref = random_bf16(rng, (OC, C), scale=1 / np.sqrt(C))
    bias_dev, bias_ref = random_bf16(rng, (OC,), scale=0.5) if bias else (None, None)
    residual, residual_ref = random_bf16(rng, (rows, OC), scale=4.0)
    residual_bits = residual.copy_to_host()
    out = poisoned_bf16((rows, OC))
    matmul.matmul_forward(out, inp, weight, bias_dev, residual=residual)
    check = _sample(rng, rows)
    expected = residual_ref[check] + reference.matmul_forward(inp_ref[check], weight_ref, bias_ref)
    result = download_bf16(out)
    assert np.isfinite(result).all(), f"unwritten (NaN) outputs, {_case(shape, bias, False)}"
    err = relative_error(result[check], expected)
    assert err < BF16_ONE_ROUNDING, f"out rel. error {err:.2e}, {_case(shape, bias, False)}"
    np.testing.assert_array_equal(residual.copy_to_host(), residual_bits)


BACKWARD_SHAPES = [
    pytest.param((12, 16, 24), id="tiny"),
    pytest.param((40, 24, 32), id="tiny-more-partials"),
    pytest.param((8192, 768, 2304), id="gpt2-qkv", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 768), id="gpt2-attproj", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 3072), id="gpt2-fc", marks=pytest.mark.gpu),
    pytest.param((8192, 3072, 768), id="gpt2-fcproj", marks=pytest.mark.gpu),
    pytest.param((8192, 768, 50304), id="gpt2-lmhead", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
@pytest.mark.parametrize("bias, gelu", [(False, False), (True, False), (True, True)],
                         ids=["plain", "bias", "bias-dgelu"])
def test_matmul_backward(rng, shape, bias, gelu):
    rows, C, OC = shape
    if OC > 3072 and (bias or gelu):
        pytest.skip("the lm head has no bias and no GELU before it")
    dout, dout_ref = random_bf16(rng, (rows, OC))
    inp, inp_ref = random_bf16(rng, (rows, C))
    weight, weight_ref = random_bf16(rng, (OC, C), scale=1 / np.sqrt(C))
    dweight, dweight_ref = random_bf16(rng, (OC, C))  # nonzero: the backward accumulates
    dbias, dbias_ref = random_bf16(rng, (OC,)) if bias else (None, None)
    pre_gelu, pre_gelu_ref = random_bf16(rng, (rows, C), scale=2.0) if gelu else (None, None)
    dinp = poisoned_bf16((rows, C))  # overwritten, not accumulated
    matmul.matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre_gelu)

    case = _case(shape, bias, gelu)
    check = _sample(rng, rows)
    expected_dinp = dout_ref[check] @ weight_ref
    if gelu:
        expected_dinp = reference.gelu_backward(expected_dinp, pre_gelu_ref[check])
    result_dinp = download_bf16(dinp)
    assert np.isfinite(result_dinp).all(), f"unwritten (NaN) dinp, {case}"
    err = relative_error(result_dinp[check], expected_dinp)
    assert err < BF16_ONE_ROUNDING, f"dinp rel. error {err:.2e}, {case}"

    check_oc = _sample(rng, OC)
    expected_dweight = dweight_ref[check_oc] + dout_ref[:, check_oc].T @ inp_ref
    err = relative_error(download_bf16(dweight)[check_oc], expected_dweight)
    assert err < BF16_ONE_ROUNDING, f"dweight (+=) rel. error {err:.2e}, {case}"
    if bias:
        err = relative_error(download_bf16(dbias), dbias_ref + dout_ref.sum(axis=0))
        assert err < BF16_ONE_ROUNDING, f"dbias (+=) rel. error {err:.2e}, {case}"


@pytest.mark.parametrize("rows, OC, width, block", [
    pytest.param(24, 8, 24, (2, 3), id="first-third"),  # words past the columns summed, rows of 3 slices
    pytest.param(37, 12, 20, (4, 2), id="column-tail-rows-tail"),  # a block wider than the 3 words summed
    pytest.param(65536, 768, 2304, None, id="d12-query-third", marks=pytest.mark.gpu),
    pytest.param(16384, 1600, 4800, None, id="d48-query-third", marks=pytest.mark.gpu),
])
def test_bias_gradient_of_the_first_columns(rng, rows, OC, width, block):
    """row_width: the sums of the first OC columns of wider rows (the query third of dqkv), the bits
    of the same columns summed from a (rows, OC) copy of them; the other columns never read."""
    bits = to_bf16_bits(rng.standard_normal((rows, width)).astype(np.float32))
    dout_ref = from_bf16_bits(bits[:, :OC]).astype(np.float64)
    narrow = cuda.to_device(np.ascontiguousarray(bits[:, :OC]))
    bits[:, OC:] = BF16_POISON  # NaN in any sum that read them
    dout = cuda.to_device(bits)
    dbias_bits = to_bf16_bits(rng.standard_normal(OC).astype(np.float32))
    scratch = cuda.to_device(np.full(matmul.MAX_BIAS_PARTIALS * OC, np.nan, dtype=np.float32))
    for accumulate in (True, False):
        first, whole = cuda.to_device(dbias_bits), cuda.to_device(dbias_bits)
        matmul.matmul_backward_bias(first, dout, scratch, block=block, accumulate=accumulate, row_width=width)
        matmul.matmul_backward_bias(whole, narrow, scratch, block=block, accumulate=accumulate)
        np.testing.assert_array_equal(first.copy_to_host(), whole.copy_to_host())
        expected = dout_ref.sum(axis=0) + (from_bf16_bits(dbias_bits) if accumulate else 0)
        assert relative_error(download_bf16(first), expected) < BF16_ONE_ROUNDING
    with pytest.raises(ValueError, match="at least OC wide"):
        matmul.matmul_backward_bias(first, dout, scratch, row_width=OC - 4)
    with pytest.raises(ValueError, match="expected shape"):
        matmul.matmul_backward_bias(first, dout, scratch, row_width=width + 4)


@pytest.mark.parametrize("rows, OC, block", [
    pytest.param(5, 8, (2, 2), id="rows-tail"),
    pytest.param(37, 44, (4, 4), id="column-tail"),  # 11 words: a partial block of columns
    pytest.param(64, 32, (8, 3), id="odd-block-rows"),  # slices of 24 rows: 8 per thread, then a short slice
    # slices of 16 rows (two rounds of 8 loads per thread), a short last slice, and 69 partial rows:
    # the add kernel's lanes take four rows at a time, then the rest
    pytest.param(1100, 8, (2, 1), id="long-slices-many-partials"),
    pytest.param(8192, 768, None, id="gpt2-768", marks=pytest.mark.gpu),
    pytest.param(8192, 3072, None, id="gpt2-3072", marks=pytest.mark.gpu),
    pytest.param(65536, 768, None, id="gpt2-B64-768", marks=pytest.mark.gpu),
])
def test_matmul_backward_bias(rng, rows, OC, block):
    dout, dout_ref = random_bf16(rng, (rows, OC))
    dbias, dbias_ref = random_bf16(rng, (OC,))
    scratch = cuda.to_device(np.full(matmul.MAX_BIAS_PARTIALS * OC, np.nan, dtype=np.float32))
    matmul.matmul_backward_bias(dbias, dout, scratch, block=block)
    first = dbias.copy_to_host()
    # fp32 sums of exact bf16 values, one rounding when added into dbias
    assert relative_error(download_bf16(dbias), dbias_ref + dout_ref.sum(axis=0)) < BF16_ONE_ROUNDING
    # deterministic: the same inputs give the same bits
    dbias.copy_to_device(to_bf16_bits(dbias_ref))
    matmul.matmul_backward_bias(dbias, dout, scratch, block=block)
    np.testing.assert_array_equal(dbias.copy_to_host(), first)


@pytest.mark.parametrize("rows, OC, block", [
    pytest.param(5, 8, (2, 2), id="rows-tail"),
    pytest.param(64, 44, (4, 3), id="column-tail-odd-block-rows"),
    pytest.param(16384, 6400, None, id="d48-fc", marks=pytest.mark.gpu),
    pytest.param(65536, 3072, None, id="d12-fc", marks=pytest.mark.gpu),
])
def test_bias_gradient_through_gelu(rng, rows, OC, block):
    """matmul_backward_bias(pre_gelu=) writes gelu_backward_inplace's words into dout and adds
    their column sums into dbias, the bits of the two kernels run one after the other."""
    grad, grad_ref = random_bf16(rng, (rows, OC))
    pre_gelu, pre_gelu_ref = random_bf16(rng, (rows, OC))
    dbias_bits = to_bf16_bits(rng.standard_normal(OC).astype(np.float32))
    scratch = cuda.to_device(np.full(matmul.MAX_BIAS_PARTIALS * OC, np.nan, dtype=np.float32))
    separate, separate_dbias = cuda.to_device(grad.copy_to_host()), cuda.to_device(dbias_bits)
    gelu.gelu_backward_inplace(separate, pre_gelu)
    matmul.matmul_backward_bias(separate_dbias, separate, scratch, block=block)
    fused, fused_dbias = grad, cuda.to_device(dbias_bits)
    matmul.matmul_backward_bias(fused_dbias, fused, scratch, block=block, pre_gelu=pre_gelu)
    np.testing.assert_array_equal(fused.copy_to_host(), separate.copy_to_host(), err_msg="d pre_gelu")
    np.testing.assert_array_equal(fused_dbias.copy_to_host(), separate_dbias.copy_to_host(), err_msg="dbias")
    check = _sample(rng, rows)
    expected = reference.gelu_backward(grad_ref[check], pre_gelu_ref[check])
    assert relative_error(download_bf16(fused)[check], expected) < BF16_ONE_ROUNDING
    expected_dbias = from_bf16_bits(dbias_bits).astype(np.float64) + download_bf16(fused).sum(axis=0)
    assert relative_error(download_bf16(fused_dbias), expected_dbias) < BF16_ONE_ROUNDING


@pytest.mark.parametrize("shape", [
    pytest.param((12, 16, 24), id="tiny"),
    pytest.param((16384, 1600, 6400), id="d48-fc", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("through_gelu", [False, True], ids=["bias", "gelu-bias"])
def test_backward_without_accumulate_overwrites(rng, shape, through_gelu):
    """accumulate=False (the first micro-step after zero_grad): dweight and dbias start poisoned
    (NaN) and end with the values += gives into zeros -- nothing of the old contents read --
    the bias bit for bit, the weight gradient as values (beta 0 may keep a product's -0.0)."""
    rows, C, OC = shape
    dout, _ = random_bf16(rng, (rows, OC))
    inp, _ = random_bf16(rng, (rows, C))
    weight, _ = random_bf16(rng, (OC, C), scale=1 / np.sqrt(C))
    pre_gelu, _ = random_bf16(rng, (rows, OC), scale=2.0)
    scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * OC, dtype=np.float32)
    results = []
    for accumulate in (True, False):
        dweight = cuda.to_device(np.zeros((OC, C), np.uint16)) if accumulate else poisoned_bf16((OC, C))
        dbias = cuda.to_device(np.zeros(OC, np.uint16)) if accumulate else poisoned_bf16((OC,))
        grad, dinp = cuda.to_device(dout.copy_to_host()), cuda.device_array((rows, C), np.uint16)
        if through_gelu:  # as the model at -ge 0/1: fc's bias from the GELU backward's pass
            matmul.matmul_backward_bias(dbias, grad, scratch, pre_gelu=pre_gelu, accumulate=accumulate)
            matmul.matmul_backward(dinp, dweight, None, grad, inp, weight, accumulate=accumulate)
        else:
            matmul.matmul_backward(dinp, dweight, dbias, grad, inp, weight, dbias_scratch=scratch,
                                   accumulate=accumulate)
        results.append((download_bf16(dweight), dbias.copy_to_host(), grad.copy_to_host()))
    (weight_added, bias_added, grad_added), (weight_written, bias_written, grad_written) = results
    assert np.isfinite(weight_written).all() and np.isfinite(from_bf16_bits(bias_written)).all()
    np.testing.assert_array_equal(weight_written, weight_added)  # float compare: -0.0 == 0.0
    np.testing.assert_array_equal(bias_written, bias_added)
    np.testing.assert_array_equal(grad_written, grad_added)


@pytest.mark.parametrize("shape", [
    pytest.param((12, 16, 24), id="tiny"),
    pytest.param((16384, 768, 50304), id="d12-lm-head-block", marks=pytest.mark.gpu),
])
def test_weight_gradient_in_fp32_over_blocks_then_one_rounding(rng, shape):
    """The chunked lm head's wte gradient: matmul_backward_weight_fp32 writes (first block) and
    adds (the others) unrounded fp32 sums, add_fp32_into_bf16 rounds them into the bf16 gradient
    once (+= or =); dinp per block with matmul_backward_input."""
    rows, C, OC = shape
    dout, dout_ref = random_bf16(rng, (rows, OC))
    inp, inp_ref = random_bf16(rng, (rows, C))
    weight, weight_ref = random_bf16(rng, (OC, C), scale=1 / np.sqrt(C))
    sums = cuda.to_device(np.full((OC, C), np.nan, np.float32))  # poisoned: the first block writes
    dinp = poisoned_bf16((rows, C))
    blocks = [(0, rows // 3), (rows // 3, 2 * rows // 3), (2 * rows // 3, rows)]
    for start, stop in blocks:
        matmul.matmul_backward_input(dinp[start:stop], dout[start:stop], weight)
        matmul.matmul_backward_weight_fp32(sums, dout[start:stop], inp[start:stop], accumulate=start > 0)
    check = _sample(rng, rows)
    err = relative_error(download_bf16(dinp)[check], dout_ref[check] @ weight_ref)
    assert err < BF16_ONE_ROUNDING, f"dinp rel. error {err:.2e}"
    check_oc = _sample(rng, OC)
    expected = dout_ref[:, check_oc].T @ inp_ref
    # fp32 sums of exact bf16 products: far inside one bf16 rounding
    err = relative_error(sums.copy_to_host()[check_oc].astype(np.float64), expected)
    assert err < 1e-5, f"fp32 weight gradient rel. error {err:.2e}"
    for accumulate in (True, False):
        dweight, dweight_ref = random_bf16(rng, (OC, C)) if accumulate else (poisoned_bf16((OC, C)), 0.0)
        matmul.add_fp32_into_bf16(dweight, sums, accumulate=accumulate)
        result = dweight.copy_to_host()
        assert np.isfinite(from_bf16_bits(result)).all(), "unwritten (NaN) gradient"
        # one rounding of (old + the fp32 sum): the bits numpy's float32 sum rounds to
        old = dweight_ref.astype(np.float32) if accumulate else np.float32(0.0)
        np.testing.assert_array_equal(result, to_bf16_bits(old + sums.copy_to_host()))
        err = relative_error(download_bf16(dweight)[check_oc], (dweight_ref[check_oc] if accumulate else 0.0) + expected)
        assert err < BF16_ONE_ROUNDING


def test_add_fp32_into_bf16_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="shape"):
        matmul.add_fp32_into_bf16(cuda.to_device(np.zeros(8, np.uint16)), cuda.to_device(np.zeros(4, np.float32)))
    with pytest.raises(TypeError, match="float32"):
        matmul.add_fp32_into_bf16(cuda.to_device(np.zeros(8, np.uint16)), cuda.to_device(np.zeros(8, np.uint16)))


BATCHED = [
    pytest.param((3, 8, 12, 16), id="tiny"),
    pytest.param((96, 1024, 1024, 64), id="gpt2-attention", marks=pytest.mark.gpu),  # B*NH, T, T, HS
]


@pytest.mark.parametrize("dims", BATCHED)
@pytest.mark.parametrize("transa, transb", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["NN", "NT", "TN", "TT"])
def test_matmul_batched(rng, dims, transa, transb):
    batch, M, N, K = dims
    a, a_ref = random_bf16(rng, (batch, K, M) if transa else (batch, M, K))
    b, b_ref = random_bf16(rng, (batch, N, K) if transb else (batch, K, N))
    out = poisoned_bf16((batch, M, N))
    matmul.matmul_batched(out, a, b, transa, transb)
    op_a = a_ref.transpose(0, 2, 1) if transa else a_ref
    op_b = b_ref.transpose(0, 2, 1) if transb else b_ref
    err = relative_error(download_bf16(out), op_a @ op_b)
    assert err < BF16_ONE_ROUNDING, f"rel. error {err:.2e}, dims {dims}, transa={transa}, transb={transb}"


def test_matmul_batched_alpha_beta(rng):
    a, a_ref = random_bf16(rng, (2, 4, 8))
    b, b_ref = random_bf16(rng, (2, 8, 12))
    out, out_ref = random_bf16(rng, (2, 4, 12))
    matmul.matmul_batched(out, a, b, alpha=0.5, beta=2.0)
    assert relative_error(download_bf16(out), 0.5 * (a_ref @ b_ref) + 2.0 * out_ref) < BF16_ONE_ROUNDING


@pytest.mark.gpu
def test_plans_are_cached(rng):
    """The second call with the same shapes, epilogue and alignments builds nothing."""
    inp, _ = random_bf16(rng, (256, 64))
    weight, _ = random_bf16(rng, (128, 64))
    bias, _ = random_bf16(rng, (128,))
    out, pre_gelu = poisoned_bf16((256, 128)), poisoned_bf16((256, 128))
    matmul.matmul_forward(out, inp, weight, bias, pre_gelu)
    plans = len(matmul._plans)
    for _ in range(3):
        matmul.matmul_forward(out, inp, weight, bias, pre_gelu)
    assert len(matmul._plans) == plans


# ---- bad inputs ----------------------------------------------------------------------------------

def _arrays(shape, dtype=np.uint16):
    return cuda.to_device(np.zeros(shape, dtype=dtype))


def test_forward_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="inp: expected shape"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 6)), _arrays((8, 8)))
    with pytest.raises(ValueError, match="out"):
        matmul.matmul_forward(_arrays((5, 8)), _arrays((4, 8)), _arrays((8, 8)))
    with pytest.raises(ValueError, match="bias"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 8)), _arrays((8, 8)), bias=_arrays((4,)))
    with pytest.raises(ValueError, match="pre_gelu"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 8)), _arrays((8, 8)), pre_gelu=_arrays((4, 4)))
    with pytest.raises(ValueError, match="residual"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 8)), _arrays((8, 8)), residual=_arrays((4, 4)))
    with pytest.raises(ValueError, match="residual and pre_gelu"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 8)), _arrays((8, 8)), pre_gelu=_arrays((4, 8)),
                              residual=_arrays((4, 8)))


def test_forward_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="weight: expected dtype uint16"):
        matmul.matmul_forward(_arrays((4, 8)), _arrays((4, 8)), _arrays((8, 8), np.float32))


def test_backward_rejects_mismatched_shapes():
    dout, inp, weight = _arrays((4, 8)), _arrays((4, 6)), _arrays((8, 6))
    with pytest.raises(ValueError, match="dweight"):
        matmul.matmul_backward(_arrays((4, 6)), _arrays((6, 8)), None, dout, inp, weight)
    with pytest.raises(ValueError, match="dinp"):
        matmul.matmul_backward(_arrays((3, 6)), _arrays((8, 6)), None, dout, inp, weight)
    with pytest.raises(ValueError, match="multiple of 4"):
        matmul.matmul_backward(_arrays((4, 6)), _arrays((6, 6)), _arrays((6,)), _arrays((4, 6)), inp, _arrays((6, 6)))


def test_batched_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        matmul.matmul_batched(_arrays((2, 4, 4)), _arrays((2, 4, 8)), _arrays((2, 4, 4)))
    with pytest.raises(ValueError, match="shapes do not match"):  # batch counts differ
        matmul.matmul_batched(_arrays((2, 4, 4)), _arrays((3, 4, 8)), _arrays((3, 8, 4)))


# ---- the cuBLASLt path, against a numpy stand-in for cuBLASLt -------------------------------------
# CI has no GPU, so the real path (row-major -> column-major mapping, transposes, leading
# dimensions, batch strides, epilogue attributes, alpha/beta, plan caching) runs here against
# FakeCublasLt: cuBLASLt's documented column-major semantics, written independently of matmul.py,
# on host memory posing as device memory. `pytest -m gpu` checks the same against the real library.

class HostAsDevice(np.ndarray):
    """A numpy array that hands out its host address as a device pointer."""

    @property
    def __cuda_array_interface__(self):
        return {"data": (self.ctypes.data, False), "shape": self.shape, "typestr": self.dtype.str, "version": 3}


def host_as_device(array):
    return np.ascontiguousarray(array).view(HostAsDevice)


def _read(pointer, dtype, count=1):
    return np.frombuffer(ctypes.string_at(pointer, np.dtype(dtype).itemsize * count), dtype=dtype)


class FakeCublasLt:
    """What matmul.py calls of nvmath.bindings.cublasLt, computing D = epilogue(alpha op(A) op(B) + beta C)
    with column-major (rows, cols, ld) layouts as cuBLASLt documents them."""

    Epilogue = real_cublaslt.Epilogue
    MatmulDescAttribute = real_cublaslt.MatmulDescAttribute
    MatrixLayoutAttribute = real_cublaslt.MatrixLayoutAttribute
    MatmulPreferenceAttribute = real_cublaslt.MatmulPreferenceAttribute
    MatmulHeuristicResult = real_cublaslt.MatmulHeuristicResult
    cuBLASLtError = real_cublaslt.cuBLASLtError

    MatmulAlgoConfigAttribute = real_cublaslt.MatmulAlgoConfigAttribute
    get_matmul_algo_config_attribute_dtype = staticmethod(real_cublaslt.get_matmul_algo_config_attribute_dtype)

    def __init__(self):
        self.objects = {}
        self.created = 0
        self.calls = 0
        self.answers = 1  # heuristic answers it gives (at most the number asked for)
        self.algorithms = []  # the algorithm (its answer's 1-based rank) of each matmul call

    @staticmethod
    def get_version():
        return 130500

    def _new(self, **fields):
        self.created += 1
        self.objects[self.created] = fields
        return self.created

    def matmul_desc_create(self, compute_type, scale_type):
        assert (compute_type, scale_type) == (68, 0), "expected CUBLAS_COMPUTE_32F with fp32 scale"
        return self._new(TRANSA=0, TRANSB=0, EPILOGUE=1, BIAS_DATA_TYPE=-1)

    def matmul_desc_set_attribute(self, desc, attr, buf, size):
        dtype = np.dtype(real_cublaslt.get_matmul_desc_attribute_dtype(attr))
        assert size == dtype.itemsize, (attr, size)
        self.objects[desc][real_cublaslt.MatmulDescAttribute(attr).name] = _read(buf, dtype)[0].item()

    def matrix_layout_create(self, dtype, rows, cols, ld):
        assert dtype in (14, 0) and ld >= rows, (dtype, rows, cols, ld)  # bf16, or fp32 (D and C only)
        return self._new(dtype=dtype, rows=rows, cols=cols, ld=ld, BATCH_COUNT=1, STRIDED_BATCH_OFFSET=0)

    def matrix_layout_set_attribute(self, layout, attr, buf, size):
        dtype = np.dtype(real_cublaslt.get_matrix_layout_attribute_dtype(attr))
        assert size == dtype.itemsize, (attr, size)
        self.objects[layout][real_cublaslt.MatrixLayoutAttribute(attr).name] = _read(buf, dtype)[0].item()

    def matmul_preference_create(self):
        return self._new()

    def matmul_preference_set_attribute(self, preference, attr, buf, size):
        pass

    def matmul_preference_destroy(self, preference):
        pass

    def matmul_algo_get_heuristic(self, handle, desc, a, b, c, d, preference, requested, results, found):
        size = real_cublaslt.matmul_heuristic_result_dtype.itemsize
        ctypes.memset(results, 0, size * requested)  # state = success
        answers = min(requested, self.answers)
        for rank in range(answers):  # the algorithm's first word: its rank, 1-based
            ctypes.c_uint64.from_address(results + rank * size).value = rank + 1
        ctypes.c_int32.from_address(found).value = answers

    def matmul_algo_config_get_attribute(self, algo, attr, buf, size, written):
        value = _read(algo, np.uint64)[0] if attr == real_cublaslt.MatmulAlgoConfigAttribute.ID else 0
        dtype = np.dtype(real_cublaslt.get_matmul_algo_config_attribute_dtype(attr))
        assert size == dtype.itemsize, (attr, size)
        ctypes.memmove(buf, np.array([value], dtype=dtype).ctypes.data, size)
        ctypes.c_uint64.from_address(written).value = size

    def _matrices(self, pointer, layout):
        """(batch, rows, cols) view of a column-major batched matrix in host memory."""
        L = self.objects[layout]
        batch, stride = L["BATCH_COUNT"], L["STRIDED_BATCH_OFFSET"]
        extent = (batch - 1) * stride + (L["cols"] - 1) * L["ld"] + L["rows"]
        element = ctypes.c_float if L["dtype"] == 0 else ctypes.c_uint16
        size = ctypes.sizeof(element)
        memory = np.ctypeslib.as_array((element * extent).from_address(pointer))
        return np.lib.stride_tricks.as_strided(memory, (batch, L["rows"], L["cols"]), (size * stride, size, size * L["ld"]))

    def matmul(self, handle, desc, alpha, a, a_layout, b, b_layout, beta, c, c_layout, d, d_layout, algo,
               workspace, workspace_size, stream):
        self.calls += 1
        self.algorithms.append(int(_read(algo, np.uint64)[0]))
        D = self.objects[desc]
        assert self.objects[a_layout]["dtype"] == self.objects[b_layout]["dtype"] == 14, "A and B are bf16"
        assert self.objects[c_layout]["dtype"] == self.objects[d_layout]["dtype"]
        fp32_out = self.objects[d_layout]["dtype"] == 0
        A = from_bf16_bits(self._matrices(a, a_layout).copy())
        B = from_bf16_bits(self._matrices(b, b_layout).copy())
        A = A.transpose(0, 2, 1) if D["TRANSA"] == 1 else A
        B = B.transpose(0, 2, 1) if D["TRANSB"] == 1 else B
        out = self._matrices(d, d_layout)
        addend = self._matrices(c, c_layout)  # C: out itself, or matmul_forward's residual
        assert addend.shape == out.shape
        assert A.shape[0] == B.shape[0] == out.shape[0], "batch counts differ"
        assert A.shape[2] == B.shape[1] and (A.shape[1], B.shape[2]) == out.shape[1:], \
            f"op(A) {A.shape} op(B) {B.shape} D {out.shape} do not chain"
        result = _read(alpha, np.float32)[0] * (A @ B)
        beta = _read(beta, np.float32)[0]
        if beta != 0:
            result += beta * (addend.astype(np.float32) if fp32_out else from_bf16_bits(addend.copy()))
        epilogue = real_cublaslt.Epilogue(D["EPILOGUE"])
        if fp32_out:  # unrounded sums, no epilogue
            assert epilogue == self.Epilogue.DEFAULT
            out[...] = result.astype(np.float32)
            return
        m, n = out.shape[1:]
        if epilogue in (self.Epilogue.BIAS, self.Epilogue.GELU_AUX_BIAS):
            assert D["BIAS_DATA_TYPE"] == 14
            result += from_bf16_bits(_read(D["BIAS_POINTER"], np.uint16, m))[:, None]  # one per row of D
        if epilogue in (self.Epilogue.GELU_AUX, self.Epilogue.GELU_AUX_BIAS, self.Epilogue.DGELU):
            ld = D["EPILOGUE_AUX_LD"]
            assert ld >= m
            aux = np.lib.stride_tricks.as_strided(
                np.ctypeslib.as_array((ctypes.c_uint16 * ((n - 1) * ld + m)).from_address(D["EPILOGUE_AUX_POINTER"])),
                (m, n), (2, 2 * ld))
            if epilogue == self.Epilogue.DGELU:
                result = reference.gelu_backward(result, from_bf16_bits(aux.copy()))
            else:
                aux[...] = to_bf16_bits(result[0]).reshape(m, n)
                result = reference.gelu_forward(result)
        out[...] = to_bf16_bits(result).reshape(out.shape)


@pytest.fixture
def fake_cublaslt(monkeypatch):
    # host arrays stand in for device memory: only the simulator's kernels can take them
    if not matmul.SIMULATOR:
        pytest.skip("the cuBLASLt stand-in runs on the simulator; on a GPU the real path is tested")
    fake = FakeCublasLt()
    monkeypatch.setattr(matmul, "cublasLt", fake)
    monkeypatch.setattr(matmul, "SIMULATOR", False)
    monkeypatch.setattr(matmul, "_plans", {})
    monkeypatch.setattr(matmul, "_handle", 1)
    return fake


def _host_bf16(rng, shape, scale=1.0):
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale))
    return host_as_device(bits), from_bf16_bits(bits).astype(np.float64)


def _host_bf16_values(array):
    return from_bf16_bits(np.asarray(array)).astype(np.float64)


def test_cublaslt_path_forward_backward(rng, fake_cublaslt):
    rows, C, OC = 24, 16, 40
    inp, inp_ref = _host_bf16(rng, (2, rows // 2, C))
    weight, weight_ref = _host_bf16(rng, (OC, C), 0.25)
    bias, bias_ref = _host_bf16(rng, (OC,))
    out, pre_gelu = host_as_device(np.full((2, rows // 2, OC), 0xFFFF, np.uint16)), host_as_device(np.zeros((2, rows // 2, OC), np.uint16))
    matmul.matmul_forward(out, inp, weight, bias, pre_gelu)
    expected = reference.matmul_forward(inp_ref, weight_ref, bias_ref)
    assert relative_error(_host_bf16_values(pre_gelu), expected) < BF16_ONE_ROUNDING
    assert relative_error(_host_bf16_values(out), reference.gelu_forward(expected)) < BF16_ONE_ROUNDING
    matmul.matmul_forward(out, inp, weight, bias)
    assert relative_error(_host_bf16_values(out), expected) < BF16_ONE_ROUNDING

    dout, dout_ref = _host_bf16(rng, (2, rows // 2, OC))
    dweight, dweight_ref = _host_bf16(rng, (OC, C))
    dbias, dbias_ref = _host_bf16(rng, (OC,))
    pre, pre_ref = _host_bf16(rng, (2, rows // 2, C), 2.0)
    dinp = host_as_device(np.full((2, rows // 2, C), 0xFFFF, np.uint16))
    matmul.matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre)
    flat_dout = dout_ref.reshape(rows, OC)
    expected_dinp = reference.gelu_backward((flat_dout @ weight_ref).reshape(2, rows // 2, C), pre_ref)
    assert relative_error(_host_bf16_values(dinp), expected_dinp) < BF16_ONE_ROUNDING
    assert relative_error(_host_bf16_values(dweight), dweight_ref + flat_dout.T @ inp_ref.reshape(rows, C)) < BF16_ONE_ROUNDING
    assert relative_error(_host_bf16_values(dbias), dbias_ref + flat_dout.sum(axis=0)) < BF16_ONE_ROUNDING

    # the residual as cuBLASLt's C operand (beta 1), out another array: out = residual + product
    residual, residual_ref = _host_bf16(rng, (2, rows // 2, OC), 4.0)
    matmul.matmul_forward(out, inp, weight, bias, residual=residual)
    assert relative_error(_host_bf16_values(out), residual_ref + expected) < BF16_ONE_ROUNDING
    assert matmul._plans[next(reversed(matmul._plans))].name.endswith("addend=" + str(matmul._alignment(
        residual.__cuda_array_interface__["data"][0])))

    # every product built its plan once: repeating the calls builds nothing more
    plans, created = len(matmul._plans), fake_cublaslt.created
    matmul.matmul_forward(out, inp, weight, bias, pre_gelu)
    matmul.matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre)
    matmul.matmul_forward(out, inp, weight, bias, residual=residual)
    assert (len(matmul._plans), fake_cublaslt.created) == (plans, created) == (5, created)


def test_cublaslt_path_fp32_weight_gradient(rng, fake_cublaslt):
    """fp32 D and C layouts (A, B bf16): the sums written (beta 0), then added to (beta 1)."""
    rows, C, OC = 24, 16, 40
    dout, dout_ref = _host_bf16(rng, (rows, OC))
    inp, inp_ref = _host_bf16(rng, (rows, C))
    sums = host_as_device(np.full((OC, C), np.nan, np.float32))
    matmul.matmul_backward_weight_fp32(sums, dout[:10], inp[:10], accumulate=False)
    matmul.matmul_backward_weight_fp32(sums, dout[10:], inp[10:], accumulate=True)
    assert relative_error(np.asarray(sums).astype(np.float64), dout_ref.T @ inp_ref) < 1e-6
    assert any(plan.name.endswith("out=fp32") for plan in matmul._plans.values())


@pytest.mark.parametrize("transa, transb", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["NN", "NT", "TN", "TT"])
def test_cublaslt_path_batched(rng, fake_cublaslt, transa, transb):
    batch, M, N, K = 3, 8, 12, 16
    a, a_ref = _host_bf16(rng, (batch, K, M) if transa else (batch, M, K))
    b, b_ref = _host_bf16(rng, (batch, N, K) if transb else (batch, K, N))
    out, out_ref = _host_bf16(rng, (batch, M, N))
    matmul.matmul_batched(out, a, b, transa, transb, alpha=0.5, beta=1.0)
    op_a = a_ref.transpose(0, 2, 1) if transa else a_ref
    op_b = b_ref.transpose(0, 2, 1) if transb else b_ref
    assert relative_error(_host_bf16_values(out), 0.5 * op_a @ op_b + out_ref) < BF16_ONE_ROUNDING


def test_cublaslt_path_rejects_misaligned_pointers(rng, fake_cublaslt):
    memory = host_as_device(np.zeros(8 * 8 + 8, np.uint16))
    a = memory[1:65].reshape(8, 8).view(HostAsDevice)  # 2 bytes past an aligned address
    with pytest.raises(ValueError, match="16-byte aligned"):
        matmul.matmul_batched(host_as_device(np.zeros((8, 8), np.uint16)), a, host_as_device(np.zeros((8, 8), np.uint16)))
