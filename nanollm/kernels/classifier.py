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

Three kernels, picked by NANOLLM_CLASSIFIER (read once, at import; the launcher's `variant` overrides):
  v1                fused_classifier_kernel, as above;
  v2                fused_classifier_staged_kernel: pass 1 also copies the row into shared memory and
                    pass 2 reads it from there, so DRAM sees one read and one write whatever L2
                    keeps; 8 loads in flight per thread; bf16 rounding by the hardware's cvt. The
                    same losses and dlogits as v1 bit for bit (NaN dlogits aside), at the same block
                    size. Needs a row's real words in shared memory (100.5 KB for GPT-2; two blocks
                    fit per Hopper SM); a larger row falls back to v1.
  v3 (the default)  fused_classifier_batched_kernel: v2's staging with fewer instructions per word
                    (the max of a batch of words first, one rescale of the sum per batch, exp2 with
                    one fma per value, pass 2 scaled once) and 12 loads in flight per thread. Sums
                    in another order than v1/v2: losses within ~1.3e-7 of v2's, ~7 dlogits in
                    10^5 differ from v2's (the error against float64 is v2's). At most
                    BATCHED_MAX_THREADS threads a block (its registers). On an H200: 1.064
                    against v2's 1.136 ms over 16,384 GPT-2 rows (benchmarks/RESULTS.md).
Evaluation (no dlogits) runs v1, the faster there.
"""

import math

import numpy as np
from numba import cuda, float32, uint32, uint64

from .bf16 import bf16_to_float, bf16x2_high, bf16x2_low, high_half, join_halves, low_half, pack_bf16x2, \
    pack_bf16x2_rn
from .cuda_common import SIMULATOR, WARP_SIZE, allow_large_dynamic_shared_memory, block_reduce_max, \
    block_reduce_sum, check_contiguous, check_variant, device_address, device_function, kernel, \
    variant_from_environment

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


@device_function
def block_row(logits, targets, words_per_row):
    """This block's row (in reverse order, see the docstring): (row, its first word, its target, the
    target's logit). Thread 0 reads that logit, the others get 0; read before anyone can overwrite
    it, as the block reductions' barriers come between it and pass 2's writes."""
    row = cuda.gridDim.x - 1 - cuda.blockIdx.x
    row_start = row * words_per_row
    target = targets[row]
    target_logit = float32(0.0)
    if cuda.threadIdx.x == 0:
        target_logit = bf16x4_lane(logits[row_start + target // 4], target % 4)
    return row, row_start, target, target_logit


@device_function
def row_layout(V, threads):
    """(words with four real columns, real lanes of the word after them (0: none), the thread whose
    strided walk w = tid, tid + threads, ... reaches that straddling word)."""
    full_words = V // 4
    return full_words, V - 4 * full_words, full_words % threads


@device_function
def row_max_and_sum(running_max, running_sum, shared_max, shared_sum, losses, row, target_logit):
    """The row's max and sum of exp(x - max) from each thread's running pair (every thread gets
    them); thread 0 writes the row's loss."""
    row_max = block_reduce_max(running_max, shared_max)
    running_sum *= math.exp(running_max - row_max)
    row_sum = block_reduce_sum(running_sum, shared_sum)
    if cuda.threadIdx.x == 0:
        losses[row] = math.log(row_sum) + (row_max - target_logit)
    return row_max, row_sum


@kernel(fastmath=True)
def fused_classifier_kernel(logits, losses, targets, dloss, V, words_per_row, write_dlogits):
    # logits: (BT * Vp/4,) uint64 words, row r at words [r*words_per_row, (r+1)*words_per_row);
    #         with write_dlogits, columns < V are overwritten with dL/dlogits (bf16)
    # losses: (BT,) fp32 <- -log prob[target]; targets: (BT,) int32, each in [0, V)
    shared_max = cuda.shared.array(32, float32)
    shared_sum = cuda.shared.array(32, float32)
    row, row_start, target, target_logit = block_row(logits, targets, words_per_row)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    full_words, boundary_lanes, boundary_thread = row_layout(V, threads)

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
    row_max, row_sum = row_max_and_sum(running_max, running_sum, shared_max, shared_sum, losses, row, target_logit)
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


