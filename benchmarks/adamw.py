"""AdamW over GPT-2 124M's parameters (124,475,904 with the padded vocabulary): one call over the
whole flat buffer, and one call per tensor (as the model does, for per-tensor weight decay).

    python benchmarks/adamw.py

Bytes counted: 28 per parameter (read grad 2, master 4, m 4, v 4; write master, m, v, param).
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import adamw
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

L, C, Vp, maxT = 12, 768, 50304, 1024
TENSOR_SIZES = [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
                L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]
N = sum(TENSOR_SIZES)
HYPER = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
BYTES_PER_PARAMETER = 28
CHECK = 1 << 20  # parameters compared with the float64 reference


def main():
    rng = np.random.default_rng(0)
    params_bits = to_bf16_bits(rng.standard_normal(N, dtype=np.float32) * np.float32(0.02))
    grads_bits = to_bf16_bits(rng.standard_normal(N, dtype=np.float32) * np.float32(0.01))
    master = from_bf16_bits(params_bits)
    m = rng.standard_normal(N, dtype=np.float32) * np.float32(1e-3)
    v = rng.random(N, dtype=np.float32) * np.float32(1e-5)

    # correctness first, at the benchmark's own size: sampled parameters against float64
    device = [cuda.to_device(a) for a in (params_bits, grads_bits, master, m, v)]
    adamw.adamw_update(*device, 10, seed=1234, **HYPER)
    sample = np.sort(rng.choice(N, CHECK, replace=False))
    ref = [a[sample].astype(np.float64) for a in (master, m, v)]
    reference.adamw_update(ref[0], from_bf16_bits(grads_bits[sample]).astype(np.float64), ref[1], ref[2], 10, **HYPER)
    out_params, out_master = device[0].copy_to_host()[sample], device[2].copy_to_host()[sample]
    err = np.linalg.norm(out_master - ref[0]) / np.linalg.norm(ref[0])
    one_ulp = np.isin(out_params.astype(np.int64) - (out_master.view(np.uint32) >> 16).astype(np.int64), (0, 1))
    assert err < 1e-6 and one_ulp.all(), (err, np.count_nonzero(~one_ulp))

    n_sets = copies_needed(BYTES_PER_PARAMETER * N)
    sets = [[cuda.to_device(a) for a in (params_bits, grads_bits, master, m, v)] for _ in range(n_sets)]
    offsets = np.concatenate([[0], np.cumsum(TENSOR_SIZES)[:-1]])

    def per_tensor(i):
        for offset, count in zip(offsets, TENSOR_SIZES):
            adamw.adamw_update(*sets[i], 10, seed=1234, offset=int(offset), count=count, **HYPER)

    copy = copy_bandwidth_gbs()
    rows = []
    for name, launch in (("adamw_update (one call)", lambda i: adamw.adamw_update(*sets[i], 10, seed=1234, **HYPER)),
                         (f"adamw_update ({len(TENSOR_SIZES)} tensors)", per_tensor)):
        ms = time_ms(launch, n_sets, per_batch=4)
        gbs = BYTES_PER_PARAMETER * N / ms / 1e6
        rows.append(dict(kernel=name, shape=f"{N:,}", ms=ms, gbs=gbs, pct=100 * gbs / copy, err=err))
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("AdamW", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
