"""bfloat16 as uint16 bits: device conversions and their host (numpy) twins.

Storage is bf16, arithmetic fp32, as in llm.c. Numba's own bf16 type does not run on the CUDA
simulator, so bf16 values live in uint16 arrays (two of them in a uint32 word for wide loads)
and are converted with integer operations that compile to plain integer instructions.
float -> bf16 rounds to nearest even, as __float2bfloat16 does; NaN stays NaN.
pack_bf16x2_rn does the same rounding in one hardware instruction (sm_80+) where pack_bf16x2 needs
about sixteen integer ones; the simulator stands in for that instruction with numpy.
"""

import numpy as np
from numba import cuda, float32, int32, types, uint16, uint32, uint64

from .cuda_common import SIMULATOR, check_contiguous, device_function

BF16_QUIET_NAN = 0x7FC0  # what float_to_bf16 makes of a NaN
BF16_CANONICAL_NAN = 0x7FFF  # what the hardware's conversion makes of one


@device_function
def bf16_to_float(bits):
    return cuda.libdevice.int_as_float(int32(bits) << 16)


@device_function
def float_to_bf16(x):
    u = uint32(cuda.libdevice.float_as_int(float32(x)))
    if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000):
        return uint16(BF16_QUIET_NAN)
    rounding = uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))
    return uint16((u + rounding) >> uint32(16))


@device_function
def bf16x2_low(word):
    """The bf16 at the lower address of a uint32 word (little-endian), as float."""
    return cuda.libdevice.int_as_float(int32(word << uint32(16)))


@device_function
def bf16x2_high(word):
    return cuda.libdevice.int_as_float(int32(word & uint32(0xFFFF0000)))


@device_function
def pack_bf16x2(low, high):
    return uint32(float_to_bf16(low)) | (uint32(float_to_bf16(high)) << uint32(16))


if SIMULATOR:
    def cvt_rn_bf16x2(high, low):
        """The simulator's stand-in for the instruction below, bit for bit (NaN -> 0x7FFF)."""
        bits = to_bf16_bits(np.array([low, high], dtype=np.float32))
        bits[np.isnan(np.array([low, high], dtype=np.float32))] = BF16_CANONICAL_NAN
        return uint32(bits[0]) | (uint32(bits[1]) << uint32(16))
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    @intrinsic
    def cvt_rn_bf16x2(typingctx, high, low):
        """PTX cvt.rn.bf16x2.f32: high and low rounded to nearest even, packed high:low in a uint32.
        A NaN becomes the canonical bf16 NaN 0x7FFF (pack_bf16x2 gives 0x7FC0); all else is the same."""
        def codegen(context, builder, signature, args):
            function_type = ir.FunctionType(ir.IntType(32), [ir.FloatType(), ir.FloatType()])
            return builder.call(ir.InlineAsm(function_type, "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f"), args)

        return types.uint32(types.float32, types.float32), codegen


@device_function
def pack_bf16x2_rn(low, high):
    """pack_bf16x2 in one instruction (sm_80+): the same bits, except that a NaN becomes 0x7FFF."""
    return cvt_rn_bf16x2(float32(high), float32(low))


@device_function
def low_half(word64):
    """The uint32 at the lower address of a uint64 word: bf16 elements 0 and 1 of four."""
    return uint32(word64 & uint64(0xFFFFFFFF))


@device_function
def high_half(word64):
    return uint32(word64 >> uint64(32))


@device_function
def join_halves(low, high):
    return uint64(low) | (uint64(high) << uint64(32))


@device_function
def squirrel_noise5(position, seed):
    """Squirrel Eiserloh's integer hash (as llm.c's stochastic rounding uses): cheap, stateless
    randomness from (position, seed)."""
    bits = uint32(position)
    bits = uint32(bits * uint32(0xD2A80A3F))
    bits = uint32(bits + uint32(seed))
    bits ^= bits >> uint32(9)
    bits = uint32(bits + uint32(0xA884F197))
    bits ^= bits >> uint32(11)
    bits = uint32(bits * uint32(0x6C736F4B))
    bits ^= bits >> uint32(13)
    bits = uint32(bits + uint32(0xB79F3ABB))
    bits ^= bits >> uint32(15)
    bits = uint32(bits * uint32(0x1B56C4F5))
    bits ^= bits >> uint32(17)
    return bits


@device_function
def float_to_bf16_stochastic(x, position, seed):
    """Round x to bf16 up or down with probability proportional to the distance (unbiased), so
    small AdamW updates are not lost to round-to-nearest. As llm.c: when the dropped 16 bits
    exceed a random threshold, set them all and round (which carries up); else truncate.
    Deterministic given (position, seed), whatever the launch configuration."""
    u = uint32(cuda.libdevice.float_as_int(float32(x)))
    threshold = squirrel_noise5(position, seed) & uint32(0xFFFF)
    if (u & uint32(0xFFFF)) > threshold:
        return float_to_bf16(cuda.libdevice.int_as_float(int32(u | uint32(0xFFFF))))
    return float_to_bf16(cuda.libdevice.int_as_float(int32(u & uint32(0xFFFF0000))))


