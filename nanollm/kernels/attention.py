"""Causal self-attention without cuDNN, after llm.c's llmc/attention.cuh (its default build).

Forward: permute qkv (B,T,3,NH,HS) into q, k, v (B,NH,T,HS); preatt = q @ k^T as one strided-
batched cuBLASLt product over the B*NH heads; a causal softmax with the 1/sqrt(HS) scale fused
(llm.c's softmax_forward_kernel5: a warp per row, online max and sum, only t2 <= t1 read, the rest
written 0); out_h = att @ v, batched again; unpermute into (B,T,C). The backward retraces it:
unpermute backward, datt = dout_h @ v^T, dv = att^T @ dout_h, the softmax backward (causal, scale
fused, a warp per row: deterministic), dq = dpreatt @ k, dk = dpreatt^T @ q, permute backward.

Two differences from llm.c, both to save memory: preatt is written straight into att and the
softmax runs in place (each lane reads and writes only its own words of a row; llm.c keeps a
separate (B,NH,T,T) preatt), and the backward keeps the permuted dout in the dq third of dqkvr
(dq is only written after dout's last use), so it needs no scratch of its own. As llm.c, the
softmax backward turns datt into dpreatt in place, and the softmax kernels take their rows in
reverse order so the longest (causal) rows start first.

Memory-bound kernels move uint64 words (four bf16): HS and T must be multiples of 4. The permutes
are pure data movement, coalesced on both sides: a block is a tile of (positions x one head row of
words) on a (tiles, NH, B) grid, so no thread divides, and each thread keeps four loads in flight
(see the comment above them). On the simulator the batched products use matmul's numpy fallback;
these kernels run as Numba code.
"""

import math

import numpy as np
from numba import cuda, float32, uint64

from .bf16 import bf16x2_high, bf16x2_low, high_half, join_halves, low_half, pack_bf16x2
from .cuda_common import SIMULATOR, WARP_SIZE, ceil_div, check_contiguous, device_function, kernel, \
    warp_reduce_max, warp_reduce_sum
from .matmul import matmul_batched

# -FLT_MAX, not -inf, as llm.c: subtracting two of them gives no NaN
NEG_FLT_MAX = -3.4028234663852886e38


# ---- CUDA kernels --------------------------------------------------------------------------------

# The permutes are pure data movement: (B, T, 3, NH, HS) or (B, T, NH, HS) <-> (B, NH, T, HS), as
# uint64 words (four bf16 along HS), so their speed is coalescing and the bytes kept in flight.
# - Block (HS4, rows): x is the word d within a head's row of HS4 words, y a position t; the grid is
#   (tiles of positions, NH, B), so a thread finds (b, h, t, d) with no integer division at all.
#   A warp covers 32 consecutive words of the head-major side (256 contiguous bytes) and whole
#   head rows of the token-major side (HS4 * 8 = 128 contiguous bytes at HS = 64): every 32-byte
#   sector is used whole, on the load side and the store side.
# - Each thread moves PERMUTE_WORDS_PER_THREAD words (positions t, t + rows, ...), all loads before
#   any store: a store waits for its loaded word, so load-store pairs would keep one 8-byte load per
#   thread in flight (16 KB per SM); four keep 64 KB per SM, what HBM3 needs. (The compiler cannot
#   move a load above a store itself: it does not know the arrays do not overlap.)
PERMUTE_WORDS_PER_THREAD = 4  # the unrolled body of move_words


@device_function
def permute_place(T):
    """This thread's word d, head h, batch b, first position t, the step between its positions
    and how many of its PERMUTE_WORDS_PER_THREAD positions are < T (0 to 4)."""
    step = cuda.blockDim.y
    t = cuda.blockIdx.x * (PERMUTE_WORDS_PER_THREAD * step) + cuda.threadIdx.y
    count = 0
    for u in range(PERMUTE_WORDS_PER_THREAD):
        if t + u * step < T:
            count += 1
    return cuda.threadIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, t, step, count


