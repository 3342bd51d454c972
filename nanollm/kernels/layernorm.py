"""LayerNorm forward and backward, and the residual add it is fused with. After llm.c's layernorm.cuh.

Every tensor moves as uint64 words, four bf16 per load (C must be a multiple of 4); rows are
contiguous (B*T rows of C channels); sums are fp32.

- layernorm_forward: one warp per row, the row kept in registers (ROW_WORDS words per lane, so
  C <= 32 * 4 * ROW_WORDS = 2048, every GPT-2 size): mean, then the variance around it (two
  passes over the registers, as llm.c), normalise, scale, shift; saves mean and rstd for the
  backward. Warp shuffles only, no block barrier. (llm.c's kernel6 keeps the row in shared
  memory instead; registers need no barrier and no shared-memory opt-in.)
- fused_residual_layernorm_forward: residual = inp1 + inp2 (rounded to bf16, as stored) and the
  layernorm of that, in one kernel, so the residual is not read back (llm.c's fused_residual_forward5).
- residual_forward: out = inp1 + inp2, elementwise.
- layernorm_backward: dinp += (llm.c accumulates: dinp is the residual stream's gradient);
  dweight += and dbias += summed over all B*T rows, deterministically and without atomics. Each
  thread owns one word (four channels) of a row, so its dweight/dbias sums stay in 8 registers
  across all the rows its block visits; a block works on a few rows at once and strides over the
  rest; the two row sums the dinp formula needs go through warp shuffles and one block barrier per
  row. The next row's words are loaded while the current one is finished (software pipelining).
  At the end each block adds its row slots' sums in a fixed order and writes one fp32 partial per
  channel to `scratch` (num_blocks, 2C); a second small kernel adds the partials in a fixed order
  and rounds once into the bf16 dweight/dbias. The grid depends on N only, not on the GPU, so the
  result is bitwise identical from run to run and card to card. The caller allocates scratch:
  layernorm_backward_scratch_size(C) float32 elements (1.5 MiB at C=768).
  (llm.c's kernel10 keeps the sums in shared memory and syncs twice per 256 channels of a row; the
  last block reduces the partials, found with an atomic counter.)
  With dinp_sums the backward also sums, per channel, the dinp words it writes: dinp is the
  residual stream's gradient, and its column sums are the bias gradient of the projection that
  added into the residual (attproj, fcproj), which llm.c's matmul_backward_bias reads dinp again
  for. The model takes them from here: on an H200 the backward with the sums took 0.1322 ms where
  the backward and then the bias kernel took 0.1640 at d12 B=64 (0.0784 against 0.0990 at d48
  B=16; benchmarks/layernorm_bias.py, RESULTS.md). The sums kernel
  (layernorm_backward_tree_sums_kernel, v5's code) is held to 72 registers, v5's count, so two
  416-thread blocks (C=1600) still fit an SM (uncapped it takes 80; capped, ptxas spills 8 bytes).

Variants, chosen once at import by NANOLLM_LN_FORWARD and NANOLLM_LN_BACKWARD (defaults v4 and
v5, the fastest on an H200: benchmarks/RESULTS.md; the launchers also take variant=). v1 is the plain
form of the kernels described above; v2 and v3 rewrite its instructions, not its algorithm.
Instruction and register counts below are ptxas's for sm_90 (static, per 4-channel word of a
row, from kernels compiled for 6 words per lane as at C=768).
- NANOLLM_LN_FORWARD=v2 (both forwards): the v1 kernels' launch, arithmetic and order (the same
  output bits, NaN included) with fewer integer instructions: bf16 rounding in 32-bit arithmetic
  with a select (bf16.float_to_bf16_branchless; float_to_bf16 compiled to a branch and 64-bit
  adds), unpacking from 32-bit halves, unsigned indices (Numba adds a negative-index wraparound
  to every signed one), and at most 64 registers (32 warps per SM; v1: 72-80, 24 warps). 144
  instructions per word instead of 232 in the fused forward (96 instead of 160 in the plain one),
  mostly integer ones, which Hopper issues at half the fp32 rate: at B=64, T=1024, C=768 v1's
  fused forward needs ~100 us of issue per SM against ~85 us to move its 403 MB.
- NANOLLM_LN_FORWARD=v3: v2 rounding with the GPU's cvt.rn.bf16x2.f32 (two values per
  instruction, inline PTX; bf16.pack_bf16x2_rn): 80 instructions per word in the fused forward,
  64 in the plain one. The same bits as v1 except NaN outputs (0x7FFF instead of 0x7FC0, as
  llm.c's __float2bfloat16). On the simulator it runs v2's integer rounding.
- NANOLLM_LN_FORWARD=v4 (the default; the plain forward only, the fused one runs v3): v3's
  arithmetic and bits, with a grid of PREFETCH_BLOCKS_PER_SM blocks an SM whose warps walk the
  rows, each loading its next row's words while it normalises the current one (v3 has one row's
  loads in flight per warp, and none while it reduces and writes). Rows of at most
  32 * SHORT_ROW_WORDS words (C <= 1024) -- two rows in registers; a longer row runs v3. On an
  H200 at d12 B=64: 0.0587 against v3's 0.0705 ms (80% of copy against 67%).
- NANOLLM_LN_BACKWARD=v3: v1's layout, grid, partials, per-row arithmetic and summation order,
  with the next row's mean and rstd loaded along with its words (v1 waited a memory latency for
  them at the start of every row), the forward's leaner bf16 code and v3's rounding of dinp (NaN
  as there); 70 registers instead of 80, so two 416-thread blocks (C=1600) fit an SM, as two
  384-thread ones (C=768) did. On the simulator it gives v1's bits; on an H200 a few dinp outputs
  per million differ from v1's (8 of 26M at d48 B=16), mostly by one bf16 ulp, by 2-3 where the
  sum cancels (the result much smaller than its terms). Why is not yet known (a guess: NVVM fuses
  multiply-adds differently in the two codes). The tests hold v3 to the float64 reference as they
  hold v1, and to v1 within what two fp32 evaluations of the formula can differ by (the test's
  dinp_evaluation_bound); each variant is deterministic. (A v2 backward, the same with the
  integer rounding, was up to 8 ulps from v1 in a few dinp elements on the H200, also
  unexplained: dropped, before the bound replaced the test's one-ulp limit.)
- NANOLLM_LN_BACKWARD=v5 (the default): v3 with the warps' row sums combined by a butterfly of
  shuffles (lane i takes warp i's two sums) instead of a loop over the warps in every thread. ncu
  showed v3 issue-bound, not waiting on memory (0.72-0.80 warp instructions issued per scheduler
  cycle at 26-41% of DRAM bandwidth): the loop cost ~18 instructions per warp of the row, 13 warps
  at C=1600, in each of the row's threads, for one word of work each. On the H200: 0.0773 against
  v3's 0.1283 ms at d48 B=16 (64% of copy), 0.1320 against 0.1592 at d12 B=64. The warps' sums are
  added in another order than v1's, so dinp can differ from v1's by rounding (109 of 50M elements
  at d12, 49 of 26M at d48, within the tests' dinp_evaluation_bound); dweight and dbias keep v1's
  bits (the same sums in the same order).
- Tried on the H200 and dropped (benchmarks/RESULTS.md): v3 with two rows of loads in flight
  instead of one (no faster); a warp per row with no block barrier, each warp's dweight/dbias sums
  in shared memory (16 rows in flight per SM instead of 2 at C=1600, yet 15% slower there and 83%
  slower at C=768).
"""

