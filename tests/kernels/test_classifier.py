"""Fused classifier (softmax + cross-entropy + dlogits in place) against the numpy reference; every
variant (v1; v2 with the row kept in shared memory; v3, v2 with batched sums), and v2 against v1
bit for bit."""

import importlib

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
    pytest.param(1, 2, 2103, 2112, 32, id="V2103-Vp2112"),  # v2: three batches of loads a thread, the last partial
    pytest.param(8, 1024, 50257, 50304, 1024, id="gpt2-124M", marks=pytest.mark.gpu),
]
# the block size the model launches with (kept out of SHAPES, whose indices the tests below pick)
DEFAULT_BLOCK = pytest.param(8, 1024, 50257, 50304, classifier.BLOCK_SIZE, id="gpt2-124M-default-block",
                             marks=pytest.mark.gpu)


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


@pytest.mark.parametrize("variant", classifier.VARIANTS)
@pytest.mark.parametrize("B, T, V, Vp, block_size", SHAPES + [DEFAULT_BLOCK])
def test_fused_classifier(rng, B, T, V, Vp, block_size, variant):
    if variant == "v3":  # its registers allow at most BATCHED_MAX_THREADS (test below)
        block_size = min(block_size, classifier.BATCHED_MAX_THREADS)
    logits, bits, values = make_logits(rng, B, T, V, Vp)
    targets = make_targets(rng, B, T, V)
    losses = poisoned_f32((B, T))
    dloss = 1.0 / (B * T)
    classifier.fused_classifier(logits, losses, dloss, cuda.to_device(targets), V, block_size=block_size,
                                variant=variant)
    expected_losses, expected_dlogits = reference_in_chunks(values, targets, V, dloss)
    # fp32 sums of exp (ex2.approx) over <= 50257 terms: relative error ~1e-6 of a loss of a few units
    np.testing.assert_allclose(losses.copy_to_host(), expected_losses, rtol=1e-5, atol=1e-5)
    out = logits.copy_to_host()
    # one bf16 rounding (<= 2^-9 relative) of an fp32 value good to ~1e-6; atol for probabilities
    # that underflow fp32 (ftz) where float64 still has them
    np.testing.assert_allclose(from_bf16_bits(out[..., :V]), expected_dlogits, rtol=2**-8, atol=1e-30)
    np.testing.assert_array_equal(out[..., V:], bits[..., V:])  # padding columns untouched


@pytest.mark.parametrize("B, T, V, Vp, block_size", [SHAPES[0], SHAPES[-1], DEFAULT_BLOCK])
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


def run_variant(variant, bits, targets, V, dloss, block_size, write_dlogits=True):
    """(losses, logits after) of one variant on its own copy of the same logits."""
    logits, losses = cuda.to_device(bits), poisoned_f32(targets.shape)
    classifier.fused_classifier(logits, losses, dloss, cuda.to_device(targets), V, write_dlogits=write_dlogits,
                                block_size=block_size, variant=variant)
    return losses.copy_to_host(), logits.copy_to_host()


def test_loss_only_runs_v1_whatever_the_variant(rng, monkeypatch):
    # evaluation: v1 was the faster there on an H200 (the launcher's comment)
    B, T, V, Vp = 1, 2, 101, 128
    _, bits, _ = make_logits(rng, B, T, V, Vp)
    targets = make_targets(rng, B, T, V)
    expected = run_variant("v1", bits, targets, V, 0.5, 32, write_dlogits=False)
    monkeypatch.setitem(classifier.TRAINING_KERNELS, "v3", None)  # launching it would fail
    losses, logits = run_variant("v3", bits, targets, V, 0.5, 32, write_dlogits=False)
    np.testing.assert_array_equal(losses.view(np.uint32), expected[0].view(np.uint32))
    np.testing.assert_array_equal(logits, bits)