@device_function
def move_words(dst, dst_index, dst_step, src, src_index, src_step, count):
    """dst[dst_index + u * dst_step] = src[src_index + u * src_step] for u < count (at most 4),
    loading all before storing any, so the four loads are in flight together."""
    w0 = src[src_index] if count > 0 else uint64(0)
    w1 = src[src_index + src_step] if count > 1 else uint64(0)
    w2 = src[src_index + 2 * src_step] if count > 2 else uint64(0)
    w3 = src[src_index + 3 * src_step] if count > 3 else uint64(0)
    if count > 0:
        dst[dst_index] = w0
    if count > 1:
        dst[dst_index + dst_step] = w1
    if count > 2:
        dst[dst_index + 2 * dst_step] = w2
    if count > 3:
        dst[dst_index + 3 * dst_step] = w3


@kernel
def permute_kernel(q, k, v, inp, T, NH, HS4):
    # inp: (B, T, 3, NH, HS4) uint64 words (the qkv matmul's output); q, k, v: (B, NH, T, HS4)
    d, h, b, t, step, count = permute_place(T)
    head = ((b * NH + h) * T + t) * HS4 + d
    token = ((b * T + t) * 3 * NH + h) * HS4 + d
    token_step = step * 3 * NH * HS4
    move_words(q, head, step * HS4, inp, token, token_step, count)
    move_words(k, head, step * HS4, inp, token + NH * HS4, token_step, count)
    move_words(v, head, step * HS4, inp, token + 2 * NH * HS4, token_step, count)


@kernel
def permute_backward_kernel(dinp, dq, dk, dv, T, NH, HS4):
    # the inverse of permute_kernel: dq, dk, dv (B, NH, T, HS4) -> dinp (B, T, 3, NH, HS4)
    d, h, b, t, step, count = permute_place(T)
    head = ((b * NH + h) * T + t) * HS4 + d
    token = ((b * T + t) * 3 * NH + h) * HS4 + d
    token_step = step * 3 * NH * HS4
    move_words(dinp, token, token_step, dq, head, step * HS4, count)
    move_words(dinp, token + NH * HS4, token_step, dk, head, step * HS4, count)
    move_words(dinp, token + 2 * NH * HS4, token_step, dv, head, step * HS4, count)


@kernel
def unpermute_kernel(out, inp, T, NH, HS4):
    # inp: (B, NH, T, HS4) words (att @ v per head) -> out: (B, T, NH, HS4), i.e. (B, T, C)
    d, h, b, t, step, count = permute_place(T)
    head = ((b * NH + h) * T + t) * HS4 + d
    token = ((b * T + t) * NH + h) * HS4 + d
    move_words(out, token, step * NH * HS4, inp, head, step * HS4, count)


@kernel
def unpermute_backward_kernel(dinp, dout, T, NH, HS4):
    # dout: (B, T, NH, HS4) words -> dinp: (B, NH, T, HS4)
    d, h, b, t, step, count = permute_place(T)
    head = ((b * NH + h) * T + t) * HS4 + d
    token = ((b * T + t) * NH + h) * HS4 + d
    move_words(dinp, head, step * HS4, dout, token, step * NH * HS4, count)


@device_function
def causal(x, position, own_position):
    """x where the key position may be attended to (position <= own_position), else -FLT_MAX,
    which contributes exp(-huge) = 0 to every sum below."""
    return x if position <= own_position else float32(NEG_FLT_MAX)


@device_function
def softmax_row_position(n_rows, T):
    """This warp's row of the (B*NH*T, T) matrix, its lane, its query position t1 and whether it
    has a row at all. Blocks go in reverse order: the long rows (large t1) start first."""
    warps_per_block = cuda.blockDim.x // WARP_SIZE
    row = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * warps_per_block + cuda.threadIdx.x // WARP_SIZE
    lane = cuda.threadIdx.x % WARP_SIZE
    valid = row < n_rows
    own = row % T if valid else -1
    return row, lane, own, valid


