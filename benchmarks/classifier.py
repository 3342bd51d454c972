"""Fused classifier (softmax + cross-entropy + dlogits in place) at GPT-2 124M's logits shape
(B=8, T=1024, V=50257 real of Vp=50304 columns), for a few block sizes.

    python benchmarks/classifier.py

Bytes counted: the floor, one read and one write of the real logits (training), one read (loss
only); the kernel reads each row twice, the second time from L2 if all goes well.
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import classifier
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

B, T, V, Vp = 8, 1024, 50257, 50304
BLOCK_SIZES = (256, 384, 512, 768)  # the default v3 runs at most 768 threads a block
CHECK_ROWS = 256  # rows compared with the float64 reference (all of them would take minutes)


def check(bits, targets, block_size, rng):
    """Run once on fresh logits; max relative error of the losses and of dlogits on sampled rows."""
    logits, losses = cuda.to_device(bits), cuda.device_array((B, T), np.float32)
    classifier.fused_classifier(logits, losses, 1.0 / (B * T), cuda.to_device(targets), V, block_size=block_size)
    rows = rng.choice(B * T, CHECK_ROWS, replace=False)
    values = from_bf16_bits(bits.reshape(B * T, Vp)[rows]).astype(np.float64)
    probs, expected_losses = reference.softmax_cross_entropy_forward(values, targets.reshape(-1)[rows], V)
    expected_dlogits = reference.softmax_cross_entropy_backward(probs, targets.reshape(-1)[rows], 1.0 / (B * T))
    out = logits.copy_to_host().reshape(B * T, Vp)[rows]
    assert np.array_equal(out[:, V:], bits.reshape(B * T, Vp)[rows, V:]), "padding columns changed"
    loss_err = np.max(np.abs(losses.copy_to_host().reshape(-1)[rows] - expected_losses) / expected_losses)
    dlogits = from_bf16_bits(out[:, :V])
    dlogits_err = np.linalg.norm(dlogits - expected_dlogits) / np.linalg.norm(expected_dlogits)
    assert loss_err < 1e-5 and dlogits_err < 4e-3, (loss_err, dlogits_err)
    return max(loss_err, dlogits_err)


def main():
    rng = np.random.default_rng(0)
    bits = to_bf16_bits(rng.standard_normal((B, T, Vp)).astype(np.float32) * 3)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    logit_bytes = B * T * V * 2

    n_sets = copies_needed(2 * logit_bytes)
    logits = [cuda.to_device(bits) for _ in range(n_sets)]  # overwritten by dlogits: still finite logits
    losses = cuda.device_array((B, T), np.float32)
    device_targets = cuda.to_device(targets)
    copy = copy_bandwidth_gbs()
    rows = []
    for block_size in BLOCK_SIZES:
        err = check(bits, targets, block_size, rng)
        for name, write, nbytes in (("fused_classifier", True, 2 * logit_bytes),
                                    ("fused_classifier (loss only)", False, logit_bytes)):
            ms = time_ms(lambda i: classifier.fused_classifier(logits[i], losses, 1.0 / (B * T), device_targets, V,
                                                                write_dlogits=write, block_size=block_size), n_sets)
            gbs = nbytes / ms / 1e6
            rows.append(dict(kernel=f"{name} [{block_size}]", shape=f"{B}x{T}x{V}/{Vp}", ms=ms, gbs=gbs,
                             pct=100 * gbs / copy, err=err))
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("Fused classifier [block size]", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
