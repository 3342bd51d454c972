"""Fused classifier: softmax + cross-entropy loss + its gradient, in one kernel. After llm.c's
fused_classifier.cuh (fused_classifier_kernel5).

The logits (B,T,Vp) are the largest tensor of a GPT-2 step (Vp=50304 columns, V=50257 of them
real). Never materialising the probabilities, one block per row:
  pass 1 streams the V real columns once, keeping per thread an online max and sum of exp
          (rescaled only when a new max appears), then a block reduction gives the row's max and
          sum, and the loss log(sum) + max - logit[target] (= -log prob[target]);
  pass 2 reads the row again (from L2, if the ~100 KB rows of all resident blocks fit: 26 MB
          with 1024-thread blocks on an H100) and overwrites the real columns in place with
          (prob - onehot(target)) * dloss.
So DRAM should see one read and one write of the logits, the floor. losses[row] is written (llm.c
subtracts from a zeroed buffer; here the caller need not zero it). Rows go in reverse order, as in
llm.c: the matmul that produced the logits wrote the last rows last, so they are likeliest in L2.

Wide words: each thread moves uint64 words (four bf16), so Vp must be a multiple of 4 (llm.c pads
V to a multiple of 128). V itself may be anything (50257 is odd): the one word that straddles
column V is handled apart, by one thread, which masks its padding lanes out of the softmax and
writes them back unchanged. fastmath: exp and log become ex2/lg2.approx, errors far below one bf16
rounding; under fastmath infinities are not trusted, hence a large finite "minus infinity".
"""

import math

import numpy as np
from numba import cuda, float32, uint32, uint64

from .bf16 import bf16_to_float, bf16x2_high, bf16x2_low, high_half, join_halves, low_half, pack_bf16x2
from .cuda_common import SIMULATOR, WARP_SIZE, block_reduce_max, block_reduce_sum, check_contiguous, device_address, \
    device_function, kernel

# below any logit, yet exp(NEG_BIG - max) is a plain 0 and NEG_BIG - max does not overflow
NEG_BIG = -1e30


@device_function
def bf16x4_lane(word, lane):
    """bf16 element `lane` (0..3, lowest address first) of a uint64 word, as float."""
    return bf16_to_float(uint32((word >> uint64(16 * lane)) & uint64(0xFFFF)))


@device_function
def online_softmax_word(word, real_lanes, running_max, running_sum):
    """Fold the first real_lanes (1..4) values of a word into a running (max, sum of exp(x - max))."""
    a, b = bf16x2_low(low_half(word)), bf16x2_high(low_half(word))
    c, d = bf16x2_low(high_half(word)), bf16x2_high(high_half(word))
    if real_lanes < 4:  # only the word that straddles column V: its padding lanes count as -inf
        neg_big = float32(NEG_BIG)
        b = b if real_lanes > 1 else neg_big
        c = c if real_lanes > 2 else neg_big
        d = neg_big
    word_max = max(max(a, b), max(c, d))
    if word_max > running_max:
        running_sum *= math.exp(running_max - word_max)
        running_max = word_max
    running_sum += (math.exp(a - running_max) + math.exp(b - running_max)) \
        + (math.exp(c - running_max) + math.exp(d - running_max))
    return running_max, running_sum


@device_function
def dlogit(x, column, target, row_max, inverse_sum, dloss):
    prob = math.exp(x - row_max) * inverse_sum
    if column == target:
        prob -= float32(1.0)
    return prob * dloss


@device_function
def dlogits_word(word, first_column, target, row_max, inverse_sum, dloss):
    low = low_half(word)
    high = high_half(word)
    d0 = dlogit(bf16x2_low(low), first_column, target, row_max, inverse_sum, dloss)
    d1 = dlogit(bf16x2_high(low), first_column + 1, target, row_max, inverse_sum, dloss)
    d2 = dlogit(bf16x2_low(high), first_column + 2, target, row_max, inverse_sum, dloss)
    d3 = dlogit(bf16x2_high(high), first_column + 3, target, row_max, inverse_sum, dloss)
    return join_halves(pack_bf16x2(d0, d1), pack_bf16x2(d2, d3))


