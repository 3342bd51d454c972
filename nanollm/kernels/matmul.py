"""Matrix products through cuBLASLt, after llm.c's llmc/matmul.cuh.

All operands are bf16 (uint16 device arrays), products accumulate in fp32 (CUBLAS_COMPUTE_32F),
weights are (OC, C) row-major as PyTorch's Linear, so the forward is out = inp @ weight^T.
llm.c's fusions come from cuBLASLt epilogues: bias (BIAS), bias + GELU with the pre-activation
saved for the backward (GELU_AUX_BIAS), and GELU's gradient applied to dinp (DGELU). The bias
gradient is a Numba column-sum kernel (llm.c's matmul_backward_bias_kernel9 idea) rather than the
BGRADB epilogue: it sums all B*T rows in fp32 in a fixed order and rounds to bf16 once when adding
into dbias (BGRADB would write a bf16 partial that a second kernel adds: two roundings, and its
support with beta=1 accumulation varies by version), and it runs on the simulator as real code.

cuBLAS is column-major; nanollm's arrays are row-major. A row-major (M, N) matrix is the same
memory as a column-major N x M one, so out = op(a) @ op(b) is computed as out^T = op(b)^T op(a)^T:
cuBLAS's A is our b, its B our a, and m, n = N, M (llm.c's layout trick: matmul_cublaslt is
always called with the weight as A).

One handle and one 32 MiB workspace per process (as llm.c). Unlike llm.c, the matmul descriptor,
the layouts and the algorithm are built once per (shape, transposes, epilogue, pointer
alignments) and cached: a call only sets the bias/aux pointers and calls cublasLtMatmul. The
algorithm is the fastest of the heuristic's top answers on this GPU, timed on the product's first
call and saved for later runs (matmul_tuning), or with NANOLLM_MATMUL_ALGORITHM=heuristic the
first answer, as llm.c. The cache is not thread-safe (one training loop per process uses it).

On the Numba CUDA simulator there is no GPU and no cuBLAS: every product is computed by numpy in
fp32 on host copies, outputs rounded to bf16 once, with the same epilogue and accumulation
semantics, and written back into the (fake) device arrays. The bias-gradient kernels run as
simulated Numba code.
"""


import math

import numpy as np
from numba import cuda, float32, uint64
from nvmath.bindings import cublasLt

from .. import cuda_libraries, reference, startup
from . import matmul_tuning
from .bf16 import (bf16_to_float, bf16x2_high, bf16x2_low, float_to_bf16, from_bf16_bits, high_half,
                   low_half, to_bf16_bits)
from .cuda_common import SIMULATOR, ceil_div, check_contiguous, device_function, kernel, variant_from_environment
from .cuda_common import device_pointer as _pointer, stream_handle as _stream_handle
from .gelu import gelu_backward_word

# ---- CUDA kernels: the bias gradient ----------------------------------------------------------

# dbias += column sums of dout (rows, OC): a pure read of dout, so the speed is the number of bytes
# in flight (HBM3 needs ~40-64 KB outstanding per SM). Two kernels, fixed summation order:
# 1. matmul_backward_bias_kernel: block (BIAS_BLOCK_WORDS, BIAS_BLOCK_ROWS) threads owns 4 *
#    BIAS_BLOCK_WORDS columns of one slice of rows. x runs over uint64 words (four bf16 columns), so
#    a warp reads 256 contiguous bytes of a row; y over rows. Each thread issues BIAS_LOADS_IN_FLIGHT
#    independent row loads before it adds any (a thread stalls at the first use of a load: one load
#    per iteration keeps only 8 B per thread in flight), 64 B per thread, so a few hundred threads
#    per SM saturate the memory. The block then adds its row-lanes in shared memory and writes one
#    fp32 row of partial sums per slice of rows.
# 2. matmul_bias_add_partials_kernel: block (BIAS_ADD_COLUMNS, BIAS_ADD_LANES) sums the partial
#    rows of 32 columns, the lanes splitting the rows and loading four each at once, adds the lanes
#    in order and rounds into dbias once. Its input is small (MAX_BIAS_PARTIALS x OC fp32, in L2).
# The slices of rows depend on the shape only (not on the GPU): the same bits on every card.
# The shared arrays need compile-time dimensions, so the block sizes below are maxima.
BIAS_BLOCK_WORDS = 32
BIAS_BLOCK_COLUMNS = 4 * BIAS_BLOCK_WORDS  # a shared-array shape must be one constant
BIAS_BLOCK_ROWS = 8
BIAS_LOADS_IN_FLIGHT = 8  # rows a thread loads before adding (the round's loops below: changing it changes them)
# Most slices of rows (partial sums per column) the first kernel writes; dbias_scratch must hold
# MAX_BIAS_PARTIALS * OC float32 values. At B*T = 8192 every slice is 64 rows (8 per thread, one
# round of loads) and OC = 768 gets 6 x 128 = 768 blocks; more rows make the slices longer.
MAX_BIAS_PARTIALS = 128
BIAS_ADD_COLUMNS = 32
BIAS_ADD_LANES = 32


@device_function
def add_bf16x4(acc0, acc1, acc2, acc3, word):
    """The four bf16 of a uint64 word (columns 4w .. 4w+3) added to four fp32 sums."""
    return (acc0 + bf16x2_low(low_half(word)), acc1 + bf16x2_high(low_half(word)),
            acc2 + bf16x2_low(high_half(word)), acc3 + bf16x2_high(high_half(word)))