@kernel(fastmath=True)
def softmax_forward_kernel(att, preatt, n_rows, T4, scale):
    # preatt, att: (B*NH*T, T4) uint64 words, bf16 rows of length T = 4*T4; may be the same array
    # (each lane reads and writes only its own words). One warp per row; the row of query t1
    # reads words 0..t1//4 (the last one partly causal) and writes the whole row, 0 past t1.
    row, lane, own, valid = softmax_row_position(n_rows, 4 * T4)
    last_word = own // 4
    base = row * T4
    maxval = float32(NEG_FLT_MAX)
    sumval = float32(0.0)
    if valid:
        for i in range(lane, last_word + 1, WARP_SIZE):
            word = preatt[base + i]
            p = 4 * i
            x0 = causal(bf16x2_low(low_half(word)), p, own)
            x1 = causal(bf16x2_high(low_half(word)), p + 1, own)
            x2 = causal(bf16x2_low(high_half(word)), p + 2, own)
            x3 = causal(bf16x2_high(high_half(word)), p + 3, own)
            new_max = max(max(maxval, x0), max(max(x1, x2), x3))  # x0 is always causal: a real max
            sumval *= math.exp(scale * (maxval - new_max))
            sumval += (math.exp(scale * (x0 - new_max)) + math.exp(scale * (x1 - new_max))
                       + math.exp(scale * (x2 - new_max)) + math.exp(scale * (x3 - new_max)))
            maxval = new_max
    # every thread of the block reaches the warp reductions (block-uniform control flow)
    row_max = warp_reduce_max(maxval)
    sumval *= math.exp(scale * (maxval - row_max))
    norm = float32(1.0) / warp_reduce_sum(sumval)
    if valid:
        for i in range(lane, T4, WARP_SIZE):
            if i <= last_word:
                # recomputing exp is cheaper than a round trip through memory (llm.c)
                word = preatt[base + i]
                p = 4 * i
                e0 = math.exp(scale * (causal(bf16x2_low(low_half(word)), p, own) - row_max)) * norm
                e1 = math.exp(scale * (causal(bf16x2_high(low_half(word)), p + 1, own) - row_max)) * norm
                e2 = math.exp(scale * (causal(bf16x2_low(high_half(word)), p + 2, own) - row_max)) * norm
                e3 = math.exp(scale * (causal(bf16x2_high(high_half(word)), p + 3, own) - row_max)) * norm
                att[base + i] = join_halves(pack_bf16x2(e0, e1), pack_bf16x2(e2, e3))
            else:
                att[base + i] = uint64(0)


@device_function
def causal_or_zero(x, position, own_position):
    return x if position <= own_position else float32(0.0)


@kernel(fastmath=True)
def softmax_backward_kernel(dpreatt, datt, att, n_rows, T4, scale):
    # datt, att, dpreatt: (B*NH*T, T4) uint64 words; dpreatt may be datt (in place, as llm.c).
    # dpreatt[t2] = scale * att[t2] * (datt[t2] - sum_t2' att[t2'] datt[t2']) for t2 <= t1, else 0.
    # One warp per row; fixed summation order (per lane, then a butterfly): deterministic.
    row, lane, own, valid = softmax_row_position(n_rows, 4 * T4)
    last_word = own // 4
    base = row * T4
    local_sum = float32(0.0)
    if valid:
        for i in range(lane, last_word + 1, WARP_SIZE):
            a = att[base + i]
            d = datt[base + i]
            p = 4 * i
            local_sum += (causal_or_zero(bf16x2_low(low_half(a)), p, own) * bf16x2_low(low_half(d))
                          + causal_or_zero(bf16x2_high(low_half(a)), p + 1, own) * bf16x2_high(low_half(d))
                          + causal_or_zero(bf16x2_low(high_half(a)), p + 2, own) * bf16x2_low(high_half(d))
                          + causal_or_zero(bf16x2_high(high_half(a)), p + 3, own) * bf16x2_high(high_half(d)))
    total = warp_reduce_sum(local_sum)
    if valid:
        for i in range(lane, T4, WARP_SIZE):
            if i <= last_word:
                a = att[base + i]
                d = datt[base + i]
                p = 4 * i
                g0 = scale * causal_or_zero(bf16x2_low(low_half(a)), p, own) * (bf16x2_low(low_half(d)) - total)
                g1 = scale * causal_or_zero(bf16x2_high(low_half(a)), p + 1, own) * (bf16x2_high(low_half(d)) - total)
                g2 = scale * causal_or_zero(bf16x2_low(high_half(a)), p + 2, own) * (bf16x2_low(high_half(d)) - total)
                g3 = scale * causal_or_zero(bf16x2_high(high_half(a)), p + 3, own) * (bf16x2_high(high_half(d)) - total)
                dpreatt[base + i] = join_halves(pack_bf16x2(g0, g1), pack_bf16x2(g2, g3))
            else:
                dpreatt[base + i] = uint64(0)


