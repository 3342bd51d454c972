"""Helpers for kernel tests: upload bf16 data, poisoned outputs, error measures."""

import numpy as np
from numba import cuda

from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

# 0xFFFF is a NaN in bf16: an output element the kernel never wrote stays NaN and fails the check.
BF16_POISON = 0xFFFF


def random_bf16(rng, shape, scale=1.0):
    """Random normal values rounded to bf16: returns (device uint16 array, exact float64 values)."""
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale))
    return cuda.to_device(bits), from_bf16_bits(bits).astype(np.float64)


def poisoned_bf16(shape):
    return cuda.to_device(np.full(shape, BF16_POISON, dtype=np.uint16))


def poisoned_f32(shape):
    return cuda.to_device(np.full(shape, np.nan, dtype=np.float32))


def download_bf16(device_array):
    return from_bf16_bits(device_array.copy_to_host()).astype(np.float64)


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||; NaN (an unwritten or broken element) never passes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{np.count_nonzero(~np.isfinite(actual))} non-finite elements"
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


# A bf16 value carries 8 bits of mantissa: one rounding of the output is up to 2^-9 relative per
# element, ~2^-9/sqrt(3) ~ 1.1e-3 in norm. Kernels that round once land near 1e-3; a kernel that
# reads bf16 inputs and rounds its output once must be below this bound.
BF16_ONE_ROUNDING = 4e-3