import math

import numpy as np
from numba import cuda, float32, uint64

from .bf16 import (add_bf16x4, add_fp32_to_bf16x4, as_words, bf16x4_get, bf16x4_pack, bf16x4_pack_cvt,
                   bf16x4_put, bf16x4_unpack)
from .cuda_common import (SIMULATOR, WARP_SIZE, ceil_div, check_contiguous, check_variant, device_function, kernel,
                          variant_from_environment, warp_reduce_sum)

LAYERNORM_EPS = 1e-5
ROW_WORDS = 16  # uint64 words of a row each lane keeps in registers: C <= 32 * 4 * 16
MAX_C = WARP_SIZE * 4 * ROW_WORDS
# rows (warps) per block of the forward kernels: 128 threads. Measured faster than 8 warps
# (benchmarks/layernorm_sweep.py, H200: the fused forward 0.1305 -> 0.1225 ms at
# d12 B=64, 0.0702 -> 0.0692 at d48 B=16); any number of warps writes the same bits
FORWARD_WARPS = 4
BACKWARD_BLOCKS = 256  # most blocks (fp32 partial rows in scratch) of layernorm_backward
ROW_SUMS_SHARED = 2 * 32 * 2  # fp32 at the start of the backward's shared memory: 2 parities, 32 warps, 2 sums
PARAM_GRAD_ROWS = 16  # threads summing partials per channel word in layernorm_param_grad_kernel
ELEMENTWISE_BLOCK = 256
FORWARD_VARIANTS = ("v1", "v2", "v3", "v4")
BACKWARD_VARIANTS = ("v1", "v3", "v5")  # v2 dropped: up to 8 bf16 ulps from v1 on an H200 (docstring)
# measured fastest on an H200 (benchmarks/RESULTS.md)
FORWARD_VARIANT = variant_from_environment("NANOLLM_LN_FORWARD", FORWARD_VARIANTS, "v4")
BACKWARD_VARIANT = variant_from_environment("NANOLLM_LN_BACKWARD", BACKWARD_VARIANTS, "v5")


# ---- kernels ---------------------------------------------------------------------------------

@device_function
def normalize_row(out, mean, rstd, x, weight, bias, row, C4, lane):
    """The warp's row is in registers (x: ROW_WORDS words per lane, word lane + 32k): write its
    layernorm to out and its mean and rstd. Every lane of the warp must call it (shuffles)."""
    inv_C = float32(1.0) / float32(4 * C4)
    total = float32(0.0)
    for k in range(ROW_WORDS):
        if lane + k * WARP_SIZE < C4:
            for j in range(4):
                total += bf16x4_get(x[k], j)
    m = warp_reduce_sum(total) * inv_C
    # variance around the mean (two passes, as llm.c: no cancellation as in E[x^2] - m^2)
    total = float32(0.0)
    for k in range(ROW_WORDS):
        if lane + k * WARP_SIZE < C4:
            for j in range(4):
                diff = bf16x4_get(x[k], j) - m
                total += diff * diff
    s = float32(1.0) / math.sqrt(warp_reduce_sum(total) * inv_C + float32(LAYERNORM_EPS))
    for k in range(ROW_WORDS):
        c = lane + k * WARP_SIZE
        if c < C4:
            w = weight[c]
            b = bias[c]
            o = uint64(0)
            for j in range(4):
                o |= bf16x4_put((bf16x4_get(x[k], j) - m) * s * bf16x4_get(w, j) + bf16x4_get(b, j), j)
            out[row * C4 + c] = o
    if lane == 0:
        mean[row] = m
        rstd[row] = s


@kernel
def layernorm_forward_kernel(out, mean, rstd, inp, weight, bias, C4):
    # out, inp: (N*C4,) uint64 words, N = B*T rows; weight, bias: (C4,) words; mean, rstd: (N,) fp32
    # block (32, warps): one warp per row
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    if row >= mean.shape[0]:
        return  # a whole warp leaves: its shuffles had no partners elsewhere
    x = cuda.local.array(ROW_WORDS, uint64)
    for k in range(ROW_WORDS):
        c = lane + k * WARP_SIZE
        if c < C4:
            x[k] = inp[row * C4 + c]
    normalize_row(out, mean, rstd, x, weight, bias, row, C4, lane)


