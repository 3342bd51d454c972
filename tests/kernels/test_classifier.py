"""Fused classifier (softmax + cross-entropy + dlogits in place) against the numpy reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import classifier
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

from .helpers import BF16_POISON, poisoned_f32

# (B, T, V, Vp, block_size)
SHAPES = [
    pytest.param(2, 3, 101, 128, 32, id="V101-Vp128"),    # V % 4 == 1: straddling word, 1 real lane
    pytest.param(1, 3, 103, 104, 64, id="V103-Vp104"),    # 3 real lanes in the straddling word
    pytest.param(2, 2, 128, 128, 32, id="V128-no-pad"),   # no padding at all
    pytest.param(1, 2, 5, 8, 32, id="V5-one-word"),       # fewer words than threads
    pytest.param(1, 2, 1001, 1008, 32, id="V1001-Vp1008"),  # several strides of two words a thread
    pytest.param(2, 1, 803, 832, 64, id="V803-Vp832"),
    pytest.param(8, 1024, 50257, 50304, 1024, id="gpt2-124M", marks=pytest.mark.gpu),
]


def make_logits(rng, B, T, V, Vp, scale=3.0):
    """bf16 logits whose padding columns hold NaN bits: if the kernel read them, the loss would be
    NaN; if it wrote them, they would change. Returns (device array, host bits, exact values)."""
    bits = to_bf16_bits(rng.standard_normal((B, T, Vp)).astype(np.float32) * np.float32(scale))
    bits[..., V:] = BF16_POISON
    return cuda.to_device(bits), bits, from_bf16_bits(bits)  # fp32: exact, and half float64's memory


def make_targets(rng, B, T, V):
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    targets.flat[0], targets.flat[-1] = V - 1, 0  # the last real column, in the straddling word
    return targets


def reference_in_chunks(values, targets, V, dloss, rows_per_chunk=256):
    """Losses and dlogits in float64, a few rows at a time (the GPT-2 shape would need ~7 GB at once)."""
    rows = values.reshape(-1, values.shape[-1])
    flat_targets = targets.reshape(-1)
    losses = np.empty(rows.shape[0])
    dlogits = np.empty((rows.shape[0], V), dtype=np.float32)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        probs, losses[chunk] = reference.softmax_cross_entropy_forward(rows[chunk].astype(np.float64),
                                                                       flat_targets[chunk], V)
        dlogits[chunk] = reference.softmax_cross_entropy_backward(probs, flat_targets[chunk], dloss)
    return losses.reshape(targets.shape), dlogits.reshape(*targets.shape, V)


@pytest.mark.parametrize("B, T, V, Vp, block_size", SHAPES)
def test_fused_classifier(rng, B, T, V, Vp, block_size):
    logits, bits, values = make_logits(rng, B, T, V, Vp)
    targets = make_targets(rng, B, T, V)
    losses = poisoned_f32((B, T))
    dloss = 1.0 / (B * T)
    classifier.fused_classifier(logits, losses, dloss, cuda.to_device(targets), V, block_size=block_size)
    expected_losses, expected_dlogits = reference_in_chunks(values, targets, V, dloss)
    # fp32 sums of exp (ex2.approx) over <= 50257 terms: relative error ~1e-6 of a loss of a few units
    np.testing.assert_allclose(losses.copy_to_host(), expected_losses, rtol=1e-5, atol=1e-5)
    out = logits.copy_to_host()
    # one bf16 rounding (<= 2^-9 relative) of an fp32 value good to ~1e-6; atol for probabilities
    # that underflow fp32 (ftz) where float64 still has them
    np.testing.assert_allclose(from_bf16_bits(out[..., :V]), expected_dlogits, rtol=2**-8, atol=1e-30)
    np.testing.assert_array_equal(out[..., V:], bits[..., V:])  # padding columns untouched


@pytest.mark.parametrize("B, T, V, Vp, block_size", [SHAPES[0], SHAPES[-1]])
def test_fused_classifier_loss_only(rng, B, T, V, Vp, block_size):
    logits, bits, values = make_logits(rng, B, T, V, Vp)
    targets = make_targets(rng, B, T, V)
    losses = poisoned_f32((B, T))
    classifier.fused_classifier(logits, losses, 1.0 / (B * T), cuda.to_device(targets), V,
                                write_dlogits=False, block_size=block_size)
    expected_losses, _ = reference_in_chunks(values, targets, V, 1.0)
    np.testing.assert_allclose(losses.copy_to_host(), expected_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits.copy_to_host(), bits)  # evaluation leaves the logits alone


def test_fused_classifier_rejects_bad_input():
    B, T, V, Vp = 1, 2, 5, 8
    logits = cuda.to_device(np.zeros((B, T, Vp), np.uint16))
    losses = cuda.to_device(np.zeros((B, T), np.float32))
    targets = cuda.to_device(np.zeros((B, T), np.int32))
    with pytest.raises(TypeError, match="targets"):
        classifier.fused_classifier(logits, losses, 0.5, cuda.to_device(np.zeros((B, T), np.int64)), V)
    with pytest.raises(TypeError, match="logits"):
        classifier.fused_classifier(cuda.to_device(np.zeros((B, T, Vp), np.float32)), losses, 0.5, targets, V)
    with pytest.raises(ValueError, match="losses"):
        classifier.fused_classifier(logits, cuda.to_device(np.zeros((B, T + 1), np.float32)), 0.5, targets, V)
    with pytest.raises(ValueError, match="multiple of 4"):
        classifier.fused_classifier(cuda.to_device(np.zeros((B, T, 6), np.uint16)), losses, 0.5, targets, V)
    with pytest.raises(ValueError, match="V="):
        classifier.fused_classifier(logits, losses, 0.5, targets, Vp + 1)