# v2 folds each thread's words in v1's order and reduces as v1 does: the same bits, losses and dlogits
@pytest.mark.parametrize("B, T, V, Vp, block_size", [SHAPES[1], SHAPES[3], SHAPES[-2], SHAPES[-1], DEFAULT_BLOCK])
def test_v2_matches_v1_bit_for_bit(rng, B, T, V, Vp, block_size):
    write_dlogits = True
    _, bits, _ = make_logits(rng, B, T, V, Vp, scale=float(rng.uniform(0.5, 8.0)))
    targets = make_targets(rng, B, T, V)
    targets.flat[B * T // 2] = 4 * rng.integers(0, V // 4) + rng.integers(0, 4)  # some lane of a full word
    dloss = float(rng.uniform(0.1, 2.0)) / (B * T)
    v1_losses, v1_logits = run_variant("v1", bits, targets, V, dloss, block_size, write_dlogits)
    v2_losses, v2_logits = run_variant("v2", bits, targets, V, dloss, block_size, write_dlogits)
    assert np.isfinite(v1_losses).all()
    np.testing.assert_array_equal(v2_losses.view(np.uint32), v1_losses.view(np.uint32))
    np.testing.assert_array_equal(v2_logits, v1_logits)


def test_v3_rejects_blocks_its_registers_do_not_fit(rng):
    B, T, V, Vp = 1, 2, 101, 128
    logits, _, _ = make_logits(rng, B, T, V, Vp)
    losses, targets = poisoned_f32((B, T)), cuda.to_device(make_targets(rng, B, T, V))
    with pytest.raises(ValueError, match="at most 768 threads"):
        classifier.fused_classifier(logits, losses, 0.5, targets, V, block_size=1024, variant="v3")


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_staged_variants_fall_back_to_v1_when_a_row_does_not_fit(rng, monkeypatch, variant):
    B, T, V, Vp = 1, 2, 101, 128
    _, bits, _ = make_logits(rng, B, T, V, Vp)
    targets = make_targets(rng, B, T, V)
    expected = run_variant("v1", bits, targets, V, 0.5, 32)
    monkeypatch.setattr(classifier, "_staged_row_fits", lambda nbytes, kernel: nbytes < classifier.staged_row_bytes(V))
    monkeypatch.setitem(classifier.TRAINING_KERNELS, variant, None)  # launching it would fail
    losses, logits = run_variant(variant, bits, targets, V, 0.5, 32)
    np.testing.assert_array_equal(losses, expected[0])
    np.testing.assert_array_equal(logits, expected[1])


def test_staged_row_bytes_covers_the_straddling_word():
    assert [classifier.staged_row_bytes(V) for V in (1, 4, 5, 50257)] == [8, 8, 16, 8 * 12565]


def test_variant_from_the_environment(monkeypatch):
    try:
        monkeypatch.setenv("NANOLLM_CLASSIFIER", "v1")
        assert importlib.reload(classifier).VARIANT == "v1"
        monkeypatch.setenv("NANOLLM_CLASSIFIER", "v9")
        with pytest.raises(ValueError, match="NANOLLM_CLASSIFIER='v9'"):
            importlib.reload(classifier)
        monkeypatch.delenv("NANOLLM_CLASSIFIER")
        assert importlib.reload(classifier).VARIANT == classifier.DEFAULT_VARIANT == "v3"
    finally:
        monkeypatch.undo()  # the environment as it was, then the module as it reads it
        importlib.reload(classifier)


@pytest.mark.gpu
def test_v2_matches_v1_on_a_whole_d12_step(rng):
    """v2 against v1 on the logits of a GPT-2 d12 step at B=64 (65,536 rows, 6.6 GB), bit for bit,
    and a sample of rows against the reference: the shape where v1's second pass is likely to miss L2."""
    B, T, V, Vp, tile_rows = 64, 1024, 50257, 50304, 1024
    rows = B * T
    # random rows, tiled to the full size on the GPU (drawing 3.3G values on the host takes minutes)
    _, tile_bits, _ = make_logits(rng, 1, tile_rows, V, Vp)
    tile = cuda.to_device(tile_bits.reshape(tile_rows, Vp))
    source = cuda.device_array((rows, Vp), np.uint16)
    for start in range(0, rows, tile_rows):
        source[start:start + tile_rows].copy_to_device(tile)
    targets = make_targets(rng, B, T, V)
    dloss = 1.0 / rows
    results = {}
    for variant in ("v1", "v2"):
        logits, losses = cuda.device_array_like(source), poisoned_f32((B, T))
        logits.copy_to_device(source)
        classifier.fused_classifier(logits.reshape(B, T, Vp), losses, dloss, cuda.to_device(targets), V,
                                    variant=variant)
        results[variant] = losses.copy_to_host(), logits.copy_to_host()
        del logits
    (v1_losses, v1_logits), (v2_losses, v2_logits) = results["v1"], results["v2"]
    np.testing.assert_array_equal(v2_losses.view(np.uint32), v1_losses.view(np.uint32))
    assert np.array_equal(v2_logits, v1_logits), f"{np.count_nonzero(v2_logits != v1_logits)} bf16 values differ"
    sample = np.sort(rng.choice(rows, 64, replace=False))
    values = from_bf16_bits(tile_bits.reshape(tile_rows, Vp)[sample % tile_rows])
    expected_losses, expected_dlogits = reference_in_chunks(values, targets.reshape(-1)[sample], V, dloss)
    np.testing.assert_allclose(v2_losses.reshape(-1)[sample], expected_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_bf16_bits(v2_logits[sample, :V]), expected_dlogits, rtol=2**-8, atol=1e-30)
    np.testing.assert_array_equal(v2_logits[sample, V:], tile_bits.reshape(tile_rows, Vp)[sample % tile_rows, V:])
