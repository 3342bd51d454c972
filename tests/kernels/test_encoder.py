"""Encoder forward and backward kernels against the numpy reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import encoder

from .helpers import BF16_ONE_ROUNDING, download_bf16, poisoned_bf16, random_bf16, relative_error

# (B, T, C, V, Vp, maxT), warps per dwte block. Tokens are drawn skewed (Zipf), so some buckets
# hold more rows than a block has warps and most of the vocabulary is absent.
SHAPES = [
    pytest.param((2, 3, 20, 10, 12, 5), 2, id="tiny"),  # C/4 = 5 words: one partial warp
    # 340 output words (two blocks); C/4 = 34 words: a second, nearly empty channel group
    pytest.param((2, 9, 136, 40, 48, 12), 2, id="multi-block"),
    pytest.param((8, 1024, 768, 50257, 50304, 1024), encoder.WTE_BACKWARD_WARPS, id="gpt2-124M",
                 marks=pytest.mark.gpu),
]


def skewed_tokens(rng, B, T, V):
    return ((rng.zipf(1.3, size=(B, T)) - 1) % V).astype(np.int32)


@pytest.mark.parametrize("shape,warps", SHAPES)
def test_encoder_forward(rng, shape, warps):
    B, T, C, V, Vp, maxT = shape
    tokens = skewed_tokens(rng, B, T, V)
    wte, wte_ref = random_bf16(rng, (Vp, C))
    wpe, wpe_ref = random_bf16(rng, (maxT, C))
    out = poisoned_bf16((B, T, C))
    encoder.encoder_forward(out, cuda.to_device(tokens), wte, wpe)
    # one fp32 add of two exact bf16 values, rounded once
    assert relative_error(download_bf16(out), reference.encoder_forward(tokens, wte_ref, wpe_ref)) < BF16_ONE_ROUNDING


def run_backward(rng, shape, warps, use_scratch=True):
    B, T, C, V, Vp, maxT = shape
    tokens = skewed_tokens(rng, B, T, V)
    dout, dout_ref = random_bf16(rng, (B, T, C))
    # gradients start random, of the size of what is added (sums over up to B*T rows), so a
    # kernel that overwrote instead of adding would miss by ~100%
    grad_scale = np.sqrt(B * T)
    dwte, dwte_start = random_bf16(rng, (Vp, C), scale=grad_scale)
    dwpe, dwpe_start = random_bf16(rng, (maxT, C), scale=grad_scale)
    start_bits = dwte.copy_to_host(), dwpe.copy_to_host()
    scratch = cuda.device_array(encoder.encoder_backward_scratch_size(B, T), np.int32) if use_scratch else None
    encoder.encoder_backward(dwte, dwpe, dout, tokens, scratch=scratch, warps_per_block=warps)
    expected = dwte_start.copy(), dwpe_start.copy()
    reference.encoder_backward(*expected, dout_ref, tokens)
    return tokens, (dwte, dwpe), expected, start_bits


@pytest.mark.parametrize("use_scratch", [True, False], ids=["scratch", "no-scratch"])
@pytest.mark.parametrize("shape,warps", SHAPES)
def test_encoder_backward(rng, shape, warps, use_scratch):
    B, T, C, V, Vp, maxT = shape
    tokens, (dwte, dwpe), (dwte_ref, dwpe_ref), (dwte_start, dwpe_start) = run_backward(rng, shape, warps, use_scratch)
    # start + fp32 sum of exact bf16 values, rounded once per element
    assert relative_error(download_bf16(dwte), dwte_ref) < BF16_ONE_ROUNDING
    assert relative_error(download_bf16(dwpe), dwpe_ref) < BF16_ONE_ROUNDING
    # rows of absent tokens and positions past T are left exactly as they were
    absent = np.setdiff1d(np.arange(Vp), tokens)
    assert absent.size
    np.testing.assert_array_equal(dwte.copy_to_host()[absent], dwte_start[absent])
    np.testing.assert_array_equal(dwpe.copy_to_host()[T:], dwpe_start[T:])


@pytest.mark.parametrize("shape,warps", [SHAPES[0], SHAPES[2]])  # the simulator itself is deterministic
def test_encoder_backward_is_deterministic(rng, shape, warps):
    seed = int(rng.integers(2**32))
    first, second = ([a.copy_to_host() for a in run_backward(np.random.default_rng(seed), shape, warps)[1]]
                     for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_encoder_backward_buckets(rng):
    tokens = skewed_tokens(rng, 3, 17, 9)
    buckets, positions = encoder.encoder_backward_buckets(tokens)
    flat = tokens.reshape(-1)
    assert sorted(positions.tolist()) == list(range(flat.size))
    assert list(buckets[:, 1]) == sorted(buckets[:, 1], reverse=True)  # largest first
    for start, size, token in buckets:
        members = positions[start:start + size]
        assert (flat[members] == token).all() and (np.diff(members) > 0).all()
    assert buckets[:, 1].sum() == flat.size and len(set(buckets[:, 2])) == len(buckets)


def test_encoder_rejects_bad_inputs():
    B, T, C, Vp = 1, 2, 8, 4
    dout = cuda.to_device(np.zeros((B, T, C), dtype=np.uint16))
    table = cuda.to_device(np.zeros((Vp, C), dtype=np.uint16))
    tokens = np.zeros((B, T), dtype=np.int32)
    with pytest.raises(TypeError, match="host numpy"):
        encoder.encoder_backward(table, table, dout, cuda.to_device(tokens))
    with pytest.raises(ValueError, match="0..3"):
        encoder.encoder_backward(table, table, dout, tokens + Vp)
    with pytest.raises(ValueError, match="multiple of 4"):
        odd = cuda.to_device(np.zeros((B, T, 6), dtype=np.uint16))
        encoder.encoder_forward(odd, cuda.to_device(tokens), odd, odd)
    with pytest.raises(TypeError, match="int32"):
        encoder.encoder_forward(dout, cuda.to_device(tokens.astype(np.int64)), table, table)
    with pytest.raises(ValueError, match="maxT"):
        short_wpe = cuda.to_device(np.zeros((1, C), dtype=np.uint16))
        encoder.encoder_forward(dout, cuda.to_device(tokens), table, short_wpe)