@kernel
def fused_residual_layernorm_forward_kernel(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4):
    # residual, normed, inp1, inp2: (N*C4,) words; weight, bias: (C4,) words; mean, rstd: (N,)
    # block (32, warps): one warp per row
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    if row >= mean.shape[0]:
        return
    x = cuda.local.array(ROW_WORDS, uint64)
    for k in range(ROW_WORDS):
        c = lane + k * WARP_SIZE
        if c < C4:
            # normalise the residual as stored (bf16), so forward and backward see the same values
            x[k] = add_bf16x4(inp1[row * C4 + c], inp2[row * C4 + c])
            residual[row * C4 + c] = x[k]
    normalize_row(normed, mean, rstd, x, weight, bias, row, C4, lane)


@kernel
def residual_forward_kernel(out, inp1, inp2):
    # out, inp1, inp2: (N/4,) uint64 words
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = add_bf16x4(inp1[i], inp2[i])


@device_function
def load_row_words(dinp, dout, inp, row, N, C4, c):
    """Word c of row `row` of dout, inp and dinp; zeros past the last row or past C4."""
    g = uint64(0)
    x = uint64(0)
    old = uint64(0)
    if row < N and c < C4:
        g = dout[row * C4 + c]
        x = inp[row * C4 + c]
        old = dinp[row * C4 + c]
    return g, x, old


@device_function
def add_channel_terms(acc, j, live, dnorm_sum, dnorm_norm_sum, w, g, x, m, s):
    """One channel's terms of the backward's two row sums, returned (added as
    layernorm_backward_kernel adds them), and, for a live row, of dbias and dweight, added to
    acc[j] and acc[4 + j]."""
    dnorm = w * g
    norm = (x - m) * s
    if live:
        acc[j] += g
        acc[4 + j] += g * norm
    return dnorm_sum + dnorm, dnorm_norm_sum + dnorm * norm


@device_function
def dinp_term(w, g, x, m, s, dnorm_mean, dnorm_norm_mean):
    """One channel's dL/dinp, as layernorm_backward_kernel computes it."""
    norm = (x - m) * s
    return (w * g - dnorm_mean - norm * dnorm_norm_mean) * s


@device_function
def load_row_ahead(dinp, dout, inp, mean, rstd, row, N, C4, c):
    """Word c of row `row` of dout, inp and dinp (zeros past N or C4), and the row's mean and rstd."""
    g = uint64(0)
    x = uint64(0)
    old = uint64(0)
    if row < N and c < C4:
        i = uint64(row * C4 + c)
        g = dout[i]
        x = inp[i]
        old = dinp[i]
    last = uint64(min(row, N - 1))
    return g, x, old, mean[last], rstd[last]


