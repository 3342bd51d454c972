"""cuDNN flash attention (llm.c's cudnn_att.cpp path) against the numpy reference.

cuDNN needs a real GPU: every numerical test is marked gpu and skips, saying why, when
attention_cudnn.is_available() is False. On the simulator only the import, the availability
report and the launchers' input checks run.
"""

import math

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import attention_cudnn
from nanollm.kernels.cuda_common import SIMULATOR

from .helpers import download_bf16, poisoned_bf16, poisoned_f32, random_bf16, relative_error

# (B, T, NH, HS)
SHAPES = [
    pytest.param((2, 64, 4, 64), id="small", marks=pytest.mark.gpu),
    pytest.param((8, 1024, 12, 64), id="gpt2-124M", marks=pytest.mark.gpu),
]

# bf16 in and out, fp32 inside: out is rounded once (~1.1e-3 in norm) after P was rounded to bf16
# for the P @ V product (another ~1e-3); the backward also rounds dP/dS to bf16 before its
# products. Our own path measures 3.6e-3 / 2.5e-3 at GPT-2 shape; 1e-2 leaves ~3x margin.
FORWARD_TOLERANCE = 1e-2
BACKWARD_TOLERANCE = 1e-2
# stats are fp32 logsumexps (values ~ log(T) + max score, a few units) of fp32-accumulated scores of
# exact bf16 inputs: errors ~1e-5; 1e-3 absolute catches a wrong scale, mask or log base.
STATS_ABS_TOLERANCE = 1e-3


def require_cudnn(B, T, NH, HS):
    ok, why = attention_cudnn.is_available(B, T, NH, HS)
    if not ok:
        pytest.skip(f"cuDNN attention unavailable: {why}")