@kernel(fastmath=True)
def fused_classifier_kernel(logits, losses, targets, dloss, V, words_per_row, write_dlogits):
    # logits: (BT * Vp/4,) uint64 words, row r at words [r*words_per_row, (r+1)*words_per_row);
    #         with write_dlogits, columns < V are overwritten with dL/dlogits (bf16)
    # losses: (BT,) fp32 <- -log prob[target]; targets: (BT,) int32, each in [0, V)
    shared_max = cuda.shared.array(32, float32)
    shared_sum = cuda.shared.array(32, float32)
    row = cuda.gridDim.x - 1 - cuda.blockIdx.x
    row_start = row * words_per_row
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    target = targets[row]
    full_words = V // 4  # words with four real columns; then one straddling word if V % 4
    boundary_lanes = V - 4 * full_words
    boundary_thread = full_words % threads  # the thread whose strided walk reaches that word

    # read the target's logit before anyone can overwrite it; the barriers below order it
    target_logit = float32(0.0)
    if tid == 0:
        target_logit = bf16x4_lane(logits[row_start + target // 4], target % 4)

    # pass 1: running max and sum of exp over the real columns
    running_max = float32(NEG_BIG)
    running_sum = float32(0.0)
    w = tid
    while w + threads < full_words:  # two independent loads in flight
        first = logits[row_start + w]
        second = logits[row_start + w + threads]
        running_max, running_sum = online_softmax_word(first, 4, running_max, running_sum)
        running_max, running_sum = online_softmax_word(second, 4, running_max, running_sum)
        w += 2 * threads
    if w < full_words:
        running_max, running_sum = online_softmax_word(logits[row_start + w], 4, running_max, running_sum)
    if boundary_lanes > 0 and tid == boundary_thread:
        running_max, running_sum = online_softmax_word(logits[row_start + full_words], boundary_lanes,
                                                       running_max, running_sum)
    row_max = block_reduce_max(running_max, shared_max)
    running_sum *= math.exp(running_max - row_max)
    row_sum = block_reduce_sum(running_sum, shared_sum)
    if tid == 0:
        losses[row] = math.log(row_sum) + (row_max - target_logit)
    if not write_dlogits:
        return

    # pass 2: overwrite the real columns with (prob - onehot(target)) * dloss
    inverse_sum = float32(1.0) / row_sum
    w = tid
    while w + threads < full_words:  # again two loads in flight (L2 hits, but still ~300 ns)
        i, j = row_start + w, row_start + w + threads
        first, second = logits[i], logits[j]
        logits[i] = dlogits_word(first, 4 * w, target, row_max, inverse_sum, dloss)
        logits[j] = dlogits_word(second, 4 * (w + threads), target, row_max, inverse_sum, dloss)
        w += 2 * threads
    if w < full_words:
        i = row_start + w
        logits[i] = dlogits_word(logits[i], 4 * w, target, row_max, inverse_sum, dloss)
    if boundary_lanes > 0 and tid == boundary_thread:
        i = row_start + full_words
        old = logits[i]
        new = dlogits_word(old, 4 * full_words, target, row_max, inverse_sum, dloss)
        keep_new = (uint64(1) << uint64(16 * boundary_lanes)) - uint64(1)  # the real lanes
        logits[i] = (new & keep_new) | (old & ~keep_new)


PTX_SIGNATURES = {
    fused_classifier_kernel: "void(uint64[::1], float32[::1], int32[::1], float32, int32, int32, int32)",
}

# llm.c uses 1024; on an H100 512 was 26% faster (benchmarks/classifier.py, RESULTS.md). The simulator
# runs a Python thread per GPU thread: small blocks keep its tests quick.
BLOCK_SIZE = 32 if SIMULATOR else 512


def fused_classifier(logits, losses, dloss, targets, V, write_dlogits=True, block_size=BLOCK_SIZE, stream=0):
    """Cross-entropy of softmax(logits[..., :V]) against targets, and its gradient in place.

    logits is (B,T,Vp) bf16 (uint16), Vp a multiple of 4, V <= Vp the real vocabulary size.
    losses (B,T) fp32 <- -log prob[b,t,target]. targets (B,T) int32, each in [0, V) (not checked:
    that would need a sync; an out-of-range target gives a wrong loss, or a fault).
    write_dlogits: logits[..., :V] <- (prob - onehot(target)) * dloss, dloss = 1/(B*T) for the
    mean loss (times the caller's scaling for gradient accumulation); columns V..Vp-1 unchanged.
    write_dlogits=False (evaluation): only the losses, logits untouched.
    """
    check_contiguous("logits", logits, np.uint16)
    if logits.ndim < 2:
        raise ValueError(f"logits: expected (B,T,Vp) or (BT,Vp), got shape {logits.shape}")
    shape = tuple(logits.shape)  # a plain tuple: the simulator's shape rejects negative indices
    rows_shape, Vp = shape[:-1], shape[-1]
    check_contiguous("losses", losses, np.float32, rows_shape)
    check_contiguous("targets", targets, np.int32, rows_shape)
    if Vp % 4:
        raise ValueError(f"logits: padded vocabulary Vp={Vp} must be a multiple of 4 (four bf16 per word)")
    if not 0 < V <= Vp:
        raise ValueError(f"V={V} must be in [1, Vp={Vp}]")
    if block_size % WARP_SIZE or not WARP_SIZE <= block_size <= 1024:
        raise ValueError(f"block_size must be a multiple of 32 in [32, 1024], got {block_size}")
    if device_address(logits) % 8:
        raise ValueError("logits: data must start 8-byte aligned for uint64 words")
    rows = int(np.prod(rows_shape))
    if rows == 0:
        return
    words = logits.reshape(logits.size).view(np.uint64)
    fused_classifier_kernel[rows, block_size, stream](
        words, losses.reshape(rows), targets.reshape(rows), np.float32(dloss), np.int32(V),
        np.int32(Vp // 4), np.int32(bool(write_dlogits)))