@device_function
def load_column_word(dout, pre_gelu, index, through_gelu):
    """Word `index` of dout as the bias kernels sum it; through_gelu: replaced in dout, first, by
    its GELU backward at the pre-activation's word."""
    word = dout[index]
    if through_gelu:
        word = gelu_backward_word(word, pre_gelu[index])
        dout[index] = word
    return word


@device_function
def bias_column_sums(partial, dout, pre_gelu, rows, n_words, row_words, rows_per_block, through_gelu):
    # dout: (rows * row_words,) uint64 words: (rows, 4 * row_words) bf16, of which the first
    # OC = 4 * n_words columns are summed (row_words > n_words: a slice of wider rows, e.g. the
    # query third of the qkv gradient)
    # partial: (>= gridDim.y * OC,) fp32; row p (OC values from p * OC) = the column sums over rows
    # [p * rows_per_block, (p + 1) * rows_per_block). Each thread sums its 4 columns over rows
    # ty, ty + blockDim.y, ... of the slice in order, then the block adds its row-lanes in order.
    # through_gelu (a constant per kernel): each word of dout is first replaced by its GELU
    # backward (pre_gelu: the pre-activation's words), and the new words are summed.
    sums = cuda.shared.array((BIAS_BLOCK_ROWS, BIAS_BLOCK_COLUMNS), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    word = cuda.blockIdx.x * cuda.blockDim.x + tx
    acc0 = float32(0.0)
    acc1 = float32(0.0)
    acc2 = float32(0.0)
    acc3 = float32(0.0)
    if word < n_words:
        row = cuda.blockIdx.y * rows_per_block + ty
        row_end = min(rows, (cuda.blockIdx.y + 1) * rows_per_block)
        step = cuda.blockDim.y
        index = row * row_words + word
        index_step = step * row_words
        # loops over a local array, not eight written-out copies: NVVM unrolls them (constant
        # indices: registers, no local memory), and Numba inlines the GELU once instead of eight
        # times (that took the kernel 8.6 s to compile, the first run's longest wait)
        words = cuda.local.array(BIAS_LOADS_IN_FLIGHT, uint64)
        while row + (BIAS_LOADS_IN_FLIGHT - 1) * step < row_end:  # all the round's loads, then the adds
            for k in range(BIAS_LOADS_IN_FLIGHT):
                words[k] = dout[index + k * index_step]
            if through_gelu:
                # the round's pre-activation loads too, before any store: as far as the compiler
                # knows a store to dout may alias a later load, so interleaved (load, GELU, store
                # per word) the loads waited for each other and the pass ran at 78% of copy
                for k in range(BIAS_LOADS_IN_FLIGHT):
                    words[k] = gelu_backward_word(words[k], pre_gelu[index + k * index_step])
                for k in range(BIAS_LOADS_IN_FLIGHT):
                    dout[index + k * index_step] = words[k]
            for k in range(BIAS_LOADS_IN_FLIGHT):
                acc0, acc1, acc2, acc3 = add_bf16x4(acc0, acc1, acc2, acc3, words[k])
            row += BIAS_LOADS_IN_FLIGHT * step
            index += BIAS_LOADS_IN_FLIGHT * index_step
        while row < row_end:  # the slice's last rows (a slice shorter than a full round)
            acc0, acc1, acc2, acc3 = add_bf16x4(acc0, acc1, acc2, acc3,
                                                load_column_word(dout, pre_gelu, index, through_gelu))
            row += step
            index += index_step
    # sums[ty, 4 * tx + k]: column 4 * word + k of row-lane ty (zeros past the last column)
    sums[ty, 4 * tx] = acc0
    sums[ty, 4 * tx + 1] = acc1
    sums[ty, 4 * tx + 2] = acc2
    sums[ty, 4 * tx + 3] = acc3
    cuda.syncthreads()
    # the block's 4 * blockDim.x columns, one per thread (consecutive threads: consecutive columns,
    # so the writes are coalesced), each the sum of the row-lanes in order
    block_columns = 4 * cuda.blockDim.x
    first_column = cuda.blockIdx.x * block_columns
    OC = 4 * n_words
    out = cuda.blockIdx.y * OC + first_column
    for c in range(ty * cuda.blockDim.x + tx, block_columns, cuda.blockDim.x * cuda.blockDim.y):
        if first_column + c < OC:
            total = sums[0, c]
            for r in range(1, cuda.blockDim.y):
                total += sums[r, c]
            partial[out + c] = total


@kernel
def matmul_backward_bias_kernel(partial, dout, rows, n_words, row_words, rows_per_block):
    bias_column_sums(partial, dout, dout, rows, n_words, row_words, rows_per_block, False)


# fastmath as gelu_backward_inplace_kernel (approximate exp and division in the GELU's tanh), so
# the words it writes are that kernel's
@kernel(fastmath=True)
def gelu_backward_bias_kernel(partial, dout, pre_gelu, rows, n_words, rows_per_block):
    bias_column_sums(partial, dout, pre_gelu, rows, n_words, n_words, rows_per_block, True)


@kernel
def matmul_bias_add_partials_kernel(dbias, partial, n_partials, accumulate):
    # dbias: (OC,) bf16, accumulated into (+=, one rounding) or, with accumulate false, overwritten
    # (0 + the sum: the bits of += into zeros, without reading them); partial: (>= n_partials * OC,) fp32,
    # n_partials rows of OC. Block (columns, lanes): lane ty sums rows ty, ty + blockDim.y, ... of
    # its column in order (four loads at once), then lane 0 adds the lanes in order.
    lane_sums = cuda.shared.array((BIAS_ADD_LANES, BIAS_ADD_COLUMNS), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    OC = dbias.shape[0]
    col = cuda.blockIdx.x * cuda.blockDim.x + tx
    lanes = cuda.blockDim.y
    total = float32(0.0)
    if col < OC:
        p = ty
        while p + 3 * lanes < n_partials:
            a = partial[p * OC + col]
            b = partial[(p + lanes) * OC + col]
            c = partial[(p + 2 * lanes) * OC + col]
            d = partial[(p + 3 * lanes) * OC + col]
            total = (((total + a) + b) + c) + d
            p += 4 * lanes
        while p < n_partials:
            total += partial[p * OC + col]
            p += lanes
    lane_sums[ty, tx] = total
    cuda.syncthreads()
    if ty == 0 and col < OC:
        for r in range(1, lanes):
            total += lane_sums[r, tx]
        old = bf16_to_float(dbias[col]) if accumulate else float32(0.0)
        dbias[col] = float_to_bf16(old + total)


@kernel
def add_fp32_into_bf16_kernel(out, src, accumulate):
    # out (n,) bf16 <- out + src (accumulate) or src, src (n,) fp32: the sum taken in fp32 and
    # rounded once (a weight gradient summed in fp32 over several products, as one product's beta 1)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.shape[0]:
        old = bf16_to_float(out[i]) if accumulate else float32(0.0)
        out[i] = float_to_bf16(old + src[i])
        i += stride


PTX_SIGNATURES = {
    add_fp32_into_bf16_kernel: "void(uint16[::1], float32[::1], boolean)",
    matmul_backward_bias_kernel: "void(float32[::1], uint64[::1], int64, int64, int64, int64)",
    gelu_backward_bias_kernel: "void(float32[::1], uint64[::1], uint64[::1], int64, int64, int64)",
    matmul_bias_add_partials_kernel: "void(uint16[::1], float32[::1], int64, boolean)",
}

# ---- cuBLASLt set-up ---------------------------------------------------------------------------

WORKSPACE_BYTES = 32 * 1024 * 1024  # llm.c: Hopper wants 32 MiB, older cards 4
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t
CUDA_R_32F = 0  # cudaDataType_t
CUDA_R_16BF = 14
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1

Epilogue = cublasLt.Epilogue
_BIAS_EPILOGUES = (Epilogue.BIAS, Epilogue.GELU_AUX_BIAS)
_GELU_AUX_EPILOGUES = (Epilogue.GELU_AUX, Epilogue.GELU_AUX_BIAS)  # they write aux (the pre-activation)
_AUX_EPILOGUES = _GELU_AUX_EPILOGUES + (Epilogue.DGELU,)

_handle = None
_workspace = None
_workspace_ptr = 0
_plans = {}  # (M, N, K, batch, transa, transb, epilogue, alignments of a, b, out, addend, out type) -> _Plan
_HEURISTIC_RESULT_BYTES = cublasLt.matmul_heuristic_result_dtype.itemsize
# which of the heuristic's answers runs: "timed" (the fastest of its top ones on this GPU, chosen once
# and saved: matmul_tuning) or "heuristic" (its first, as llm.c)
ALGORITHM = variant_from_environment("NANOLLM_MATMUL_ALGORITHM", matmul_tuning.MODES, "timed")
_algorithm_file = None  # matmul_tuning.AlgorithmFile of this GPU, read on the first timed plan
_ONE = np.ones(1, dtype=np.float32)  # host scalars for alpha / beta (host pointer mode)
_ZERO = np.zeros(1, dtype=np.float32)


def _cublaslt_handle():
    """The process's cuBLASLt handle and workspace, created on first use (after Numba's context)."""
    global _handle, _workspace, _workspace_ptr
    if _handle is None:
        # this environment's cuBLASLt (nvidia-cublas), loaded before nvmath-python looks for one:
        # a missing library is a clear MissingCudaLibrary naming the package
        cuda_libraries.load("cublasLt")
        _workspace = cuda.device_array(WORKSPACE_BYTES, dtype=np.uint8)  # also makes the context current
        _workspace_ptr = _pointer(_workspace)
        _handle = cublasLt.create()
    return _handle


def _alignment(pointer):
    """The largest power of two (up to 256) dividing the address: cuBLASLt's heuristic picks
    kernels assuming 256-byte alignment unless told less."""
    return min(256, pointer & -pointer) if pointer else 256


class _Plan:
    """A matmul descriptor, its A/B/D layouts and the chosen algorithm, built once per key."""

    def __init__(self, key, bias_ptr, aux_ptr, candidates=1):
        M, N, K, batch, transa, transb, epilogue, align_a, align_b, align_d, align_c, out_type = key
        self.description = _describe(M, N, K, batch, transa, transb, epilogue)
        # align_c: None when the addend C is out itself (or there is none); out_type: D's (and C's)
        # element type, bf16 but for fp32 weight-gradient sums
        addend = "" if align_c is None else f" addend={align_c}"
        fp32 = " out=fp32" if out_type == CUDA_R_32F else ""
        self.name = f"{self.description}; alignments a={align_a} b={align_b} out={align_d}{addend}{fp32}"
        self.epilogue = epilogue
        self.pointer = np.zeros(1, dtype=np.int64)  # host buffer for the per-call pointer attributes
        handle = _cublaslt_handle()
        attr = cublasLt.MatmulDescAttribute
        try:
            self.desc = cublasLt.matmul_desc_create(CUBLAS_COMPUTE_32F, CUDA_R_32F)
            # cuBLAS's A is our b (transposed iff transb), its B our a; see the module docstring
            self._set(attr.TRANSA, np.int32(CUBLAS_OP_T if transb else CUBLAS_OP_N))
            self._set(attr.TRANSB, np.int32(CUBLAS_OP_T if transa else CUBLAS_OP_N))
            self._set(attr.EPILOGUE, np.uint32(epilogue))
            if epilogue in _BIAS_EPILOGUES:
                self._set(attr.BIAS_DATA_TYPE, np.int32(CUDA_R_16BF))
                self.set_bias(bias_ptr)
            if epilogue in _AUX_EPILOGUES:
                self._set(attr.EPILOGUE_AUX_LD, np.int64(N))  # aux has out's (row-major M x N) layout
                self.set_aux(aux_ptr)
            # column-major (rows, cols, leading dimension) of what each pointer holds
            self.a_layout = self._layout((K, N, K) if transb else (N, K, N), batch, N * K)
            self.b_layout = self._layout((M, K, M) if transa else (K, M, K), batch, M * K)
            self.d_layout = self._layout((N, M, N), batch, M * N, out_type)
            # cuBLAS's A is our b: its alignment is align_b, and the other way round
            self.answers, self.found = self._heuristic(handle, align_b, align_a, align_d,
                                                       align_d if align_c is None else align_c, candidates)
        except cublasLt.cuBLASLtError as error:
            raise RuntimeError(f"cuBLASLt set-up failed for {self.description}: {error}") from error
        self.use(0)  # the heuristic's first answer, as llm.c

    def algorithm_pointer(self, index):
        """The index-th answer's algorithm: algo is the first member of cublasLtMatmulHeuristicResult_t."""
        return self.answers.ptr + index * _HEURISTIC_RESULT_BYTES

    def use(self, index):
        self.index = index
        self.algo_ptr = self.algorithm_pointer(index)

    def algorithm_config(self, index):
        """The index-th answer's configuration (algorithm id, tile, stages, split-K, ...) by name."""
        config = {}
        for attribute in cublasLt.MatmulAlgoConfigAttribute:
            value = np.zeros(1, dtype=cublasLt.get_matmul_algo_config_attribute_dtype(attribute))
            written = np.zeros(1, dtype=np.uint64)
            cublasLt.matmul_algo_config_get_attribute(self.algorithm_pointer(index), attribute, value.ctypes.data,
                                                      value.nbytes, written.ctypes.data)
            config[attribute.name] = int(value[0])
        return config

    def _set(self, attribute, value):
        value = np.asarray(value)
        cublasLt.matmul_desc_set_attribute(self.desc, attribute, value.ctypes.data, value.nbytes)

    def set_bias(self, pointer):
        self.pointer[0] = pointer
        cublasLt.matmul_desc_set_attribute(self.desc, cublasLt.MatmulDescAttribute.BIAS_POINTER,
                                           self.pointer.ctypes.data, 8)

    def set_aux(self, pointer):
        self.pointer[0] = pointer
        cublasLt.matmul_desc_set_attribute(self.desc, cublasLt.MatmulDescAttribute.EPILOGUE_AUX_POINTER,
                                           self.pointer.ctypes.data, 8)

    @staticmethod
    def _layout(rows_cols_ld, batch, batch_stride, data_type=CUDA_R_16BF):
        rows, cols, ld = rows_cols_ld
        layout = cublasLt.matrix_layout_create(data_type, rows, cols, ld)
        if batch > 1:
            attr = cublasLt.MatrixLayoutAttribute
            count = np.array([batch], dtype=np.int32)
            stride = np.array([batch_stride], dtype=np.int64)  # in elements
            cublasLt.matrix_layout_set_attribute(layout, attr.BATCH_COUNT, count.ctypes.data, count.nbytes)
            cublasLt.matrix_layout_set_attribute(layout, attr.STRIDED_BATCH_OFFSET, stride.ctypes.data, stride.nbytes)
        return layout

    def _heuristic(self, handle, cublas_a_align, cublas_b_align, align_d, align_c, candidates):
        """Up to `candidates` of the heuristic's answers, best first, and how many it gave."""
        attr = cublasLt.MatmulPreferenceAttribute
        preference = cublasLt.matmul_preference_create()
        try:
            for attribute, value in [(attr.MAX_WORKSPACE_BYTES, np.array([WORKSPACE_BYTES], dtype=np.uint64)),
                                     (attr.MIN_ALIGNMENT_A_BYTES, np.array([cublas_a_align], dtype=np.uint32)),
                                     (attr.MIN_ALIGNMENT_B_BYTES, np.array([cublas_b_align], dtype=np.uint32)),
                                     (attr.MIN_ALIGNMENT_C_BYTES, np.array([align_c], dtype=np.uint32)),
                                     (attr.MIN_ALIGNMENT_D_BYTES, np.array([align_d], dtype=np.uint32))]:
                cublasLt.matmul_preference_set_attribute(preference, attribute, value.ctypes.data, value.nbytes)
            answers = cublasLt.MatmulHeuristicResult(candidates)
            found = np.zeros(1, dtype=np.int32)
            cublasLt.matmul_algo_get_heuristic(handle, self.desc, self.a_layout, self.b_layout, self.d_layout,
                                               self.d_layout, preference, candidates, answers.ptr, found.ctypes.data)
        finally:
            cublasLt.matmul_preference_destroy(preference)
        states = np.atleast_1d(answers.state)
        usable = 0
        while usable < min(int(found[0]), candidates) and states[usable] == 0:
            usable += 1
        if usable == 0:
            raise RuntimeError(f"cuBLASLt found no algorithm for {self.description} (returned {found[0]}, state "
                               f"{states[0]}; pointer alignments a={cublas_b_align} b={cublas_a_align} "
                               f"out={align_d} bytes, workspace {WORKSPACE_BYTES} bytes)")
        return answers, usable


def _describe(M, N, K, batch, transa, transb, epilogue):
    a = "a^T" if transa else "a"
    b = "b^T" if transb else "b"
    batched = f"{batch} x " if batch > 1 else ""
    return f"out({batched}{M}x{N}) = {a} @ {b} (K={K}), epilogue {Epilogue(epilogue).name}"


def _gemm(out, a, b, M, N, K, batch, transa, transb, epilogue=Epilogue.DEFAULT, bias=None, aux=None,
          alpha=1.0, beta=0.0, stream=0, addend=None):
    """out (batch, M, N) = alpha * op(a) @ op(b) + beta * C, then the epilogue, where C is addend
    (out's shape) if given, else out itself; row-major, contiguous, shapes already checked by the
    caller. out (and addend) bf16, or float32 (no bias or aux epilogue then): the fp32 sums unrounded."""
    if SIMULATOR:  # (an addend that is out itself reads the same values there)
        return _gemm_host(out, a, b, M, N, K, batch, transa, transb, epilogue, bias, aux, alpha, beta, addend)
    a_ptr, b_ptr, out_ptr = _pointer(a), _pointer(b), _pointer(out)
    c_ptr = out_ptr if addend is None else _pointer(addend)
    if c_ptr == out_ptr:
        addend = None  # C is out: the plan and the call of plain beta accumulation
    bias_ptr = _pointer(bias) if bias is not None else 0
    aux_ptr = _pointer(aux) if aux is not None else 0
    for name, pointer in (("a", a_ptr), ("b", b_ptr), ("out", out_ptr), ("addend", c_ptr), ("bias", bias_ptr),
                          ("aux", aux_ptr)):
        if pointer % 16:  # as llm.c: every cuBLASLt operand 16-byte aligned
            raise ValueError(f"{name}: device pointer {pointer:#x} is not 16-byte aligned "
                             f"({_describe(M, N, K, batch, transa, transb, epilogue)})")
    key = (M, N, K, batch, transa, transb, int(epilogue), _alignment(a_ptr), _alignment(b_ptr), _alignment(out_ptr),
           None if addend is None else _alignment(c_ptr), CUDA_R_32F if out.dtype == np.float32 else CUDA_R_16BF)
    plan = _plans.get(key)
    new_plan = plan is None
    if new_plan:
        with startup.accumulate("cuBLASLt plans: descriptors, layouts, heuristic"):
            plan = _Plan(key, bias_ptr, aux_ptr, matmul_tuning.CANDIDATES if ALGORITHM == "timed" else 1)
    alpha_buf = _ONE if alpha == 1.0 else np.array([alpha], dtype=np.float32)
    beta_buf = _ZERO if beta == 0.0 else (_ONE if beta == 1.0 else np.array([beta], dtype=np.float32))

    def launch(algo_ptr):
        cublasLt.matmul(_handle, plan.desc, alpha_buf.ctypes.data, b_ptr, plan.a_layout, a_ptr, plan.b_layout,
                        beta_buf.ctypes.data, c_ptr, plan.d_layout, out_ptr, plan.d_layout, algo_ptr,
                        _workspace_ptr, WORKSPACE_BYTES, _stream_handle(stream))

    try:
        if bias is not None:
            plan.set_bias(bias_ptr)
        if aux is not None:
            plan.set_aux(aux_ptr)
        if new_plan and plan.found > 1:
            with startup.accumulate("cuBLASLt algorithms: timed, or read from their file"):
                _choose_by_timing(plan, launch, out, a, b, bias, aux, epilogue, beta, stream, addend)
        if new_plan:
            _plans[key] = plan
        launch(plan.algo_ptr)
    except cublasLt.cuBLASLtError as error:
        raise RuntimeError(f"cublasLtMatmul failed for {plan.description}: {error}") from error


def _device_description():
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    return {"name": name, "compute_capability": list(device.compute_capability),
            "sms": int(device.MULTIPROCESSOR_COUNT), "cublasLt": int(cublasLt.get_version())}


def _algorithms_saved():
    global _algorithm_file
    if _algorithm_file is None:
        device = _device_description()
        path = matmul_tuning.algorithm_file(device["name"], device["compute_capability"], device["sms"],
                                            device["cublasLt"])
        _algorithm_file = matmul_tuning.AlgorithmFile(path, device)
    return _algorithm_file


def _choose_by_timing(plan, launch, out, a, b, bias, aux, epilogue, beta, stream, addend=None):
    """plan.use() the answer saved for this plan on this GPU, or time its answers and save the
    fastest (matmul_tuning). The timed launches write out (and aux, with a GELU_AUX epilogue): those
    are saved and put back where the real call would otherwise not see what it should."""
    saved = _algorithms_saved()
    choice = saved.get(plan.name)
    if choice is None:
        writes_aux = epilogue in _GELU_AUX_EPILOGUES
        reads = (a, b, bias, addend) if writes_aux else (a, b, bias, aux, addend)
        reads_out = beta != 0.0 and addend is None
        keep = [out] if reads_out or matmul_tuning.overlaps(out, reads) else []
        if writes_aux and matmul_tuning.overlaps(aux, reads):
            keep.append(aux)
        with matmul_tuning.preserved(keep):
            milliseconds = matmul_tuning.time_candidates(lambda i: launch(plan.algorithm_pointer(i)), plan.found,
                                                         stream, lambda error: isinstance(error, cublasLt.cuBLASLtError))
        index = matmul_tuning.pick(milliseconds)
        choice = saved.put(plan.name, {"index": index, "config": plan.algorithm_config(index),
                                       "ms": [round(ms, 5) if math.isfinite(ms) else None for ms in milliseconds]})
    index = choice["index"]
    config = plan.algorithm_config(index) if index < plan.found else f"only {plan.found} candidates"
    if config != choice["config"]:
        raise RuntimeError(f"{saved.path}: the saved choice for {plan.name} is the heuristic's answer {index} "
                           f"({choice['config']}), but this cuBLASLt answers {config}; delete the file and the "
                           f"algorithms are timed again")
    plan.use(index)


def _gemm_host(out, a, b, M, N, K, batch, transa, transb, epilogue, bias, aux, alpha, beta, addend=None):
    """The simulator's stand-in for _gemm: numpy in fp32, one bf16 rounding per output."""
    def load(array, shape):
        return from_bf16_bits(array.copy_to_host()).reshape(shape)

    a_host = load(a, (batch, K, M) if transa else (batch, M, K))
    b_host = load(b, (batch, N, K) if transb else (batch, K, N))
    if transa:
        a_host = a_host.transpose(0, 2, 1)
    if transb:
        b_host = b_host.transpose(0, 2, 1)
    result = np.matmul(a_host, b_host) * np.float32(alpha)
    if out.dtype == np.float32:  # fp32 sums: no epilogue, no rounding
        if beta != 0.0:
            result += np.float32(beta) * out.copy_to_host().reshape(batch, M, N)
        out.copy_to_device(result.astype(np.float32).reshape(out.shape))
        return
    if beta != 0.0:
        result += np.float32(beta) * load(out if addend is None else addend, (batch, M, N))
    if epilogue in _BIAS_EPILOGUES:
        result += from_bf16_bits(bias.copy_to_host())
    if epilogue in _GELU_AUX_EPILOGUES:
        aux.copy_to_device(to_bf16_bits(result).reshape(aux.shape))
        result = reference.gelu_forward(result)
    elif epilogue == Epilogue.DGELU:
        result = reference.gelu_backward(result, load(aux, (batch, M, N)))
    out.copy_to_device(to_bf16_bits(result).reshape(out.shape))


# ---- launchers ---------------------------------------------------------------------------------

def _rows_cols(name, array, cols):
    """An activation (..., cols) seen as a (rows, cols) matrix."""
    check_contiguous(name, array, np.uint16)
    shape = tuple(array.shape)  # the simulator's shapes take no negative index
    if len(shape) < 2 or shape[-1] != cols:
        raise ValueError(f"{name}: expected shape (..., {cols}), got {tuple(array.shape)}")
    return array.size // cols


def _check_weight(weight):
    check_contiguous("weight", weight, np.uint16)
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected shape (OC, C), got {tuple(weight.shape)}")
    return weight.shape


def _check_same_rows(rows, **arrays):
    for name, (array, cols) in arrays.items():
        other = _rows_cols(name, array, cols)
        if other != rows:
            raise ValueError(f"{name}: {other} rows of {cols}, expected {rows} (shape {tuple(array.shape)})")


def matmul_forward(out, inp, weight, bias=None, pre_gelu=None, residual=None, stream=0):
    """out = inp @ weight^T (+ bias); with pre_gelu, out = gelu(inp @ weight^T + bias) and pre_gelu
    keeps the pre-activation for the backward (the GELU_AUX_BIAS epilogue); with residual, out =
    residual + inp @ weight^T (+ bias), the sum taken in fp32 and rounded to bf16 once (cuBLASLt's
    C operand, beta 1: the residual stream's add without a pass of its own).
    inp is (B,T,C) (or (B*T, C)), weight (OC,C), bias (OC,), out, pre_gelu and residual (B,T,OC)."""
    OC, C = _check_weight(weight)
    rows = _rows_cols("inp", inp, C)
    _check_same_rows(rows, out=(out, OC))
    if bias is not None:
        check_contiguous("bias", bias, np.uint16, (OC,))
    if residual is not None:
        if pre_gelu is not None:
            raise ValueError("matmul_forward: residual and pre_gelu together (a GELU of the sum) are not supported")
        _check_same_rows(rows, residual=(residual, OC))
    if pre_gelu is not None:
        _check_same_rows(rows, pre_gelu=(pre_gelu, OC))
        epilogue = Epilogue.GELU_AUX_BIAS if bias is not None else Epilogue.GELU_AUX
    else:
        epilogue = Epilogue.BIAS if bias is not None else Epilogue.DEFAULT
    _gemm(out, inp, weight, rows, OC, C, 1, False, True, epilogue, bias, pre_gelu,
          beta=0.0 if residual is None else 1.0, stream=stream, addend=residual)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, pre_gelu=None, dbias_scratch=None, stream=0,
                    accumulate=True):
    """Backward of matmul_forward, as llm.c: dinp = dout @ weight (overwritten), dweight +=
    dout^T @ inp, dbias += column sums of dout (if dbias is given). accumulate=False: dweight and
    dbias are overwritten instead (the first micro-step: no zeroing pass, no read of the old
    values; the values of += into zeros, a zero's sign aside). With pre_gelu (the
    pre-activation of the GELU that produced inp, same shape as dinp), dinp is multiplied by
    gelu'(pre_gelu) in the DGELU epilogue: it becomes the gradient wrt that pre-activation.
    dout (B,T,OC), inp and dinp (B,T,C), weight and dweight (OC,C), dbias (OC,). dbias_scratch:
    float32, at least MAX_BIAS_PARTIALS * OC elements (allocated once here if not given)."""
    OC, C = _check_weight(weight)
    rows = _rows_cols("dout", dout, OC)
    _check_same_rows(rows, inp=(inp, C), dinp=(dinp, C))
    check_contiguous("dweight", dweight, np.uint16, (OC, C))
    if pre_gelu is not None:
        _check_same_rows(rows, pre_gelu=(pre_gelu, C))
    if dbias is not None:
        matmul_backward_bias(dbias, dout, dbias_scratch, stream, accumulate=accumulate)
    _input_gradient(dinp, dout, weight, rows, C, OC, pre_gelu, stream)
    _weight_gradient(dweight, dout, inp, OC, C, rows, accumulate, stream)


def _input_gradient(dinp, dout, weight, rows, C, OC, pre_gelu, stream):
    """dinp (rows, C) = dout (rows, OC) @ weight (OC, C), through DGELU with pre_gelu; checked by the caller."""
    _gemm(dinp, dout, weight, rows, C, OC, 1, False, False,
          Epilogue.DGELU if pre_gelu is not None else Epilogue.DEFAULT, aux=pre_gelu, stream=stream)


def _weight_gradient(dweight, dout, inp, OC, C, rows, accumulate, stream):
    """dweight (OC, C) (+)= dout^T @ inp, bf16 or fp32 (beta 1 adds); checked by the caller."""
    _gemm(dweight, dout, inp, OC, C, rows, 1, True, False, beta=1.0 if accumulate else 0.0, stream=stream)


def matmul_backward_input(dinp, dout, weight, stream=0):
    """dinp = dout @ weight (overwritten): matmul_backward's input gradient alone.
    dout (rows, OC), weight (OC, C), dinp (rows, C)."""
    OC, C = _check_weight(weight)
    rows = _rows_cols("dout", dout, OC)
    _check_same_rows(rows, dinp=(dinp, C))
    _input_gradient(dinp, dout, weight, rows, C, OC, None, stream)


def matmul_backward_weight_fp32(dweight, dout, inp, stream=0, accumulate=True):
    """dweight (OC, C) float32 += dout^T @ inp (accumulate=False: overwritten), in fp32, unrounded:
    a weight gradient summed over several row blocks (the lm head's chunks), rounded into the bf16
    gradient once by add_fp32_into_bf16. dout (rows, OC), inp (rows, C) bf16."""
    check_contiguous("dweight", dweight, np.float32)
    if len(dweight.shape) != 2:
        raise ValueError(f"dweight: expected shape (OC, C), got {tuple(dweight.shape)}")
    OC, C = dweight.shape
    rows = _rows_cols("dout", dout, OC)
    _check_same_rows(rows, inp=(inp, C))
    _weight_gradient(dweight, dout, inp, OC, C, rows, accumulate, stream)


ADD_BLOCK = 256


def add_fp32_into_bf16(out, src, stream=0, accumulate=True):
    """out (bf16) += src (float32), element by element, one rounding (accumulate=False: out = src
    rounded, the bits of += into zeros). Same shapes, contiguous."""
    check_contiguous("out", out, np.uint16)
    check_contiguous("src", src, np.float32, tuple(out.shape))
    n = out.size
    if n:
        block = 32 if SIMULATOR else ADD_BLOCK  # the simulator runs a Python thread per GPU thread
        blocks = min(ceil_div(n, block), 32 * 1024)
        add_fp32_into_bf16_kernel[blocks, block, stream](out.reshape(n), src.reshape(n), bool(accumulate))


_bias_scratch = None


def _bias_grid(rows, OC, block_words, block_rows):
    """(grid, rows_per_block) of matmul_backward_bias_kernel. From the shape only, so the summation
    order (and the bits) are the same on every GPU: slices of rows as short as one round of loads
    per thread (block_rows * BIAS_LOADS_IN_FLIGHT rows), so small B*T still gets many blocks, and
    longer where MAX_BIAS_PARTIALS slices would not cover the rows."""
    round_rows = block_rows * BIAS_LOADS_IN_FLIGHT
    rows_per_block = max(1, ceil_div(ceil_div(rows, MAX_BIAS_PARTIALS), round_rows)) * round_rows
    grid = (ceil_div(OC // 4, block_words), max(1, ceil_div(rows, rows_per_block)))
    return grid, rows_per_block


def matmul_backward_bias(dbias, dout, dbias_scratch=None, stream=0, block=None, pre_gelu=None, accumulate=True,
                         row_width=None):
    """dbias (OC,) += dout summed over rows (accumulate=False: dbias = the sums, the bits of += into
    zeros); dout (B,T,OC) bf16 with OC a multiple of 4. row_width (a multiple of 4, >= OC): dout is
    (B,T,row_width) instead and only its first OC columns are summed (the query third of the qkv
    gradient, qkv_bias.py), each column in the order it has in a dout of OC columns.
    Deterministic: each column is summed in fp32 in a fixed order (set by the shape and block) and
    rounded to bf16 once. dbias_scratch: float32, at least MAX_BIAS_PARTIALS * OC elements.
    block: (words, rows) threads, at most (BIAS_BLOCK_WORDS, BIAS_BLOCK_ROWS) (the default on a GPU).
    pre_gelu (same shape as dout): the GELU's backward first, in the same pass -- dout holds dL/d
    gelu(pre_gelu) on entry and dL/d pre_gelu on exit (gelu.gelu_backward_inplace's words), and
    dbias gets the sums of the new words: the fc layer's bias gradient without reading dout again."""
    global _bias_scratch
    check_contiguous("dbias", dbias, np.uint16)
    if len(dbias.shape) != 1:
        raise ValueError(f"dbias: expected shape (OC,), got {tuple(dbias.shape)}")
    OC = dbias.shape[0]
    width = OC if row_width is None else row_width
    if OC % 4 or width % 4 or width < OC:
        raise ValueError(f"dbias: OC={OC} and dout's row width {width} must each be a multiple of 4 (the kernel "
                         f"reads four bf16 per word), the rows at least OC wide")
    rows = _rows_cols("dout", dout, width)
    if not SIMULATOR and _pointer(dout) % 8:
        raise ValueError("dout: device pointer must be 8-byte aligned (the bias kernel reads uint64 words)")
    if block is None:  # the simulator runs a Python thread per GPU thread: small blocks there
        block = (min(BIAS_BLOCK_WORDS, OC // 4), 4 if SIMULATOR else BIAS_BLOCK_ROWS)
    block_words, block_rows = block
    if not (0 < block_words <= BIAS_BLOCK_WORDS and 0 < block_rows <= BIAS_BLOCK_ROWS):
        raise ValueError(f"block {block}: at most ({BIAS_BLOCK_WORDS}, {BIAS_BLOCK_ROWS})")
    grid, rows_per_block = _bias_grid(rows, OC, block_words, block_rows)
    if dbias_scratch is None:
        if _bias_scratch is None or _bias_scratch.size < MAX_BIAS_PARTIALS * OC:
            _bias_scratch = cuda.device_array(MAX_BIAS_PARTIALS * OC, dtype=np.float32)
        dbias_scratch = _bias_scratch
    check_contiguous("dbias_scratch", dbias_scratch, np.float32)
    if dbias_scratch.size < grid[1] * OC:
        raise ValueError(f"dbias_scratch: {dbias_scratch.size} floats, needs {grid[1] * OC}")
    # the kernels index the scratch as flat rows of OC: no per-call slicing of device arrays (host time)
    partial = dbias_scratch if len(dbias_scratch.shape) == 1 else dbias_scratch.reshape(dbias_scratch.size)
    dout_words = dout.reshape(dout.size).view(np.uint64)
    if pre_gelu is None:
        matmul_backward_bias_kernel[grid, block, stream](partial, dout_words, rows, OC // 4, width // 4,
                                                         rows_per_block)
    else:
        if width != OC:
            raise ValueError("matmul_backward_bias: pre_gelu takes whole rows (no row_width)")
        _check_same_rows(rows, pre_gelu=(pre_gelu, OC))
        if not SIMULATOR and _pointer(pre_gelu) % 8:
            raise ValueError("pre_gelu: device pointer must be 8-byte aligned (the kernel reads uint64 words)")
        pre_gelu_words = pre_gelu.reshape(pre_gelu.size).view(np.uint64)
        gelu_backward_bias_kernel[grid, block, stream](partial, dout_words, pre_gelu_words, rows, OC // 4,
                                                       rows_per_block)
    add_block = (min(BIAS_ADD_COLUMNS, OC), min(4 if SIMULATOR else BIAS_ADD_LANES, grid[1]))
    matmul_bias_add_partials_kernel[ceil_div(OC, add_block[0]), add_block, stream](dbias, partial, grid[1],
                                                                                    bool(accumulate))


def matmul_batched(out, a, b, transa=False, transb=False, alpha=1.0, beta=0.0, stream=0):
    """out = alpha * op(a) @ op(b) + beta * out for each of `batch` matrices (a strided-batched
    cuBLASLt product, as attention uses). Row-major, contiguous bf16 arrays:
    out (batch, M, N); a (batch, M, K), or (batch, K, M) with transa; b (batch, K, N), or
    (batch, N, K) with transb. 2-D arrays are a batch of one."""
    arrays = {}
    for name, array in (("out", out), ("a", a), ("b", b)):
        check_contiguous(name, array, np.uint16)
        shape = tuple(array.shape)
        if len(shape) == 2:
            shape = (1,) + shape
        if len(shape) != 3:
            raise ValueError(f"{name}: expected a (batch, rows, cols) or (rows, cols) array, got {tuple(array.shape)}")
        arrays[name] = shape
    batch, M, N = arrays["out"]
    a_batch, a_rows, a_cols = arrays["a"]
    b_batch, b_rows, b_cols = arrays["b"]
    K = a_rows if transa else a_cols
    expected_a = (batch, K, M) if transa else (batch, M, K)
    expected_b = (batch, N, K) if transb else (batch, K, N)
    if arrays["a"] != expected_a or arrays["b"] != expected_b:
        raise ValueError(f"matmul_batched: shapes do not match: out {arrays['out']}, a {arrays['a']} "
                         f"(transa={transa}), b {arrays['b']} (transb={transb}); "
                         f"expected a {expected_a} and b {expected_b}")
    _gemm(out, a, b, M, N, K, batch, bool(transa), bool(transb), alpha=alpha, beta=beta, stream=stream)