def checked_heads(B, NH):
    """(b, h) pairs compared with the float64 reference: all at small shapes; at GPT-2's a few
    (each is one T x T problem; heads are independent), the rest only checked for NaN."""
    if B * NH <= 16:
        return [(b, h) for b in range(B) for h in range(NH)]
    return [(0, 0), (0, NH - 1), (B - 1, NH // 2), (B - 1, NH - 1)]


def head_of(array, b, h, NH, parts):
    """Head h of batch b out of a (B, T, parts*C) array, as a (1, T, parts*HS) array in the same
    layout (for parts=3: its q, k, v; the reference then runs with NH=1)."""
    B, T, width = array.shape
    C = width // parts
    HS = C // NH
    return np.concatenate([array[b:b + 1, :, p * C + h * HS:p * C + (h + 1) * HS] for p in range(parts)], axis=-1)


def reference_stats(qkv_head):
    """logsumexp over the causal keys of each query's scores q.k / sqrt(HS) (natural log), (T,)."""
    HS = qkv_head.shape[-1] // 3
    q, k = qkv_head[0, :, :HS], qkv_head[0, :, HS:2 * HS]
    scores = q @ k.T / math.sqrt(HS)
    T = scores.shape[0]
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    top = scores.max(axis=-1)
    return top + np.log(np.exp(scores - top[:, None]).sum(axis=-1))


def run_forward(rng, B, T, NH, HS, stream=0):
    C = NH * HS
    inp, inp_ref = random_bf16(rng, (B, T, 3 * C))
    out = poisoned_bf16((B, T, C))
    stats = poisoned_f32((B, NH, T))
    attention_cudnn.attention_forward_cudnn(out, stats, inp, NH, stream=stream)
    return inp, inp_ref, out, stats


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_forward_cudnn(rng, shape):
    B, T, NH, HS = shape
    require_cudnn(B, T, NH, HS)
    inp, inp_ref, out, stats = run_forward(rng, B, T, NH, HS)
    result_out, result_stats = download_bf16(out), stats.copy_to_host().astype(np.float64)
    assert np.isfinite(result_out).all() and np.isfinite(result_stats).all(), f"unwritten outputs, shape {shape}"
    heads = checked_heads(B, NH)
    expected_out, expected_stats, actual_out, actual_stats = [], [], [], []
    for b, h in heads:
        qkv = head_of(inp_ref, b, h, NH, 3)
        expected_out.append(reference.attention_forward(qkv, 1)[0])
        expected_stats.append(reference_stats(qkv))
        actual_out.append(head_of(result_out, b, h, NH, 1))
        actual_stats.append(result_stats[b, h])
    err_out = relative_error(np.concatenate(actual_out), np.concatenate(expected_out))
    assert err_out < FORWARD_TOLERANCE, f"out rel. error {err_out:.2e}, shape (B,T,NH,HS)={shape}"
    err_stats = np.abs(np.concatenate(actual_stats) - np.concatenate(expected_stats)).max()
    assert err_stats < STATS_ABS_TOLERANCE, f"stats (logsumexp) max abs. error {err_stats:.2e}, shape {shape}"

    # the inference graph (no stats) computes the same out
    out_inference = poisoned_bf16((B, T, NH * HS))
    attention_cudnn.attention_forward_cudnn(out_inference, None, inp, NH)
    result_inference = download_bf16(out_inference)
    assert np.isfinite(result_inference).all(), f"unwritten outputs (inference), shape {shape}"
    err = relative_error(np.concatenate([head_of(result_inference, b, h, NH, 1) for b, h in heads]),
                         np.concatenate(expected_out))
    assert err < FORWARD_TOLERANCE, f"inference out rel. error {err:.2e}, shape {shape}"


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_backward_cudnn(rng, shape):
    B, T, NH, HS = shape
    C = NH * HS
    require_cudnn(B, T, NH, HS)
    inp, inp_ref, out, stats = run_forward(rng, B, T, NH, HS)
    dout, dout_ref = random_bf16(rng, (B, T, C))
    dinp = poisoned_bf16((B, T, 3 * C))
    attention_cudnn.attention_backward_cudnn(dinp, dout, inp, out, stats, NH)
    result = download_bf16(dinp)
    assert np.isfinite(result).all(), f"unwritten dinp elements, shape {shape}"
    expected, actual = [], []
    for b, h in checked_heads(B, NH):
        qkv = head_of(inp_ref, b, h, NH, 3)
        _, att = reference.attention_forward(qkv, 1)
        expected.append(reference.attention_backward(head_of(dout_ref, b, h, NH, 1), qkv, att, 1))
        actual.append(head_of(result, b, h, NH, 3))
    err = relative_error(np.concatenate(actual), np.concatenate(expected))
    assert err < BACKWARD_TOLERANCE, f"dinp rel. error {err:.2e}, shape (B,T,NH,HS)={shape}"

    # the deterministic algorithm was asked for: a second run gives the same bits
    dinp_again = poisoned_bf16((B, T, 3 * C))
    attention_cudnn.attention_backward_cudnn(dinp_again, dout, inp, out, stats, NH)
    assert np.array_equal(dinp_again.copy_to_host(), dinp.copy_to_host()), "backward is not bitwise reproducible"


@pytest.mark.gpu
def test_attention_cudnn_on_a_stream(rng):
    # the same graphs on a non-default Numba stream (the handle's stream is switched) give the same bits
    B, T, NH, HS = 2, 64, 4, 64
    require_cudnn(B, T, NH, HS)
    inp, _, out, stats = run_forward(rng, B, T, NH, HS)
    stream = cuda.stream()
    out_stream = poisoned_bf16(out.shape)
    stats_stream = poisoned_f32(stats.shape)
    attention_cudnn.attention_forward_cudnn(out_stream, stats_stream, inp, NH, stream=stream)
    dout, _ = random_bf16(rng, out.shape)
    dinp, dinp_stream = poisoned_bf16(inp.shape), poisoned_bf16(inp.shape)
    attention_cudnn.attention_backward_cudnn(dinp_stream, dout, inp, out_stream, stats_stream, NH, stream=stream)
    stream.synchronize()
    attention_cudnn.attention_backward_cudnn(dinp, dout, inp, out, stats, NH)  # back on the default stream
    assert np.array_equal(out_stream.copy_to_host(), out.copy_to_host())
    assert np.array_equal(stats_stream.copy_to_host(), stats.copy_to_host())
    assert np.array_equal(dinp_stream.copy_to_host(), dinp.copy_to_host())


def test_is_available_reports_a_reason():
    ok, why = attention_cudnn.is_available()
    assert isinstance(ok, bool) and isinstance(why, str) and why, (ok, why)
    if SIMULATOR:
        assert not ok and "simulator" in why


def test_launchers_reject_bad_inputs():
    B, T, NH, HS = 2, 8, 2, 8
    C = NH * HS
    inp = cuda.to_device(np.zeros((B, T, 3 * C), dtype=np.uint16))
    out = cuda.to_device(np.zeros((B, T, C), dtype=np.uint16))
    stats = cuda.to_device(np.zeros((B, NH, T), dtype=np.float32))
    with pytest.raises(TypeError, match="dtype"):
        attention_cudnn.attention_forward_cudnn(cuda.to_device(np.zeros((B, T, C), dtype=np.float32)), stats, inp, NH)
    with pytest.raises(ValueError, match="shape"):
        attention_cudnn.attention_forward_cudnn(out, cuda.to_device(np.zeros((B, T, NH), dtype=np.float32)), inp, NH)
    with pytest.raises(ValueError, match="not divisible"):
        attention_cudnn.attention_forward_cudnn(out, stats, inp, 3)
    with pytest.raises(ValueError, match="multiple of 8"):  # HS = 4
        attention_cudnn.attention_forward_cudnn(out, cuda.to_device(np.zeros((B, 4, T), dtype=np.float32)), inp, 4)
    with pytest.raises(ValueError, match="shape"):
        attention_cudnn.attention_backward_cudnn(out, out, inp, out, stats, NH)  # dinp must be (B,T,3C)
    if not attention_cudnn.is_available()[0]:
        # well-formed inputs without cuDNN: a clear error, not a crash
        with pytest.raises(RuntimeError, match="not available"):
            attention_cudnn.attention_forward_cudnn(out, stats, inp, NH)


def test_a_grown_workspace_keeps_the_old_one_alive(monkeypatch):
    """A CUDA graph captured before the workspace grew holds the old buffer's address: growing must
    not free it. Small, bigger, smaller: two buffers allocated, the first kept alive."""
    monkeypatch.setattr(attention_cudnn, "_workspace", None)
    monkeypatch.setattr(attention_cudnn, "_workspace_ptr", 0)
    monkeypatch.setattr(attention_cudnn, "_replaced_workspaces", [])
    monkeypatch.setattr(attention_cudnn, "_pointer", lambda array: 4096)  # the simulator's arrays have none
    attention_cudnn._reserve_workspace(256)
    first = attention_cudnn._workspace
    attention_cudnn._reserve_workspace(1024)
    assert attention_cudnn.workspace_bytes() == 1024 and attention_cudnn._workspace is not first
    attention_cudnn._reserve_workspace(512)  # fits: nothing allocated
    assert attention_cudnn.workspace_bytes() == 1024
    assert attention_cudnn._replaced_workspaces == [first]
