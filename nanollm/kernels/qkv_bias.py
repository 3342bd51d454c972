"""The qkv bias gradient from the softmax's invariances: a third of llm.c's pass over dqkv.

llm.c sums the qkv layer's output gradient dqkv (B,T,3C) over its B*T rows for the bias gradient,
one read of all 3C columns (matmul_backward_bias). In exact arithmetic two of the three parts are
known without that read:
- keys: adding b_k to every key adds q_i . b_k to every score of query i, and the softmax takes
  the same constant off them again, so the loss does not depend on b_k: its gradient is 0. (llm.c's
  sums give rounding noise around 0 there.)
- values: every row of the causal attention matrix P sums to 1, so per head
  sum_j dv_j = sum_j sum_i P_ij dO_i = sum_i dO_i, the column sums of the gradient of the attention's
  output. That gradient is attproj's input gradient, dO = dout @ W_attproj, so the sums are
  (sum_t dout_t) @ W_attproj = dattprojb @ W_attproj: attproj's bias gradient (which the
  layernorm backward at ln2 already summed) times its weight, a (1,C) x (C,C) product.
- queries: no such identity; the bias kernel sums dqkv's first C columns, the same column sums in
  the same order as over all 3C (the query part's bits are llm.c's way's).
Both hold for any attention that normalises each query's row (cuDNN's flash attention and
attention.py alike). The value part differs from the sums of dv by rounding only: fp32 products of
the bf16 attproj bias gradient and weight, rounded once, against fp32 sums of bf16 dv values.

Micro-steps: the query part is added into (+=) as before. The key and value parts are written
(=): attproj's bias gradient holds the running sum over the micro-steps so far, this one
included, so its product with the (fixed) weight is the running sum of the value parts. Several
ranks: each rank's parts come from its own gradients, and the average of the products is the
product of the average. The key part is written as zeros every time, so nothing left in the buffer
(an earlier step, a test's poison) survives.

NANOLLM_QKV_BIAS_GRAD picks the way at import: "softmax" (the default) or "sums" (llm.c's, the whole
of dqkv summed); the launcher also takes mode=. cuBLASLt wants its operands 16-byte aligned: the
parameter and gradient tensors start at multiples of C elements, so C % 8 == 0 (every GPT-2 size)
keeps the slices aligned; another C takes the sums.
"""

import numpy as np
from numba.cuda.cudadrv.driver import device_memset

from . import matmul
from .cuda_common import SIMULATOR, check_contiguous, check_variant, variant_from_environment

MODES = ("softmax", "sums")
MODE = variant_from_environment("NANOLLM_QKV_BIAS_GRAD", MODES, "softmax")


def uses_identities(C, mode=None):
    """Whether qkv_bias_backward takes the key and value parts from the identities at C channels."""
    return check_variant(mode or MODE, MODES) == "softmax" and (SIMULATOR or C % 8 == 0)


def qkv_bias_backward(dqkvb, dqkv, dattprojb, attprojw, dbias_scratch=None, stream=0, accumulate=True, mode=None):
    """The qkv layer's bias gradient dqkvb (3C,) bf16 for its output gradient dqkv (B,T,3C) bf16:
    the query part += dqkv's first C columns summed over rows (accumulate=False: =), the key part =
    0, the value part = dattprojb (C,) @ attprojw (C,C), attproj's bias gradient, complete for this
    micro-step, and weight (see the module docstring). mode "sums": dqkvb += all of dqkv summed, as
    llm.c. dbias_scratch: as matmul.matmul_backward_bias's."""
    C = tuple(attprojw.shape)[-1]  # (the simulator's shapes take no negative index)
    check_contiguous("dqkvb", dqkvb, np.uint16, (3 * C,))
    check_contiguous("dattprojb", dattprojb, np.uint16, (C,))
    check_contiguous("attprojw", attprojw, np.uint16, (C, C))
    if not uses_identities(C, mode):
        matmul.matmul_backward_bias(dqkvb, dqkv, dbias_scratch, stream, accumulate=accumulate)
        return
    matmul.matmul_backward_bias(dqkvb[:C], dqkv, dbias_scratch, stream, accumulate=accumulate, row_width=3 * C)
    device_memset(dqkvb[C:2 * C], 0, 2 * C, stream=stream)
    matmul.matmul_backward_input(dqkvb[2 * C:].reshape(1, C), dattprojb.reshape(1, C), attprojw, stream=stream)