PTX_SIGNATURES = {
    permute_kernel: "void(uint64[::1], uint64[::1], uint64[::1], uint64[::1], int64, int64, int64)",
    permute_backward_kernel: "void(uint64[::1], uint64[::1], uint64[::1], uint64[::1], int64, int64, int64)",
    unpermute_kernel: "void(uint64[::1], uint64[::1], int64, int64, int64)",
    unpermute_backward_kernel: "void(uint64[::1], uint64[::1], int64, int64, int64)",
    softmax_forward_kernel: "void(uint64[::1], uint64[::1], int64, int64, float32)",
    softmax_backward_kernel: "void(uint64[::1], uint64[::1], uint64[::1], int64, int64, float32)",
}

# ---- launchers -----------------------------------------------------------------------------------

# Threads per block: 256 on a GPU; the simulator runs each thread as a Python thread, so fewer.
BLOCK_SIZE = 128 if SIMULATOR else 256


def _words(array, count=None):
    """A contiguous bf16 array (or its first `count` elements) as a flat array of uint64 words."""
    flat = array.reshape(array.size)
    if count is not None:
        flat = flat[:count]
    return flat.view(np.uint64)


def _dimensions(name, array, NH):
    """B, T, C, HS from a (B,T,C) array; the shape rules every launcher shares."""
    if len(array.shape) != 3:
        raise ValueError(f"{name}: expected shape (B, T, C), got {tuple(array.shape)}")
    B, T, C = array.shape
    if NH <= 0 or C % NH:
        raise ValueError(f"C={C} is not divisible by NH={NH}")
    HS = C // NH
    if HS % 4 or T % 4:
        raise ValueError(f"head size HS={HS} and T={T} must be multiples of 4 (kernels move four bf16 per word)")
    if HS > 4096:
        raise ValueError(f"head size HS={HS}: at most 4096 (a block row holds one head row of HS/4 words)")
    return B, T, C, HS


def _check_size(name, array, size, at_least=False):
    check_contiguous(name, array, np.uint16)
    if (array.size < size) if at_least else (array.size != size):
        raise ValueError(f"{name}: {'at least ' if at_least else ''}{size} bf16 elements needed, "
                         f"got shape {tuple(array.shape)} ({array.size})")


def _heads(buffer, B, NH, T, HS):
    """q, k, v (each (B*NH, T, HS)) inside a (3, B, NH, T, HS) buffer."""
    heads = buffer.reshape(3, B * NH, T, HS)
    return heads[0], heads[1], heads[2]


