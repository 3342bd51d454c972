"""The GPT-2 encoder: token embedding plus position embedding, forward and backward. After llm.c's
encoder.cuh.

Forward: out[b,t] = wte[tokens[b,t]] + wpe[t], one uint64 word (four bf16) per thread.
Backward, deterministic (no float atomics; as llm.c), with += into the bf16 gradients (fp32 sums,
one rounding per write; llm.c rounds stochastically here, nanollm to nearest even):
- dwpe[t] += sum over b of dout[b,t]: each thread owns one word of one position and sums the
  batch in order.
- dwte[v] += sum of dout over the positions holding token v: the (b,t) positions are bucketed by
  token on the host (as llm.c does on the CPU: the model keeps the tokens on the host anyway),
  largest buckets first so the longest blocks start first. A block handles one bucket and 128
  channels: its warps take the bucket's rows in turn, each lane sums one word (four channels) in
  fp32, the warps' sums are added in a fixed order and written to dwte once. A token absent
  from the batch is not touched.
encoder_backward therefore takes the tokens as a host numpy array, not a device array.
"""

import numpy as np
from numba import cuda, float32

from .cuda_common import SIMULATOR, WARP_SIZE, ceil_div, check_contiguous, kernel
from .bf16 import add_bf16x4, add_fp32_to_bf16x4, as_words, bf16x4_get

FORWARD_BLOCK = 256
WPE_BACKWARD_BLOCK = 256
WTE_BACKWARD_WARPS = 2 if SIMULATOR else 8  # warps per bucket block, as llm.c (fewer on the simulator)


@kernel
def encoder_forward_kernel(out, tokens, wte, wpe, T, C4):
    # out: (B*T*C4,) uint64 words; tokens: (B*T,) int32; wte: (Vp*C4,) words; wpe: (maxT*C4,) words
    i = cuda.grid(1)
    if i < out.shape[0]:
        bt = i // C4
        c = i - bt * C4
        out[i] = add_bf16x4(wte[tokens[bt] * C4 + c], wpe[(bt % T) * C4 + c])


@kernel
def wpe_backward_kernel(dwpe, dout, B, TC4):
    # dwpe: (maxT*C4,) words, of which the first T*C4 (= TC4) are updated; dout: (B*T*C4,) words
    i = cuda.grid(1)
    if i < TC4:
        acc = cuda.local.array(4, float32)
        for j in range(4):
            acc[j] = float32(0.0)
        for b in range(B):
            word = dout[b * TC4 + i]
            for j in range(4):
                acc[j] += bf16x4_get(word, j)
        dwpe[i] = add_fp32_to_bf16x4(dwpe[i], acc)


@kernel
def wte_backward_kernel(dwte, dout, buckets, positions, C4):
    # dwte: (Vp*C4,) words; dout: (B*T*C4,) words; positions: (B*T,) int32, the b*T+t indices
    # sorted by token; buckets: (num_buckets*3,) int32, per bucket (start in positions, size, token)
    # grid (num_buckets, ceil(C4/32)); block (32, warps): lane = word within 32, warp = row slot;
    # dynamic shared memory: (warps, 4, 32) fp32
    lane = cuda.threadIdx.x
    warp = cuda.threadIdx.y
    warps = cuda.blockDim.y
    bucket = cuda.blockIdx.x
    c = cuda.blockIdx.y * WARP_SIZE + lane
    start = buckets[3 * bucket]
    size = buckets[3 * bucket + 1]
    token = buckets[3 * bucket + 2]
    acc = cuda.local.array(4, float32)
    for j in range(4):
        acc[j] = float32(0.0)
    if c < C4:
        for item in range(warp, size, warps):
            word = dout[positions[start + item] * C4 + c]
            for j in range(4):
                acc[j] += bf16x4_get(word, j)
    warp_sums = cuda.shared.array(0, float32)
    for j in range(4):
        warp_sums[(warp * 4 + j) * WARP_SIZE + lane] = acc[j]
    cuda.syncthreads()
    if warp == 0 and c < C4:
        for other in range(1, warps):
            for j in range(4):
                acc[j] += warp_sums[(other * 4 + j) * WARP_SIZE + lane]
        dwte[token * C4 + c] = add_fp32_to_bf16x4(dwte[token * C4 + c], acc)


