"""Global norm (squared) of GPT-2 124M's bf16 gradients: one flat buffer (one launch, as llm.c),
and the 16 parameter tensors as views into it (one launch each), both plus the final reduction.

    python benchmarks/global_norm.py

Bytes counted: one read of the gradients (2 per parameter); the kernel writes only a few KB.
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import global_norm
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

L, C, Vp, maxT = 12, 768, 50304, 1024
TENSOR_SIZES = [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
                L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]
N = sum(TENSOR_SIZES)


def tensors_of(flat):
    offsets = np.concatenate([[0], np.cumsum(TENSOR_SIZES)])
    return [flat[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]


def main():
    rng = np.random.default_rng(0)
    bits = to_bf16_bits(rng.standard_normal(N, dtype=np.float32) * np.float32(1e-3))
    expected = reference.global_norm([from_bf16_bits(bits).astype(np.float64)]) ** 2

    n_sets = copies_needed(2 * N)
    flats = [cuda.to_device(bits) for _ in range(n_sets)]
    scratch = cuda.device_array(global_norm.global_norm_scratch_size(), np.float32)
    out = cuda.device_array(1, np.float32)

    # correctness and determinism first
    results = []
    for grads in (flats[0], tensors_of(flats[0])):
        global_norm.global_norm_squared(out, scratch, grads)
        results.append(out.copy_to_host()[0])
        global_norm.global_norm_squared(out, scratch, grads)
        assert out.copy_to_host()[0] == results[-1], "not deterministic"
    errs = [abs(r - expected) / expected for r in results]
    assert max(errs) < 1e-5, errs

    copy = copy_bandwidth_gbs()
    rows = []
    for name, launch, err in (
            ("global_norm_squared (flat)", lambda i: global_norm.global_norm_squared(out, scratch, flats[i]), errs[0]),
            (f"global_norm_squared ({len(TENSOR_SIZES)} tensors)",
             lambda i, views=[tensors_of(f) for f in flats]: global_norm.global_norm_squared(out, scratch, views[i]),
             errs[1])):
        ms = time_ms(launch, n_sets, per_batch=4)
        gbs = 2 * N / ms / 1e6
        rows.append(dict(kernel=name, shape=f"{N:,}", ms=ms, gbs=gbs, pct=100 * gbs / copy, err=err))
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s; scratch {scratch.shape[0]} partial sums")
    print_table("Global norm (squared)", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
