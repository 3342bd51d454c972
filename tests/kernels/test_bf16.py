"""bf16 conversions and warp reductions: device helpers against numpy, on awkward values too."""

import numpy as np
import pytest
from numba import cuda

from nanollm.kernels.bf16 import (BF16_CANONICAL_NAN, bf16_ulps_apart, float_to_bf16, float_to_bf16_stochastic,
                                  from_bf16_bits, pack_bf16x2, pack_bf16x2_rn, bf16_to_float, bf16x2_high, bf16x2_low,
                                  bf16x4_pack, bf16x4_pack_cvt, bf16x4_unpack, to_bf16_bits)
from nanollm.kernels.cuda_common import kernel, warp_reduce_max, warp_reduce_sum

SPECIAL = np.array([0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 3.3895314e38,
                    1.00390625, 1.01171875, 65504.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8], dtype=np.float32)


@kernel
def round_trip_kernel(out_bits, out_float, inp):
    i = cuda.grid(1)
    if i < inp.shape[0]:
        bits = float_to_bf16(inp[i])
        out_bits[i] = bits
        out_float[i] = bf16_to_float(bits)


@kernel
def stochastic_kernel(out_bits, inp, seed):
    i = cuda.grid(1)
    if i < inp.shape[0]:
        out_bits[i] = float_to_bf16_stochastic(inp[i], i, seed)


@kernel
def pack_kernel(out_words, out_low, out_high, low, high):
    i = cuda.grid(1)
    if i < low.shape[0]:
        word = pack_bf16x2(low[i], high[i])
        out_words[i] = word
        out_low[i] = bf16x2_low(word)
        out_high[i] = bf16x2_high(word)


@kernel
def pack_rn_kernel(out_words, low, high):
    i = cuda.grid(1)
    if i < low.shape[0]:
        out_words[i] = pack_bf16x2_rn(low[i], high[i])


@kernel
def pack4_kernel(out_words, out_floats, inp):
    # four floats a word: bf16x4_pack (float_to_bf16_branchless), then bf16x4_unpack
    i = cuda.grid(1)
    if i < out_words.shape[0]:
        word = bf16x4_pack(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3])
        out_words[i] = word
        v0, v1, v2, v3 = bf16x4_unpack(word)
        out_floats[4 * i] = v0
        out_floats[4 * i + 1] = v1
        out_floats[4 * i + 2] = v2
        out_floats[4 * i + 3] = v3


@kernel
def pack4_cvt_kernel(out_words, inp):
    i = cuda.grid(1)
    if i < out_words.shape[0]:
        out_words[i] = bf16x4_pack_cvt(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3])


@kernel
def warp_reduce_kernel(sums, maxes, inp):
    i = cuda.grid(1)
    total = warp_reduce_sum(inp[i])
    biggest = warp_reduce_max(inp[i])
    if i % 32 == 0:
        sums[i // 32] = total
        maxes[i // 32] = biggest


def test_host_rounding_is_nearest_even():
    # 1 + 2^-8 lies exactly halfway between two bf16 values: ties go to the even mantissa (1.0)
    assert from_bf16_bits(to_bf16_bits(np.float32([1.0 + 2**-8])))[0] == 1.0
    assert from_bf16_bits(to_bf16_bits(np.float32([1.0 + 3 * 2**-8])))[0] == 1.0 + 4 * 2**-8
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.float32([np.nan])))[0])


def test_device_round_trip_matches_host(rng):
    values = np.concatenate([SPECIAL, (rng.standard_normal(49) * 10.0 ** rng.integers(-30, 30, 49)).astype(np.float32)])
    out_bits = cuda.to_device(np.full(values.shape, 0x1234, dtype=np.uint16))
    out_float = cuda.to_device(np.full(values.shape, 7.0, dtype=np.float32))
    round_trip_kernel[1, 64](out_bits, out_float, cuda.to_device(values))
    expected = to_bf16_bits(values)
    np.testing.assert_array_equal(out_bits.copy_to_host(), expected)
    np.testing.assert_array_equal(out_float.copy_to_host(), from_bf16_bits(expected))


def test_pack_and_unpack(rng):
    low, high = (rng.standard_normal(40).astype(np.float32) for _ in range(2))
    words = cuda.to_device(np.zeros(40, dtype=np.uint32))
    out_low, out_high = cuda.to_device(np.full(40, np.nan, np.float32)), cuda.to_device(np.full(40, np.nan, np.float32))
    pack_kernel[1, 64](words, out_low, out_high, cuda.to_device(low), cuda.to_device(high))
    expected = to_bf16_bits(low).astype(np.uint32) | (to_bf16_bits(high).astype(np.uint32) << 16)
    np.testing.assert_array_equal(words.copy_to_host(), expected)
    np.testing.assert_array_equal(out_low.copy_to_host(), from_bf16_bits(to_bf16_bits(low)))
    np.testing.assert_array_equal(out_high.copy_to_host(), from_bf16_bits(to_bf16_bits(high)))