# ---- four bf16 in a uint64 word --------------------------------------------------------------

@device_function
def bf16x4_get(word, j):
    """bf16 element j (0..3, lowest address first) of a uint64 word, as float."""
    return cuda.libdevice.int_as_float(int32(uint32(word >> uint64(16 * j)) << uint32(16)))


@device_function
def bf16x4_put(value, j):
    """value rounded to bf16 (nearest even), placed as element j of a uint64 word."""
    return uint64(float_to_bf16(value)) << uint64(16 * j)


@device_function
def add_bf16x4(a, b):
    """Elementwise a + b of two words of four bf16: fp32 add, one rounding."""
    out = uint64(0)
    for j in range(4):
        out |= bf16x4_put(bf16x4_get(a, j) + bf16x4_get(b, j), j)
    return out


@device_function
def float_to_bf16_branchless(x):
    """float_to_bf16's bits for every input (nearest even, NaN -> 0x7FC0) in fewer instructions:
    Numba widens uint32 sums to 64 bits and compiled float_to_bf16's NaN test to a branch around
    the rounding (~11 integer instructions, several 64-bit); here 32-bit arithmetic and a select
    (~7). The 32-bit sum wraps only for negative NaNs, which the select replaces."""
    u = uint32(cuda.libdevice.float_as_int(float32(x)))
    rounded = uint32(u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16)
    return uint16(BF16_QUIET_NAN) if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000) else uint16(rounded)


@device_function
def bf16x4_unpack(word):
    """The four bf16 of a uint64 word as floats, lowest address first, each from one 32-bit
    half with one shift or mask."""
    low = low_half(word)
    high = high_half(word)
    return (cuda.libdevice.int_as_float(int32(low << uint32(16))),
            cuda.libdevice.int_as_float(int32(low & uint32(0xFFFF0000))),
            cuda.libdevice.int_as_float(int32(high << uint32(16))),
            cuda.libdevice.int_as_float(int32(high & uint32(0xFFFF0000))))


@device_function
def bf16x4_pack(v0, v1, v2, v3):
    """Four floats rounded to bf16 (float_to_bf16's bits), lowest address first, as a uint64 word."""
    low = uint32(float_to_bf16_branchless(v0)) | uint32(uint32(float_to_bf16_branchless(v1)) << uint32(16))
    high = uint32(float_to_bf16_branchless(v2)) | uint32(uint32(float_to_bf16_branchless(v3)) << uint32(16))
    return join_halves(low, high)


@device_function
def bf16x4_pack_cvt(v0, v1, v2, v3):
    """bf16x4_pack through pack_bf16x2_rn, the GPU's conversion instruction (NaN: 0x7FFF)."""
    return join_halves(pack_bf16x2_rn(v0, v1), pack_bf16x2_rn(v2, v3))


@device_function
def add_fp32_to_bf16x4(word, acc):
    """word + acc[0..3] (fp32 sums), rounded once: how accumulated gradients are written back."""
    out = uint64(0)
    for j in range(4):
        out |= bf16x4_put(bf16x4_get(word, j) + acc[j], j)
    return out


# ---- host side -------------------------------------------------------------------------------

def to_bf16_bits(array):
    """float array -> uint16 bf16 bits, round to nearest even (matches float_to_bf16)."""
    f = np.ascontiguousarray(array, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = BF16_QUIET_NAN
    return rounded


def from_bf16_bits(bits):
    """uint16 bf16 bits -> float32."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def bf16_ulp(values):
    """The unit in the last place (8 significant bits) of a bf16 number of each value's size
    (float64; below the smallest normal, the smallest normal's)."""
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(values), 2.0 ** -126))) - 7)


def bf16_ulps_apart(a_bits, b_bits):
    """The largest distance between two bf16 (uint16 bits) arrays, in units of the last place
    (8 significant bits) of the larger of each pair."""
    a, b = from_bf16_bits(a_bits).astype(np.float64), from_bf16_bits(b_bits).astype(np.float64)
    return float(np.max(np.abs(a - b) / bf16_ulp(np.maximum(np.abs(a), np.abs(b)))))


def round_to_bf16(array):
    """The float32 value nearest-even rounding to bf16 would store."""
    return from_bf16_bits(to_bf16_bits(array))


def as_words(name, array, shape):
    """A bf16 (uint16) device array as a flat array of uint64 words (four bf16 each)."""
    check_contiguous(name, array, np.uint16, shape)
    if array.size % 4:
        raise ValueError(f"{name}: element count must be a multiple of 4 (kernels move four bf16 per word)")
    interface = getattr(array, "__cuda_array_interface__", None)  # absent on the simulator
    if interface is not None and interface["data"][0] % 8:
        raise ValueError(f"{name}: device pointer must be 8-byte aligned (kernels load uint64 words)")
    return array.reshape(array.size).view(np.uint64)