def _permute_grid(B, T, NH, HS4, threads=BLOCK_SIZE):
    """(grid, block) of the permute kernels: blocks of HS4 words x `rows` positions (about
    `threads` threads; no more rows than T needs), each thread PERMUTE_WORDS_PER_THREAD positions."""
    rows = max(1, min(threads // HS4, ceil_div(T, PERMUTE_WORDS_PER_THREAD)))
    return (ceil_div(T, PERMUTE_WORDS_PER_THREAD * rows), NH, B), (HS4, rows)


def _softmax_grid(n_rows):
    warps_per_block = min(BLOCK_SIZE // WARP_SIZE, n_rows)
    return ceil_div(n_rows, warps_per_block), warps_per_block * WARP_SIZE


def attention_forward(out, qkvr, att, scratch, inp, NH, stream=0):
    """Causal multi-head attention, as llm.c's attention_forward.
    inp: (B,T,3C), the qkv matmul's output laid out (B, T, 3, NH, HS); only read.
    out: (B,T,C).
    qkvr: 3*B*T*C elements, any shape; receives q, k, v permuted to (3, B, NH, T, HS); saved for the backward.
    att: (B,NH,T,T); receives preatt, then (in place) the softmax; saved for the backward.
    scratch: at least B*T*C elements; receives att @ v as (B, NH, T, HS) before the unpermute. It may
      be inp itself (inp is dead once permuted; llm.c reuses it so)."""
    B, T, C, HS = _dimensions("out", out, NH)
    check_contiguous("out", out, np.uint16)
    check_contiguous("inp", inp, np.uint16, (B, T, 3 * C))
    _check_size("qkvr", qkvr, 3 * B * T * C)
    check_contiguous("att", att, np.uint16, (B, NH, T, T))
    _check_size("scratch", scratch, B * T * C, at_least=True)
    HS4 = HS // 4
    n = B * T * C
    q, k, v = _heads(qkvr, B, NH, T, HS)
    qkvr_words = _words(qkvr)
    n_words = n // 4
    permute_grid, permute_block = _permute_grid(B, T, NH, HS4)
    permute_kernel[permute_grid, permute_block, stream](
        qkvr_words[:n_words], qkvr_words[n_words:2 * n_words], qkvr_words[2 * n_words:], _words(inp), T, NH, HS4)
    att_heads = att.reshape(B * NH, T, T)
    matmul_batched(att_heads, q, k, transb=True, stream=stream)  # preatt, in att
    grid, block = _softmax_grid(B * NH * T)
    att_words = _words(att)
    softmax_forward_kernel[grid, block, stream](att_words, att_words, B * NH * T, T // 4, np.float32(1.0 / math.sqrt(HS)))
    vaccum = scratch.reshape(scratch.size)[:n].reshape(B * NH, T, HS)
    matmul_batched(vaccum, att_heads, v, stream=stream)
    unpermute_kernel[permute_grid, permute_block, stream](_words(out), _words(scratch, n), T, NH, HS4)


def attention_backward(dinp, dqkvr, datt, dout, qkvr, att, NH, stream=0):
    """Backward of attention_forward, as llm.c's attention_backward.
    dout: (B,T,C), the gradient of out.
    qkvr, att: as the forward left them.
    dinp: (B,T,3C), overwritten with the gradient of inp (not accumulated, as llm.c).
    dqkvr: 3*B*T*C elements of scratch (dq, dk, dv permuted; the dq third first holds dout permuted).
    datt: (B,NH,T,T) scratch; holds datt, then (in place) dpreatt."""
    B, T, C, HS = _dimensions("dout", dout, NH)
    check_contiguous("dout", dout, np.uint16)
    check_contiguous("dinp", dinp, np.uint16, (B, T, 3 * C))
    _check_size("dqkvr", dqkvr, 3 * B * T * C)
    _check_size("qkvr", qkvr, 3 * B * T * C)
    check_contiguous("datt", datt, np.uint16, (B, NH, T, T))
    check_contiguous("att", att, np.uint16, (B, NH, T, T))
    HS4 = HS // 4
    n_words = B * T * C // 4
    q, k, v = _heads(qkvr, B, NH, T, HS)
    dq, dk, dv = _heads(dqkvr, B, NH, T, HS)
    dqkvr_words = _words(dqkvr)
    dq_words, dk_words, dv_words = dqkvr_words[:n_words], dqkvr_words[n_words:2 * n_words], dqkvr_words[2 * n_words:]
    dout_h = dq  # dout permuted to (B, NH, T, HS), parked where dq goes later
    permute_grid, permute_block = _permute_grid(B, T, NH, HS4)
    unpermute_backward_kernel[permute_grid, permute_block, stream](dq_words, _words(dout), T, NH, HS4)
    att_heads = att.reshape(B * NH, T, T)
    datt_heads = datt.reshape(B * NH, T, T)
    matmul_batched(datt_heads, dout_h, v, transb=True, stream=stream)
    matmul_batched(dv, att_heads, dout_h, transa=True, stream=stream)
    grid, block = _softmax_grid(B * NH * T)
    datt_words = _words(datt)
    softmax_backward_kernel[grid, block, stream](datt_words, datt_words, _words(att), B * NH * T, T // 4,
                                                 np.float32(1.0 / math.sqrt(HS)))
    matmul_batched(dq, datt_heads, k, stream=stream)  # overwrites dout_h: its last reader was dv
    matmul_batched(dk, datt_heads, q, transa=True, stream=stream)
    permute_backward_kernel[permute_grid, permute_block, stream](
        _words(dinp), dq_words, dk_words, dv_words, T, NH, HS4)