def test_hardware_pack_rounds_as_the_integer_code(rng):
    # cvt.rn.bf16x2.f32 on a GPU, its numpy stand-in on the simulator: pack_bf16x2's bits, NaN aside
    ties = np.float32(1.0) + np.float32(2**-8) * np.arange(1, 8, 2, dtype=np.float32)  # halfway, odd and even
    wide = (rng.standard_normal(60) * 10.0 ** rng.integers(-40, 38, 60)).astype(np.float32)
    values = np.concatenate([SPECIAL, ties, -ties, wide])
    low, high = values, rng.permutation(values)
    words = cuda.to_device(np.zeros(values.size, dtype=np.uint32))
    pack_rn_kernel[1, 128](words, cuda.to_device(low), cuda.to_device(high))
    out = words.copy_to_host()
    for half, inputs in ((out & 0xFFFF, low), (out >> 16, high)):
        expected = to_bf16_bits(inputs).astype(np.uint32)
        expected[np.isnan(inputs)] = BF16_CANONICAL_NAN
        np.testing.assert_array_equal(half, expected)


def test_branchless_pack_matches_host_rounding(rng):
    # float_to_bf16_branchless's 32-bit sum wraps for negative NaNs (bits above 0xFFFF7FFF): the
    # select must still give 0x7FC0, as float_to_bf16 and the host do
    negative_nans = np.array([0xFFFFFFFF, 0xFFFF8000, 0xFFC00000, 0xFF800001], dtype=np.uint32).view(np.float32)
    values = np.concatenate([SPECIAL, negative_nans, np.float32([-np.nan, 1.0 + 2**-8, -(1.0 + 2**-8)]),
                             (rng.standard_normal(42) * 10.0 ** rng.integers(-30, 30, 42)).astype(np.float32)])
    assert values.size % 4 == 0
    words = cuda.to_device(np.zeros(values.size // 4, dtype=np.uint64))
    floats = cuda.to_device(np.full(values.size, 7.0, dtype=np.float32))
    pack4_kernel[1, 32](words, floats, cuda.to_device(values))
    expected = to_bf16_bits(values)
    np.testing.assert_array_equal(words.copy_to_host().view(np.uint16), expected)
    np.testing.assert_array_equal(floats.copy_to_host().view(np.uint32), from_bf16_bits(expected).view(np.uint32))


@pytest.mark.parametrize("count", [pytest.param(64, id="small"),
                                   pytest.param(1 << 22, id="4M", marks=pytest.mark.gpu)])
def test_cvt_pack_matches_host_rounding_nan_aside(rng, count):
    """The GPU's cvt.rn.bf16x2.f32 (on the simulator: integer code) rounds as the host does; a NaN
    stays a NaN (its bits may differ: the instruction gives 0x7FFF)."""
    bits = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)  # every kind of float
    values = np.concatenate([SPECIAL, np.float32([-np.nan]), bits.view(np.float32)])[:count]
    words = cuda.to_device(np.zeros(count // 4, dtype=np.uint64))
    pack4_cvt_kernel[-(-count // 4 // 64), 64](words, cuda.to_device(values))
    got = words.copy_to_host().view(np.uint16)
    expected = to_bf16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(from_bf16_bits(got[nan])).all()


def test_stochastic_rounding_is_unbiased_and_brackets(rng):
    # one value repeated: each copy rounds down or up to a neighbouring bf16, and the mean of
    # many roundings approaches the value (round-to-nearest would always give the same one)
    x = np.float32(1.0 + 0.3 * 2**-7)  # 30% of the way from 1.0 to the next bf16 (1 + 2^-7)
    n = 256
    out = cuda.to_device(np.zeros(n, dtype=np.uint16))
    stochastic_kernel[2, 128](out, cuda.to_device(np.full(n, x, dtype=np.float32)), int(rng.integers(2**31)))
    rounded = from_bf16_bits(out.copy_to_host())
    assert set(np.unique(rounded)) <= {np.float32(1.0), np.float32(1.0 + 2**-7)}
    fraction_up = np.mean(rounded > 1.0)
    assert 0.2 < fraction_up < 0.4, fraction_up  # 30% expected; 256 draws: sd 2.9%


def test_stochastic_rounding_exact_values_unchanged(rng):
    exact = from_bf16_bits(to_bf16_bits(rng.standard_normal(64).astype(np.float32)))
    out = cuda.to_device(np.zeros(64, dtype=np.uint16))
    stochastic_kernel[1, 64](out, cuda.to_device(exact), 1234)
    np.testing.assert_array_equal(from_bf16_bits(out.copy_to_host()), exact)


def test_warp_reductions(rng):
    values = rng.standard_normal(64).astype(np.float32)
    sums, maxes = cuda.to_device(np.full(2, np.nan, np.float32)), cuda.to_device(np.full(2, np.nan, np.float32))
    warp_reduce_kernel[1, 64](sums, maxes, cuda.to_device(values))
    np.testing.assert_allclose(sums.copy_to_host(), values.reshape(2, 32).sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(maxes.copy_to_host(), values.reshape(2, 32).max(axis=1))


def test_ulps_apart_counts_units_in_the_last_place_of_the_larger():
    bits = to_bf16_bits(np.float32([1.0, 256.0, -3.0, 0.0]))
    assert bf16_ulps_apart(bits, bits) == 0.0
    assert bf16_ulps_apart(bits, bits + np.uint16(1)) == 1.0  # the next bf16 up (down for -3)
    assert bf16_ulps_apart(to_bf16_bits(np.float32([256.0])), to_bf16_bits(np.float32([260.0]))) == 2.0
    assert bf16_ulps_apart(to_bf16_bits(np.float32([1.0])), to_bf16_bits(np.float32([-1.0]))) == 256.0