# ---- v2: the row kept in shared memory between the passes ----------------------------------------
# v1's second pass hopes to find the row in L2, but v1 (29 registers) runs 2048 threads per SM:
# 4 rows of 100 KB in flight per SM, 53 MB on 132 SMs, more than the 50 MB L2 holds beside the
# dlogits being written, so pass 2 probably reads DRAM again (v1 ran at ~1.9 TB/s in a B=64 step
# on an H200). v2 copies the row into shared memory as pass 1 reads it: DRAM sees one read and one
# write, whatever L2 does. A GPT-2 row (12,565 words, 100.5 KB) leaves room for two blocks per SM
# (228 KB of shared memory on Hopper), so one block's reductions and stores overlap the other's
# loads. Pass 1 issues LOADS_IN_FLIGHT loads per thread before using any (24 KB in flight per
# 384-thread block; v1 has two words per thread). Pass 2 reads shared memory, compares with the
# target once per word instead of per element, and rounds with the hardware's cvt
# (pack_bf16x2_rn) instead of integer code: ~50 PTX instructions per word where v1 has ~90, which
# matters when 4.8 TB/s asks an SM for a row every ~6 us. Each thread folds its words in v1's
# order and the reductions are v1's, so at the same block size the losses and dlogits are v1's bit
# for bit (but a NaN dlogit is 0x7FFF where v1 writes 0x7FC0).

# 8 words: 48 registers (ptxas, sm_90), so two 512-thread blocks fit an SM's 64K; 12 took 68, 16 took 80.
# The uint64(...) indices below skip Numba's negative-index wraparound code: 61 registers without.
LOADS_IN_FLIGHT = 8  # words per thread loaded before any is used


@device_function
def dlogits_word_rn(word, first_column, target, row_max, inverse_sum, dloss):
    """dlogits_word's values (the same arithmetic), rounded by pack_bf16x2_rn."""
    low = low_half(word)
    high = high_half(word)
    x0, x1, x2, x3 = bf16x2_low(low), bf16x2_high(low), bf16x2_low(high), bf16x2_high(high)
    if first_column <= target < first_column + 4:  # the word holding the target: once per row
        d0 = dlogit(x0, first_column, target, row_max, inverse_sum, dloss)
        d1 = dlogit(x1, first_column + 1, target, row_max, inverse_sum, dloss)
        d2 = dlogit(x2, first_column + 2, target, row_max, inverse_sum, dloss)
        d3 = dlogit(x3, first_column + 3, target, row_max, inverse_sum, dloss)
    else:
        d0 = (math.exp(x0 - row_max) * inverse_sum) * dloss
        d1 = (math.exp(x1 - row_max) * inverse_sum) * dloss
        d2 = (math.exp(x2 - row_max) * inverse_sum) * dloss
        d3 = (math.exp(x3 - row_max) * inverse_sum) * dloss
    return join_halves(pack_bf16x2_rn(d0, d1), pack_bf16x2_rn(d2, d3))


@device_function
def load_batch(batch, logits, row_start, w, threads, full_words, count):
    """batch[k] <- word w + k * threads of the row, k < count (a constant at each call: the loop
    unrolls, the loads are independent and all issue before the first use)."""
    for k in range(count):
        if w + k * threads < full_words:
            batch[k] = logits[uint64(row_start + w + k * threads)]


@device_function
def boundary_word_of(logits, row_start, full_words, boundary_lanes, boundary_thread):
    """The word that straddles column V, read by the one thread that folds it (0 elsewhere)."""
    word = uint64(0)
    if boundary_lanes > 0 and cuda.threadIdx.x == boundary_thread:
        word = logits[row_start + full_words]
    return word


@device_function
def write_boundary_dlogits(logits, old, row_start, full_words, boundary_lanes, target, row_max, inverse_sum,
                           dloss):
    """The straddling word's dlogits over its real lanes; its padding lanes written back unchanged."""
    new = dlogits_word_rn(old, 4 * full_words, target, row_max, inverse_sum, dloss)
    keep_new = (uint64(1) << uint64(16 * boundary_lanes)) - uint64(1)
    logits[row_start + full_words] = (new & keep_new) | (old & ~keep_new)