_WORDS = "uint64[::1]"
PTX_SIGNATURES = {
    encoder_forward_kernel: f"void({_WORDS}, int32[::1], {_WORDS}, {_WORDS}, int64, int64)",
    wpe_backward_kernel: f"void({_WORDS}, {_WORDS}, int64, int64)",
    wte_backward_kernel: f"void({_WORDS}, {_WORDS}, int32[::1], int32[::1], int64)",
}


# ---- launchers -------------------------------------------------------------------------------

def _check_channels(C):
    if C % 4:
        raise ValueError(f"encoder: C={C} must be a multiple of 4 (kernels move four bf16 per word)")


def encoder_forward(out, tokens, wte, wpe, stream=0):
    """out = wte[tokens] + wpe[:T]. out is (B,T,C) bf16, tokens (B,T) int32 on the device (each
    in 0..Vp-1: not checked on the device), wte (Vp,C) bf16, wpe (maxT,C) bf16 with T <= maxT."""
    B, T, C = out.shape
    _check_channels(C)
    check_contiguous("tokens", tokens, np.int32, (B, T))
    if wte.ndim != 2 or wte.shape[1] != C or wpe.ndim != 2 or wpe.shape[1] != C or wpe.shape[0] < T:
        raise ValueError(f"encoder_forward: wte {tuple(wte.shape)} and wpe {tuple(wpe.shape)} must be "
                         f"(Vp, {C}) and (maxT >= {T}, {C})")
    out_words = as_words("out", out, (B, T, C))
    wte_words, wpe_words = as_words("wte", wte, wte.shape), as_words("wpe", wpe, wpe.shape)
    grid = ceil_div(out_words.shape[0], FORWARD_BLOCK)
    encoder_forward_kernel[grid, FORWARD_BLOCK, stream](out_words, tokens.reshape(B * T), wte_words,
                                                        wpe_words, T, C // 4)


def encoder_backward_buckets(tokens):
    """Host side of the dwte backward: the (b,t) positions grouped by token. tokens: (B,T) ints.
    Returns (buckets, positions), int32: positions holds b*T+t sorted by token (stable, so each
    bucket lists its positions in order); buckets is (num_buckets, 3) = (start in positions, size,
    token), largest bucket first."""
    flat = np.ascontiguousarray(tokens).reshape(-1)
    # uint16 keys sort by radix, in linear time; GPT-2's vocabulary fits
    keys = flat.astype(np.uint16) if flat.max(initial=0) < 2**16 else flat
    positions = np.argsort(keys, kind="stable").astype(np.int32)
    token_ids, starts, sizes = np.unique(flat[positions], return_index=True, return_counts=True)
    largest_first = np.argsort(-sizes, kind="stable")
    buckets = np.stack([starts[largest_first], sizes[largest_first], token_ids[largest_first]], axis=1)
    return buckets.astype(np.int32), positions


def encoder_backward_scratch_size(B, T):
    """int32 elements of the device scratch encoder_backward can reuse from step to step: the
    positions (B*T) and at most B*T buckets of three ints."""
    return 4 * B * T


def encoder_backward_pack(tokens):
    """encoder_backward_buckets packed for one upload: int32 [positions (B*T) | buckets (nb*3)],
    and nb. The training loop builds this when the tokens arrive (in the forward) and uploads it
    with them, so the backward launches without waiting for the host."""
    buckets, positions = encoder_backward_buckets(tokens)
    return np.concatenate([positions, buckets.reshape(-1)]), buckets.shape[0]


def _check_backward_shapes(dwte, dwpe, dout):
    B, T, C = dout.shape
    _check_channels(C)
    if dwte.ndim != 2 or dwte.shape[1] != C or dwpe.ndim != 2 or dwpe.shape[1] != C or dwpe.shape[0] < T:
        raise ValueError(f"encoder_backward: dwte {tuple(dwte.shape)} and dwpe {tuple(dwpe.shape)} must be "
                         f"(Vp, {C}) and (maxT >= {T}, {C})")
    return B, T, C


def encoder_backward(dwte, dwpe, dout, tokens, scratch=None, stream=0, warps_per_block=WTE_BACKWARD_WARPS):
    """dwte += and dwpe += the encoder's gradients, deterministically.
    dwte (Vp,C) and dwpe (maxT,C) bf16; dout (B,T,C) bf16; tokens: the (B,T) tokens as a HOST numpy
    array (bucketed on the CPU, as llm.c). scratch: optional int32 device array of at least
    encoder_backward_scratch_size(B, T) elements for the buckets (else allocated per call).
    The buckets' copy to the GPU here is from pageable memory, so the host waits for the stream;
    the model avoids that with encoder_backward_pack + encoder_backward_packed."""
    B, T, C = _check_backward_shapes(dwte, dwpe, dout)
    if not isinstance(tokens, np.ndarray) or tokens.shape != (B, T) or tokens.dtype.kind not in "iu":
        raise TypeError(f"encoder_backward: tokens must be a host numpy integer array of shape {(B, T)} "
                        f"(the buckets are built on the CPU), got {type(tokens).__name__} "
                        f"{getattr(tokens, 'shape', '')}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= dwte.shape[0]):
        raise ValueError(f"encoder_backward: tokens must lie in 0..{dwte.shape[0] - 1}")
    packed, num_buckets = encoder_backward_pack(tokens)
    if scratch is None:
        device_packed = cuda.to_device(packed, stream=stream)
    else:
        if scratch.dtype != np.int32 or scratch.ndim != 1 or scratch.size < packed.size:
            raise ValueError(f"scratch: expected a 1-D int32 array of at least {packed.size} elements "
                             f"(encoder_backward_scratch_size), got {scratch.dtype} {tuple(scratch.shape)}")
        device_packed = scratch[:packed.size]
        device_packed.copy_to_device(packed, stream=stream)
    encoder_backward_packed(dwte, dwpe, dout, device_packed, num_buckets, stream, warps_per_block)


def encoder_backward_packed(dwte, dwpe, dout, packed, num_buckets, stream=0, warps_per_block=WTE_BACKWARD_WARPS):
    """encoder_backward with the buckets already on the device: packed is encoder_backward_pack's
    array (int32, positions then num_buckets buckets) in device memory. Nothing is checked on the
    device: the tokens were checked when the buckets were built."""
    B, T, C = _check_backward_shapes(dwte, dwpe, dout)
    n = B * T
    if packed.dtype != np.int32 or packed.ndim != 1 or packed.size < n + 3 * num_buckets:
        raise ValueError(f"packed: expected a 1-D int32 device array of at least {n + 3 * num_buckets} "
                         f"elements, got {packed.dtype} {tuple(packed.shape)}")
    if not 1 <= warps_per_block <= 32:
        raise ValueError(f"warps_per_block must be 1..32, got {warps_per_block}")
    dout_words = as_words("dout", dout, (B, T, C))
    dwte_words, dwpe_words = as_words("dwte", dwte, dwte.shape), as_words("dwpe", dwpe, dwpe.shape)
    C4 = C // 4
    wpe_backward_kernel[ceil_div(T * C4, WPE_BACKWARD_BLOCK), WPE_BACKWARD_BLOCK, stream](
        dwpe_words, dout_words, B, T * C4)
    if num_buckets:
        grid = (num_buckets, ceil_div(C4, WARP_SIZE))
        wte_backward_kernel[grid, (WARP_SIZE, warps_per_block), stream, warps_per_block * 4 * WARP_SIZE * 4](
            dwte_words, dout_words, packed[n:n + 3 * num_buckets], packed[:n], C4)