@device_function
def block_row_means(shared, dnorm_sum, dnorm_norm_sum, parity, slot, warps_per_row, lane, c, inv_C, tree):
    """The row's two sums over the block's warps (warp sums, then the warps' sums combined), divided
    by C. tree False: warp 0, 1, ... added in order, as layernorm_backward_kernel adds them; tree
    True (v5): lane i takes warp i's sums and a butterfly adds them, ten shuffles for any number
    of warps, where the loop over the warps costs ~18 instructions per warp (13 warps at C=1600)
    in every thread. Every thread of the block must call it: a block barrier. shared[0:256]: (2
    parities, 32 warps, 2 sums), used in turn, so one barrier per row is enough."""
    first_warp = slot * warps_per_row
    dnorm_sum = warp_reduce_sum(dnorm_sum)
    dnorm_norm_sum = warp_reduce_sum(dnorm_norm_sum)
    if lane == 0:
        shared[uint64((parity * 32 + first_warp + c // WARP_SIZE) * 2)] = dnorm_sum
        shared[uint64((parity * 32 + first_warp + c // WARP_SIZE) * 2 + 1)] = dnorm_norm_sum
    cuda.syncthreads()
    dnorm_mean = float32(0.0)
    dnorm_norm_mean = float32(0.0)
    if tree:
        if lane < warps_per_row:
            dnorm_mean = shared[uint64((parity * 32 + first_warp + lane) * 2)]
            dnorm_norm_mean = shared[uint64((parity * 32 + first_warp + lane) * 2 + 1)]
        dnorm_mean = warp_reduce_sum(dnorm_mean)
        dnorm_norm_mean = warp_reduce_sum(dnorm_norm_mean)
    else:
        for i in range(warps_per_row):
            dnorm_mean += shared[uint64((parity * 32 + first_warp + i) * 2)]
            dnorm_norm_mean += shared[uint64((parity * 32 + first_warp + i) * 2 + 1)]
    return dnorm_mean * inv_C, dnorm_norm_mean * inv_C


@device_function
def write_block_partial(partials, shared, offset, acc, slot, slots, c, C4, count):
    """The block's partial of its `count` per-channel sums (8: dbias and dweight; 12: and dinp's
    column sums): its row slots' sums (acc) added in slot order, through shared memory from
    `offset` (slots * count * C4 fp32), to partials[blockIdx.x] (count, C4). count is a constant
    in each kernel."""
    if c < C4:
        for q in range(count):
            shared[offset + (slot * count + q) * C4 + c] = acc[q]
    cuda.syncthreads()
    if slot == 0 and c < C4:
        for q in range(count):
            total = float32(0.0)
            for r in range(slots):
                total += shared[offset + (r * count + q) * C4 + c]
            partials[(cuda.blockIdx.x * count + q) * C4 + c] = total


@kernel
def layernorm_backward_kernel(dinp, partials, dout, inp, weight, mean, rstd, C4):
    # dinp, dout, inp: (N*C4,) words; weight: (C4,) words; mean, rstd: (N,) fp32
    # partials: (gridDim.x, 8, C4) fp32, this block's sums for channel 4c+j: dbias at [.., j, c],
    # dweight at [.., 4 + j, c]
    # block (width, rows): width >= C4 threads (whole warps), thread c owns word c of a row, and
    # `rows` rows are in flight at once; blocks stride over the rows
    N = mean.shape[0]
    c = cuda.threadIdx.x
    slot = cuda.threadIdx.y
    rows = cuda.blockDim.y
    warps_per_row = cuda.blockDim.x // WARP_SIZE
    first_warp = slot * warps_per_row
    lane = c % WARP_SIZE
    inv_C = float32(1.0) / float32(4 * C4)
    w = uint64(0)  # threads past C4 compute on zeros: they add nothing to the row sums
    if c < C4:
        w = weight[c]
    # dbias (0..3) and dweight (4..7) of this thread's four channels, over all its rows
    acc = cuda.local.array(8, float32)
    for q in range(8):
        acc[q] = float32(0.0)
    # dynamic shared memory, fp32: each warp's part of the row's two sums (2 buffers used in turn,
    # so one barrier per row; 32 warps; 2 sums), then the row slots' dbias/dweight sums (rows, 8, C4)
    shared = cuda.shared.array(0, float32)
    parity = 0
    stride = cuda.gridDim.x * rows
    # software pipelining: the next row's words are in flight while this row is reduced and written
    g_next, x_next, old_next = load_row_words(dinp, dout, inp, cuda.blockIdx.x * rows + slot, N, C4, c)
    # the trip count is the same for every thread of the block (shuffles and barriers stay
    # block-uniform); a row slot past the last row computes on zeros and stores nothing
    for first_row in range(cuda.blockIdx.x * rows, N, stride):
        row = first_row + slot
        g, x, old = g_next, x_next, old_next
        g_next, x_next, old_next = load_row_words(dinp, dout, inp, row + stride, N, C4, c)
        m = mean[min(row, N - 1)]
        s = rstd[min(row, N - 1)]
        dnorm_sum = float32(0.0)
        dnorm_norm_sum = float32(0.0)
        for j in range(4):
            dnorm = bf16x4_get(w, j) * bf16x4_get(g, j)
            dnorm_sum += dnorm
            dnorm_norm_sum += dnorm * ((bf16x4_get(x, j) - m) * s)
        dnorm_sum = warp_reduce_sum(dnorm_sum)
        dnorm_norm_sum = warp_reduce_sum(dnorm_norm_sum)
        if lane == 0:
            shared[(parity * 32 + first_warp + c // WARP_SIZE) * 2] = dnorm_sum
            shared[(parity * 32 + first_warp + c // WARP_SIZE) * 2 + 1] = dnorm_norm_sum
        cuda.syncthreads()
        dnorm_mean = float32(0.0)
        dnorm_norm_mean = float32(0.0)
        for i in range(warps_per_row):
            dnorm_mean += shared[(parity * 32 + first_warp + i) * 2]
            dnorm_norm_mean += shared[(parity * 32 + first_warp + i) * 2 + 1]
        dnorm_mean *= inv_C
        dnorm_norm_mean *= inv_C
        if row < N and c < C4:
            new = uint64(0)
            for j in range(4):
                grad = bf16x4_get(g, j)
                norm = (bf16x4_get(x, j) - m) * s
                dval = (bf16x4_get(w, j) * grad - dnorm_mean - norm * dnorm_norm_mean) * s
                new |= bf16x4_put(bf16x4_get(old, j) + dval, j)
                acc[j] += grad
                acc[4 + j] += grad * norm
            dinp[row * C4 + c] = new
        parity = 1 - parity
    write_block_partial(partials, shared, ROW_SUMS_SHARED, acc, slot, rows, c, C4, 8)


@kernel
def layernorm_param_grad_kernel(dweight, dbias, dsums, partials, num_blocks, num_sums, C4, accumulate):
    # dweight, dbias (and dsums): (C4,) words, += the sum of the num_blocks partials
    # (num_blocks, num_sums, 4, C4); accumulate false: overwritten with 0 + the sum (the bits of +=
    # into zeros, nothing read). num_sums 2: dbias, dweight; 3: and dinp's column sums into dsums
    # block (32, PARAM_GRAD_ROWS); grid (ceil(C4/32), num_sums): blockIdx.y 0 is dbias, 1 dweight,
    # 2 dsums; dynamic shared memory: (PARAM_GRAD_ROWS, 4, 32) fp32
    lane = cuda.threadIdx.x
    r = cuda.threadIdx.y
    c = cuda.blockIdx.x * WARP_SIZE + lane
    which = cuda.blockIdx.y
    acc = cuda.local.array(4, float32)
    for j in range(4):
        acc[j] = float32(0.0)
    if c < C4:
        for b in range(r, num_blocks, PARAM_GRAD_ROWS):
            base = (b * num_sums + which) * 4 * C4 + c
            for j in range(4):
                acc[j] += partials[base + j * C4]
    row_sums = cuda.shared.array(0, float32)
    for j in range(4):
        row_sums[(r * 4 + j) * WARP_SIZE + lane] = acc[j]
    cuda.syncthreads()
    if r == 0 and c < C4:
        for other in range(1, PARAM_GRAD_ROWS):
            for j in range(4):
                acc[j] += row_sums[(other * 4 + j) * WARP_SIZE + lane]
        if which == 0:
            dbias[c] = add_fp32_to_bf16x4(dbias[c] if accumulate else uint64(0), acc)
        elif which == 1:
            dweight[c] = add_fp32_to_bf16x4(dweight[c] if accumulate else uint64(0), acc)
        else:
            dsums[c] = add_fp32_to_bf16x4(dsums[c] if accumulate else uint64(0), acc)


# ---- variants v2, v3 (NANOLLM_LN_FORWARD; NANOLLM_LN_BACKWARD v3, v5; see the module docstring) ---

@device_function
def pack_word(cvt, v0, v1, v2, v3):
    """Four floats rounded to bf16 in a word: by the GPU's conversion instruction (cvt) or by
    integer code with float_to_bf16's bits. cvt is a constant in each kernel: one is compiled."""
    if cvt:
        return bf16x4_pack_cvt(v0, v1, v2, v3)
    return bf16x4_pack(v0, v1, v2, v3)


@device_function
def normalize_row_lean(out, mean, rstd, x, weight, bias, row, C4, lane, cvt, words):
    """normalize_row's arithmetic in the same order (the same bits) with fewer integer
    instructions: bf16x4_unpack/pack_word, and unsigned indices (Numba adds a negative-index
    wraparound to every signed one). x holds `words` words a lane (a constant at every call:
    inlined, the loops unroll and x stays in registers). Every lane of the warp must call it
    (shuffles)."""
    inv_C = float32(1.0) / float32(4 * C4)
    total = float32(0.0)
    for k in range(words):
        if lane + k * WARP_SIZE < C4:
            v0, v1, v2, v3 = bf16x4_unpack(x[k])
            total += v0
            total += v1
            total += v2
            total += v3
    m = warp_reduce_sum(total) * inv_C
    total = float32(0.0)
    for k in range(words):
        if lane + k * WARP_SIZE < C4:
            v0, v1, v2, v3 = bf16x4_unpack(x[k])
            total += (v0 - m) * (v0 - m)
            total += (v1 - m) * (v1 - m)
            total += (v2 - m) * (v2 - m)
            total += (v3 - m) * (v3 - m)
    s = float32(1.0) / math.sqrt(warp_reduce_sum(total) * inv_C + float32(LAYERNORM_EPS))
    for k in range(words):
        c = lane + k * WARP_SIZE
        if c < C4:
            v0, v1, v2, v3 = bf16x4_unpack(x[k])
            w0, w1, w2, w3 = bf16x4_unpack(weight[uint64(c)])
            b0, b1, b2, b3 = bf16x4_unpack(bias[uint64(c)])
            out[uint64(row * C4 + c)] = pack_word(cvt, (v0 - m) * s * w0 + b0, (v1 - m) * s * w1 + b1,
                                                  (v2 - m) * s * w2 + b2, (v3 - m) * s * w3 + b3)
    if lane == 0:
        mean[uint64(row)] = m
        rstd[uint64(row)] = s


@device_function
def load_lane_words(x, inp, row, C4, lane, words):
    """x[k] <- the row's word lane + 32k, for k < words (a constant at every call: the loop unrolls,
    the loads are independent and x stays in registers)."""
    for k in range(words):
        c = lane + k * WARP_SIZE
        if c < C4:
            x[k] = inp[uint64(row * C4 + c)]


@device_function
def layernorm_forward_lean(out, mean, rstd, inp, weight, bias, C4, cvt):
    """layernorm_forward_kernel's body with normalize_row_lean: the same launch and bits."""
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    if row < mean.shape[0]:  # else the whole warp has no row: no shuffle partners elsewhere
        x = cuda.local.array(ROW_WORDS, uint64)
        load_lane_words(x, inp, row, C4, lane, ROW_WORDS)
        normalize_row_lean(out, mean, rstd, x, weight, bias, row, C4, lane, cvt, ROW_WORDS)


@device_function
def fused_residual_layernorm_forward_lean(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4, cvt):
    """fused_residual_layernorm_forward_kernel's body with normalize_row_lean."""
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    if row < mean.shape[0]:
        x = cuda.local.array(ROW_WORDS, uint64)
        for k in range(ROW_WORDS):
            c = lane + k * WARP_SIZE
            if c < C4:
                i = uint64(row * C4 + c)
                a0, a1, a2, a3 = bf16x4_unpack(inp1[i])
                b0, b1, b2, b3 = bf16x4_unpack(inp2[i])
                x[k] = pack_word(cvt, a0 + b0, a1 + b1, a2 + b2, a3 + b3)
                residual[i] = x[k]
        normalize_row_lean(normed, mean, rstd, x, weight, bias, row, C4, lane, cvt, ROW_WORDS)


# at most 64 registers: 32 warps per SM
@kernel(launch_bounds=(1024, 1))
def layernorm_forward_lean_kernel(out, mean, rstd, inp, weight, bias, C4):
    layernorm_forward_lean(out, mean, rstd, inp, weight, bias, C4, False)


@kernel(launch_bounds=(1024, 1))
def layernorm_forward_cvt_kernel(out, mean, rstd, inp, weight, bias, C4):
    layernorm_forward_lean(out, mean, rstd, inp, weight, bias, C4, True)


# v4: v3's arithmetic (the same bits) with a warp walking rows and loading its next row while it
# normalises the current one, for rows of at most 32 * SHORT_ROW_WORDS words (C <= 1024; a longer
# row runs v3). v3 has one row's words in flight per warp and none while it reduces and writes.
SHORT_ROW_WORDS = 8
PREFETCH_BLOCKS_PER_SM = 16  # 4-warp blocks: two rounds of the 32 warps 64 registers let an SM hold


@kernel(launch_bounds=(1024, 1))
def layernorm_forward_prefetch_kernel(out, mean, rstd, inp, weight, bias, C4):
    # a grid of warps strides over the rows; block (32, warps)
    lane = cuda.threadIdx.x
    stride = cuda.gridDim.x * cuda.blockDim.y
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    N = mean.shape[0]
    x = cuda.local.array(SHORT_ROW_WORDS, uint64)
    ahead = cuda.local.array(SHORT_ROW_WORDS, uint64)
    if row < N:
        load_lane_words(x, inp, row, C4, lane, SHORT_ROW_WORDS)
    while row < N:  # the same for the whole warp: its shuffles have their partners
        next_row = row + stride
        if next_row < N:
            load_lane_words(ahead, inp, next_row, C4, lane, SHORT_ROW_WORDS)
        normalize_row_lean(out, mean, rstd, x, weight, bias, row, C4, lane, True, SHORT_ROW_WORDS)
        for k in range(SHORT_ROW_WORDS):
            x[k] = ahead[k]
        row = next_row


@kernel(launch_bounds=(1024, 1))
def fused_residual_layernorm_forward_lean_kernel(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4):
    fused_residual_layernorm_forward_lean(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4, False)


@kernel(launch_bounds=(1024, 1))
def fused_residual_layernorm_forward_cvt_kernel(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4):
    fused_residual_layernorm_forward_lean(residual, normed, mean, rstd, inp1, inp2, weight, bias, C4, True)


@device_function
def backward_row(dinp, acc, shared, w, g, x, old, m, s, row, N, parity, slot, warps_per_row, c, C4, cvt, tree,
                 dinp_sums):
    """One row of the backward from word c of its dout (g), inp (x) and dinp (old) (zeros past N or
    C4) and its mean and rstd, in v1's arithmetic: the row's two sums over the block (a barrier:
    every thread of the block must call it), dinp += for a live row, its dbias and dweight terms
    added to acc[0:8]; with dinp_sums (a constant), the bf16 values written to dinp added to
    acc[8:12]."""
    live = row < N and c < C4
    w0, w1, w2, w3 = bf16x4_unpack(w)
    g0, g1, g2, g3 = bf16x4_unpack(g)
    x0, x1, x2, x3 = bf16x4_unpack(x)
    dnorm_sum = float32(0.0)
    dnorm_norm_sum = float32(0.0)
    dnorm_sum, dnorm_norm_sum = add_channel_terms(acc, 0, live, dnorm_sum, dnorm_norm_sum, w0, g0, x0, m, s)
    dnorm_sum, dnorm_norm_sum = add_channel_terms(acc, 1, live, dnorm_sum, dnorm_norm_sum, w1, g1, x1, m, s)
    dnorm_sum, dnorm_norm_sum = add_channel_terms(acc, 2, live, dnorm_sum, dnorm_norm_sum, w2, g2, x2, m, s)
    dnorm_sum, dnorm_norm_sum = add_channel_terms(acc, 3, live, dnorm_sum, dnorm_norm_sum, w3, g3, x3, m, s)
    dnorm_mean, dnorm_norm_mean = block_row_means(shared, dnorm_sum, dnorm_norm_sum, parity, slot, warps_per_row,
                                                  c % WARP_SIZE, c, float32(1.0) / float32(4 * C4), tree)
    if live:
        o0, o1, o2, o3 = bf16x4_unpack(old)
        word = pack_word(cvt, o0 + dinp_term(w0, g0, x0, m, s, dnorm_mean, dnorm_norm_mean),
                         o1 + dinp_term(w1, g1, x1, m, s, dnorm_mean, dnorm_norm_mean),
                         o2 + dinp_term(w2, g2, x2, m, s, dnorm_mean, dnorm_norm_mean),
                         o3 + dinp_term(w3, g3, x3, m, s, dnorm_mean, dnorm_norm_mean))
        dinp[uint64(row * C4 + c)] = word
        if dinp_sums:
            n0, n1, n2, n3 = bf16x4_unpack(word)
            acc[8] += n0
            acc[9] += n1
            acc[10] += n2
            acc[11] += n3


@device_function
def layernorm_backward_prefetch(dinp, partials, dout, inp, weight, mean, rstd, C4, cvt, tree, dinp_sums):
    # layernorm_backward_kernel's layout, arithmetic and partials (block (width, slots), thread c
    # owns word c of a row, blocks stride over the rows), with the next row's mean and rstd loaded
    # ahead with its words (v1 loads them when the row starts: a memory latency per row that
    # nothing overlaps), with bf16x4_unpack, pack_word and unsigned indices
    N = mean.shape[0]
    c = cuda.threadIdx.x
    slot = cuda.threadIdx.y
    slots = cuda.blockDim.y
    warps_per_row = cuda.blockDim.x // WARP_SIZE
    w = uint64(0)  # threads past C4 compute on zeros: they add nothing to the row sums
    if c < C4:
        w = weight[uint64(c)]
    # dbias (0..3), dweight (4..7) and with dinp_sums dinp's column sums (8..11) of the thread's
    # channels; without, 8..11 are never touched and take no registers
    acc = cuda.local.array(12, float32)
    count = 12 if dinp_sums else 8
    for q in range(count):
        acc[q] = float32(0.0)
    shared = cuda.shared.array(0, float32)  # as layernorm_backward_kernel's
    parity = 0
    stride = cuda.gridDim.x * slots
    g_next, x_next, old_next, m_next, s_next = load_row_ahead(dinp, dout, inp, mean, rstd,
                                                              cuda.blockIdx.x * slots + slot, N, C4, c)
    # the trip count is the same for every thread of the block (shuffles and barriers stay
    # block-uniform); a row slot past the last row computes on zeros and stores nothing
    for first_row in range(cuda.blockIdx.x * slots, N, stride):
        row = first_row + slot
        g, x, old, m, s = g_next, x_next, old_next, m_next, s_next
        g_next, x_next, old_next, m_next, s_next = load_row_ahead(dinp, dout, inp, mean, rstd,
                                                                  row + stride, N, C4, c)
        backward_row(dinp, acc, shared, w, g, x, old, m, s, row, N, parity, slot, warps_per_row, c, C4, cvt, tree,
                     dinp_sums)
        parity = 1 - parity
    write_block_partial(partials, shared, ROW_SUMS_SHARED, acc, slot, slots, c, C4, count)


@kernel
def layernorm_backward_cvt_kernel(dinp, partials, dout, inp, weight, mean, rstd, C4):
    layernorm_backward_prefetch(dinp, partials, dout, inp, weight, mean, rstd, C4, True, False, False)


@kernel
def layernorm_backward_tree_kernel(dinp, partials, dout, inp, weight, mean, rstd, C4):
    layernorm_backward_prefetch(dinp, partials, dout, inp, weight, mean, rstd, C4, True, True, False)


@kernel(max_registers=72)  # as v5: two 416-thread blocks an SM at C=1600 (80 uncapped; see the docstring)
def layernorm_backward_tree_sums_kernel(dinp, partials, dout, inp, weight, mean, rstd, C4):
    # v5 that also sums the dinp words it writes per channel (partials (gridDim.x, 12, C4)): the
    # residual stream's gradient, whose column sums are the bias gradient of the projection
    # (attproj, fcproj) that added into the residual, without a pass of the bias kernel over it
    layernorm_backward_prefetch(dinp, partials, dout, inp, weight, mean, rstd, C4, True, True, True)


_WORDS = "uint64[::1]"
_F32 = "float32[::1]"
PTX_SIGNATURES = {
    layernorm_forward_kernel: f"void({_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    fused_residual_layernorm_forward_kernel:
        f"void({_WORDS}, {_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    residual_forward_kernel: f"void({_WORDS}, {_WORDS}, {_WORDS})",
    layernorm_backward_kernel: f"void({_WORDS}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_F32}, {_F32}, int64)",
    layernorm_backward_cvt_kernel: f"void({_WORDS}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_F32}, {_F32}, int64)",
    layernorm_backward_tree_kernel: f"void({_WORDS}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_F32}, {_F32}, int64)",
    layernorm_backward_tree_sums_kernel:
        f"void({_WORDS}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_F32}, {_F32}, int64)",
    layernorm_param_grad_kernel: f"void({_WORDS}, {_WORDS}, {_WORDS}, {_F32}, int64, int64, int64, boolean)",
    layernorm_forward_lean_kernel: f"void({_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    layernorm_forward_cvt_kernel: f"void({_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    layernorm_forward_prefetch_kernel: f"void({_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    fused_residual_layernorm_forward_lean_kernel:
        f"void({_WORDS}, {_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
    fused_residual_layernorm_forward_cvt_kernel:
        f"void({_WORDS}, {_WORDS}, {_F32}, {_F32}, {_WORDS}, {_WORDS}, {_WORDS}, {_WORDS}, int64)",
}

FORWARD_KERNELS = dict(v1=layernorm_forward_kernel, v2=layernorm_forward_lean_kernel, v3=layernorm_forward_cvt_kernel,
                       v4=layernorm_forward_prefetch_kernel)
# v4 changes the plain forward only: the fused one runs v3's kernel
FUSED_FORWARD_KERNELS = dict(v1=fused_residual_layernorm_forward_kernel, v2=fused_residual_layernorm_forward_lean_kernel,
                             v3=fused_residual_layernorm_forward_cvt_kernel, v4=fused_residual_layernorm_forward_cvt_kernel)
BACKWARD_KERNELS = dict(v1=layernorm_backward_kernel, v3=layernorm_backward_cvt_kernel, v5=layernorm_backward_tree_kernel)
BACKWARD_SUMS_KERNELS = dict(v5=layernorm_backward_tree_sums_kernel)  # with dinp_sums; the others: see the launcher


# ---- launchers -------------------------------------------------------------------------------

def _rows(name, array):
    """(shape, N rows, C channels) of a (..., C) activation; checks C fits the kernels."""
    shape = tuple(array.shape)  # a plain tuple: the simulator's shapes take no negative index
    C = shape[-1] if len(shape) >= 2 else 0
    if C == 0 or C % 4 or C > MAX_C:
        raise ValueError(f"{name}: shape {shape} must be (..., C) with C a multiple of 4 and at most "
                         f"{MAX_C} (four bf16 per word, ROW_WORDS={ROW_WORDS} words per lane)")
    return shape, int(np.prod(shape[:-1])), C


def _prefetch_blocks():
    """v4's grid: PREFETCH_BLOCKS_PER_SM blocks an SM; on the simulator one block, so that its few
    warps each walk several rows in the tests."""
    return 1 if SIMULATOR else cuda.get_current_device().MULTIPROCESSOR_COUNT * PREFETCH_BLOCKS_PER_SM


def _forward_grid(N, warps_per_block):
    if not 1 <= warps_per_block <= 32:
        raise ValueError(f"warps_per_block must be 1..32, got {warps_per_block}")
    return ceil_div(N, warps_per_block), (WARP_SIZE, warps_per_block)


def layernorm_forward(out, mean, rstd, inp, weight, bias, stream=0, warps_per_block=FORWARD_WARPS,
                      variant=None):
    """out = layernorm(inp) * weight + bias; saves mean and rstd.
    inp, out are (B,T,C) bf16; weight, bias (C,) bf16; mean, rstd (B,T) fp32.
    variant: one of FORWARD_VARIANTS (the same bits, NaN aside); None takes NANOLLM_LN_FORWARD's."""
    variant = check_variant(variant or FORWARD_VARIANT, FORWARD_VARIANTS)
    shape, N, C = _rows("inp", inp)
    inp_words, out_words = as_words("inp", inp, shape), as_words("out", out, shape)
    weight_words, bias_words = as_words("weight", weight, (C,)), as_words("bias", bias, (C,))
    check_contiguous("mean", mean, np.float32, shape[:-1])
    check_contiguous("rstd", rstd, np.float32, shape[:-1])
    grid, block = _forward_grid(N, warps_per_block)
    if variant == "v4":
        if C > 4 * WARP_SIZE * SHORT_ROW_WORDS:
            variant = "v3"  # a row longer than v4 keeps in registers
        else:
            grid = min(grid, _prefetch_blocks())
    FORWARD_KERNELS[variant][grid, block, stream](out_words, mean.reshape(N), rstd.reshape(N), inp_words,
                                                  weight_words, bias_words, C // 4)


def fused_residual_layernorm_forward(residual, normed, mean, rstd, inp1, inp2, weight, bias, stream=0,
                                     warps_per_block=FORWARD_WARPS, variant=None):
    """residual = inp1 + inp2; normed = layernorm(residual) * weight + bias; saves mean, rstd.
    residual, normed, inp1, inp2 are (B,T,C) bf16; weight, bias (C,) bf16; mean, rstd (B,T) fp32.
    variant: one of FORWARD_VARIANTS (the same bits, NaN aside); None takes NANOLLM_LN_FORWARD's."""
    variant = check_variant(variant or FORWARD_VARIANT, FORWARD_VARIANTS)
    shape, N, C = _rows("inp1", inp1)
    words = [as_words(name, array, shape) for name, array in
             [("residual", residual), ("normed", normed), ("inp1", inp1), ("inp2", inp2)]]
    weight_words, bias_words = as_words("weight", weight, (C,)), as_words("bias", bias, (C,))
    check_contiguous("mean", mean, np.float32, shape[:-1])
    check_contiguous("rstd", rstd, np.float32, shape[:-1])
    grid, block = _forward_grid(N, warps_per_block)
    FUSED_FORWARD_KERNELS[variant][grid, block, stream](words[0], words[1], mean.reshape(N), rstd.reshape(N),
                                                        words[2], words[3], weight_words, bias_words, C // 4)


def residual_forward(out, inp1, inp2, stream=0):
    """out = inp1 + inp2; all bf16 of the same shape, e.g. (B,T,C)."""
    shape = tuple(out.shape)
    out_words = as_words("out", out, shape)
    inp1_words, inp2_words = as_words("inp1", inp1, shape), as_words("inp2", inp2, shape)
    grid = ceil_div(out_words.shape[0], ELEMENTWISE_BLOCK)
    residual_forward_kernel[grid, ELEMENTWISE_BLOCK, stream](out_words, inp1_words, inp2_words)


def layernorm_backward_block(C, rows=None):
    """Block shape of layernorm_backward: one thread per word of a row (whole warps), and as many
    rows at once as keep the block near 512 threads."""
    width = ceil_div(C // 4, WARP_SIZE) * WARP_SIZE
    rows = rows or max(1, 512 // width)
    if width * rows > 1024:
        raise ValueError(f"layernorm_backward: {rows} rows of {width} threads exceed 1024 threads per block")
    return width, rows


def layernorm_backward_scratch_size(C, num_blocks=BACKWARD_BLOCKS):
    """float32 elements of the scratch buffer layernorm_backward needs: one (3C,) partial per block
    (dbias, dweight and, with dinp_sums, dinp's column sums)."""
    return num_blocks * 3 * C


def layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, stream=0,
                       num_blocks=BACKWARD_BLOCKS, rows_per_block=None, variant=None, accumulate=True,
                       dinp_sums=None):
    """dinp += dL/dinp; dweight += and dbias += over all B*T rows (deterministic, no atomics);
    accumulate=False overwrites dweight and dbias instead (the bits of += into zeros; dinp is
    always added to).
    dinp, dout, inp are (B,T,C) bf16; dweight, dbias, weight (C,) bf16; mean, rstd (B,T) fp32 from
    the forward; scratch: fp32 device array of at least layernorm_backward_scratch_size(C, num_blocks)
    elements (overwritten). num_blocks caps the grid, i.e. the fp32 partial rows in scratch.
    variant: one of BACKWARD_VARIANTS (dweight and dbias: the same bits; dinp: see the module
    docstring); None takes NANOLLM_LN_BACKWARD's.
    dinp_sums, (C,) bf16: += (accumulate=False: =) dinp's column sums over all rows after the
    update, summed in fp32 and rounded once, like dweight and dbias. dinp is the residual stream's
    gradient, so these are the bias gradient of the projection whose output was added into the
    residual (attproj's at ln2, fcproj's at ln1 of the next layer and at lnf): the model takes it
    from here instead of reading dinp again in matmul_backward_bias. v5 sums the words as it writes
    them; v1 and v3 run matmul_backward_bias over dinp after the kernel (the same sums in another
    order)."""
    variant = check_variant(variant or BACKWARD_VARIANT, BACKWARD_VARIANTS)
    shape, N, C = _rows("inp", inp)
    inp_words = as_words("inp", inp, shape)
    dinp_words, dout_words = as_words("dinp", dinp, shape), as_words("dout", dout, shape)
    dweight_words, dbias_words = as_words("dweight", dweight, (C,)), as_words("dbias", dbias, (C,))
    weight_words = as_words("weight", weight, (C,))
    check_contiguous("mean", mean, np.float32, shape[:-1])
    check_contiguous("rstd", rstd, np.float32, shape[:-1])
    width, rows = layernorm_backward_block(C, rows_per_block)
    blocks = min(ceil_div(N, rows), num_blocks)
    fused_sums = dinp_sums is not None and variant in BACKWARD_SUMS_KERNELS
    num_sums = 3 if fused_sums else 2  # per-channel sums per block: dbias, dweight (, dinp's)
    needed = blocks * num_sums * C
    if scratch.dtype != np.float32 or scratch.ndim != 1 or scratch.size < needed:
        raise ValueError(f"scratch: expected a 1-D float32 array of at least {needed} elements "
                         f"(layernorm_backward_scratch_size), got {scratch.dtype} {tuple(scratch.shape)}")
    sums_words = as_words("dinp_sums", dinp_sums, (C,)) if dinp_sums is not None else dbias_words
    partials = scratch[:needed]
    C4 = C // 4
    shared_bytes = (ROW_SUMS_SHARED + rows * 4 * num_sums * C4) * 4
    backward_kernel = BACKWARD_SUMS_KERNELS[variant] if fused_sums else BACKWARD_KERNELS[variant]
    backward_kernel[blocks, (width, rows), stream, shared_bytes](
        dinp_words, partials, dout_words, inp_words, weight_words, mean.reshape(N), rstd.reshape(N), C4)
    layernorm_param_grad_kernel[(ceil_div(C4, WARP_SIZE), num_sums), (WARP_SIZE, PARAM_GRAD_ROWS), stream,
                                PARAM_GRAD_ROWS * 4 * WARP_SIZE * 4](
        dweight_words, dbias_words, sums_words, partials, blocks, num_sums, C4, bool(accumulate))
    if dinp_sums is not None and not fused_sums:
        from . import matmul  # here only: matmul is the heavier import, and only v1/v3 need it
        matmul.matmul_backward_bias(dinp_sums, dinp, stream=stream, accumulate=accumulate)