@kernel(fastmath=True)
def fused_classifier_staged_kernel(logits, losses, targets, dloss, V, words_per_row, write_dlogits):
    # as fused_classifier_kernel; launched with 8 * ceil(V/4) bytes of dynamic shared memory for the
    # row's real words (padding words are never read). The launcher runs it only with write_dlogits
    # (loss-only evaluation takes v1); its write_dlogits=0 branches stay as the GPU measured them
    staged = cuda.shared.array(0, uint64)  # word w is written and read back by the thread that loaded it
    shared_max = cuda.shared.array(32, float32)
    shared_sum = cuda.shared.array(32, float32)
    row, row_start, target, target_logit = block_row(logits, targets, words_per_row)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    full_words, boundary_lanes, boundary_thread = row_layout(V, threads)
    # loaded now, folded last (as v1): no lone load at the end
    boundary_word = boundary_word_of(logits, row_start, full_words, boundary_lanes, boundary_thread)

    # pass 1: the thread's words w = tid, tid + threads, ..., LOADS_IN_FLIGHT at a time
    batch = cuda.local.array(LOADS_IN_FLIGHT, uint64)  # registers: every index is a constant once unrolled
    running_max = float32(NEG_BIG)
    running_sum = float32(0.0)
    w = tid
    while w < full_words:
        load_batch(batch, logits, row_start, w, threads, full_words, LOADS_IN_FLIGHT)
        for k in range(LOADS_IN_FLIGHT):  # folded one word at a time in increasing order, as v1
            if w + k * threads < full_words:
                if write_dlogits:
                    staged[uint64(w + k * threads)] = batch[k]
                running_max, running_sum = online_softmax_word(batch[k], 4, running_max, running_sum)
        w += LOADS_IN_FLIGHT * threads
    if boundary_lanes > 0 and tid == boundary_thread:
        if write_dlogits:
            staged[full_words] = boundary_word
        running_max, running_sum = online_softmax_word(boundary_word, boundary_lanes, running_max, running_sum)
    row_max, row_sum = row_max_and_sum(running_max, running_sum, shared_max, shared_sum, losses, row, target_logit)
    if not write_dlogits:
        return

    # pass 2: from shared memory (no barrier needed: each thread reads back only its own words)
    inverse_sum = float32(1.0) / row_sum
    w = tid
    while w < full_words:
        dlogits = dlogits_word_rn(staged[uint64(w)], 4 * w, target, row_max, inverse_sum, dloss)
        logits[uint64(row_start + w)] = dlogits
        w += threads
    if boundary_lanes > 0 and tid == boundary_thread:
        write_boundary_dlogits(logits, staged[full_words], row_start, full_words, boundary_lanes, target, row_max,
                               inverse_sum, dloss)


# ---- v3: v2's staging with fewer instructions per word and more loads in flight --------------------
# v2 folds each word into the running (max, sum) on its own: a compare, a branch, and per value a
# subtraction, a multiplication and the exponential. v3 takes the max of a whole batch of loaded
# words first and rescales the running sum at most once per batch, then sums exp2(x*log2(e) -
# max*log2(e)) (one fma and the hardware's ex2 per value) into two independent sums; pass 2 scales
# by inverse_sum * dloss once. 12 words in flight per thread (at 384 threads two blocks an SM still
# fit the registers). Another summation order than v1/v2: the same values within a few float32
# roundings, not the same bits.
BATCH_WORDS = 12  # v3's words per thread loaded before any is used: 78 registers (16: 84, one block an SM)
BATCHED_MAX_THREADS = 768  # 78 registers (80 as allocated) a thread: 768 threads fill an SM's 64K
LOG2E = 1.4426950408889634


@device_function
def bf16x4_max(word):
    a, b = bf16x2_low(low_half(word)), bf16x2_high(low_half(word))
    c, d = bf16x2_low(high_half(word)), bf16x2_high(high_half(word))
    return max(max(a, b), max(c, d))


@device_function
def exp2_pair_sum(word, log2e, shift):
    """exp2(x * log2e - shift) summed over the word's four values, as two pairs."""
    a, b = bf16x2_low(low_half(word)), bf16x2_high(low_half(word))
    c, d = bf16x2_low(high_half(word)), bf16x2_high(high_half(word))
    return math.exp2(a * log2e - shift) + math.exp2(b * log2e - shift), \
        math.exp2(c * log2e - shift) + math.exp2(d * log2e - shift)


@device_function
def dlogits_word_scaled(word, first_column, target, row_max, inverse_sum, dloss, log2e, shift, scale):
    """dlogits_word_rn's values with exp2 and the scale inverse_sum * dloss applied once."""
    if first_column <= target < first_column + 4:  # the target's word (once per row): as v2
        return dlogits_word_rn(word, first_column, target, row_max, inverse_sum, dloss)
    a, b = bf16x2_low(low_half(word)), bf16x2_high(low_half(word))
    c, d = bf16x2_low(high_half(word)), bf16x2_high(high_half(word))
    return join_halves(pack_bf16x2_rn(math.exp2(a * log2e - shift) * scale, math.exp2(b * log2e - shift) * scale),
                       pack_bf16x2_rn(math.exp2(c * log2e - shift) * scale, math.exp2(d * log2e - shift) * scale))


@kernel(fastmath=True)
def fused_classifier_batched_kernel(logits, losses, targets, dloss, V, words_per_row, write_dlogits):
    # as fused_classifier_staged_kernel (same launch, same shared memory); only launched with write_dlogits
    staged = cuda.shared.array(0, uint64)
    shared_max = cuda.shared.array(32, float32)
    shared_sum = cuda.shared.array(32, float32)
    row, row_start, target, target_logit = block_row(logits, targets, words_per_row)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    full_words, boundary_lanes, boundary_thread = row_layout(V, threads)
    boundary_word = boundary_word_of(logits, row_start, full_words, boundary_lanes, boundary_thread)
    log2e = float32(LOG2E)

    batch = cuda.local.array(BATCH_WORDS, uint64)
    running_max = float32(NEG_BIG)
    running_sum = float32(0.0)
    w = tid
    while w < full_words:
        load_batch(batch, logits, row_start, w, threads, full_words, BATCH_WORDS)
        batch_max = running_max
        for k in range(BATCH_WORDS):
            if w + k * threads < full_words:
                staged[uint64(w + k * threads)] = batch[k]
                batch_max = max(batch_max, bf16x4_max(batch[k]))
        running_sum *= math.exp2((running_max - batch_max) * log2e)  # 1 when the max stayed, 0 at first
        running_max = batch_max
        shift = running_max * log2e
        sum_low = float32(0.0)
        sum_high = float32(0.0)
        for k in range(BATCH_WORDS):
            if w + k * threads < full_words:
                low, high = exp2_pair_sum(batch[k], log2e, shift)
                sum_low += low
                sum_high += high
        running_sum += sum_low + sum_high
        w += BATCH_WORDS * threads
    if boundary_lanes > 0 and tid == boundary_thread:
        staged[full_words] = boundary_word
        running_max, running_sum = online_softmax_word(boundary_word, boundary_lanes, running_max, running_sum)
    row_max, row_sum = row_max_and_sum(running_max, running_sum, shared_max, shared_sum, losses, row, target_logit)
    if not write_dlogits:
        return

    # pass 2: from shared memory, each thread its own words
    inverse_sum = float32(1.0) / row_sum
    scale = inverse_sum * dloss
    shift = row_max * log2e
    w = tid
    while w < full_words:
        logits[uint64(row_start + w)] = dlogits_word_scaled(staged[uint64(w)], 4 * w, target, row_max, inverse_sum,
                                                            dloss, log2e, shift, scale)
        w += threads
    if boundary_lanes > 0 and tid == boundary_thread:
        write_boundary_dlogits(logits, staged[full_words], row_start, full_words, boundary_lanes, target, row_max,
                               inverse_sum, dloss)


_SIGNATURE = "void(uint64[::1], float32[::1], int32[::1], float32, int32, int32, int32)"
PTX_SIGNATURES = {
    fused_classifier_kernel: _SIGNATURE,
    fused_classifier_staged_kernel: _SIGNATURE,
    fused_classifier_batched_kernel: _SIGNATURE,
}

# llm.c uses 1024; on an H100 512 was 26% faster than 1024, and on an H200 v2 ran a d12 B=64 batch in
# 4.52 ms with 384 against 4.71 with 512 (benchmarks/RESULTS.md; two blocks an SM either way, set by
# the staged rows; why fewer threads a row win was not measured). The simulator runs a Python
# thread per GPU thread: small blocks keep its tests quick.
BLOCK_SIZE = 32 if SIMULATOR else 384

VARIANTS = ("v1", "v2", "v3")
# on an H200 (benchmarks/RESULTS.md): v2 4.68 against v1's 5.61 ms at d12 B=64; v3 1.064 against
# v2's 1.136 ms over a 16,384-row block of the lm head
DEFAULT_VARIANT = "v3"
VARIANT = variant_from_environment("NANOLLM_CLASSIFIER", VARIANTS, DEFAULT_VARIANT)
# the kernel each variant runs when it writes dlogits (training); the loss alone always runs v1's
TRAINING_KERNELS = dict(v1=fused_classifier_kernel, v2=fused_classifier_staged_kernel,
                        v3=fused_classifier_batched_kernel)

_staged_row_limit = {}  # (device id, kernel) -> bytes of dynamic shared memory a staged kernel may take


def staged_row_bytes(V):
    """v2's dynamic shared memory for a row: its words holding real columns (the straddling one too)."""
    return 8 * ((V + 3) // 4)


def _staged_row_fits(nbytes, kernel):
    """Whether a staged kernel (v2, v3) can keep a row of nbytes on chip here; the first call per
    device raises the kernel's shared memory limit (outside the step's graph: the first micro-step
    runs eagerly)."""
    if SIMULATOR:
        return True
    key = (cuda.get_current_device().id, kernel)
    if key not in _staged_row_limit:
        _staged_row_limit[key] = allow_large_dynamic_shared_memory(kernel, _SIGNATURE)
    return nbytes <= _staged_row_limit[key]


def fused_classifier(logits, losses, dloss, targets, V, write_dlogits=True, block_size=BLOCK_SIZE, stream=0,
                     variant=None):
    """Cross-entropy of softmax(logits[..., :V]) against targets, and its gradient in place.

    logits is (B,T,Vp) bf16 (uint16), Vp a multiple of 4, V <= Vp the real vocabulary size.
    losses (B,T) fp32 <- -log prob[b,t,target]. targets (B,T) int32, each in [0, V) (not checked:
    that would need a sync; an out-of-range target gives a wrong loss, or a fault).
    write_dlogits: logits[..., :V] <- (prob - onehot(target)) * dloss, dloss = 1/(B*T) for the
    mean loss (times the caller's scaling for gradient accumulation); columns V..Vp-1 unchanged.
    write_dlogits=False (evaluation): only the losses, logits untouched.
    variant: one of VARIANTS (see the module docstring); None takes NANOLLM_CLASSIFIER's (default
    DEFAULT_VARIANT). v3 takes at most BATCHED_MAX_THREADS threads a block (a ValueError above).
    """
    variant = check_variant(VARIANT if variant is None else variant, VARIANTS)
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
    kernel, shared_bytes = fused_classifier_kernel, 0
    # loss only (evaluation): v1 reads the row once either way and was the faster on an H200
    # (2.46 against 2.84 ms at d12 B=64), so v2 and v3 stage rows only when they write dlogits
    if write_dlogits and TRAINING_KERNELS[variant] is not fused_classifier_kernel:
        kernel, shared_bytes = TRAINING_KERNELS[variant], staged_row_bytes(V)
        if kernel is fused_classifier_batched_kernel and block_size > BATCHED_MAX_THREADS:
            raise ValueError(f"block_size {block_size}: the classifier's v3 runs at most {BATCHED_MAX_THREADS} "
                             f"threads a block (its registers); use v2 or a smaller block")
        if not _staged_row_fits(shared_bytes, kernel):  # a vocabulary too large for a row on chip: v1
            kernel, shared_bytes = fused_classifier_kernel, 0
    kernel[rows, block_size, stream, shared_bytes](
        words, losses.reshape(rows), targets.reshape(rows), np.float32(dloss), np.int32(V),
        np.int32(Vp // 4), np.int32(bool(write_dlogits)))
