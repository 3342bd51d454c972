"""AdamW over GPT-2 124M's parameters (124,475,904 with the padded vocabulary): one call over the
whole flat buffer, and one call per tensor (as the model did, for per-tensor weight decay); then
the multi-tensor launch the model runs now (one launch over the 16 tensors) at d12 and d48, with
1, 2, 4 and 8 words (four parameters each) per thread, checked bit for bit against the per-tensor
calls first.

    python benchmarks/adamw.py [--multi-only]

Bytes counted: 28 per parameter (read grad 2, master 4, m 4, v 4; write master, m, v, param).
"""

import sys

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.config import WEIGHT_DECAY_PARAMETERS, from_descriptor, parameter_shapes
from nanollm.kernels import adamw
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

L, C, Vp, maxT = 12, 768, 50304, 1024
TENSOR_SIZES = [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
                L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]
N = sum(TENSOR_SIZES)
HYPER = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
BYTES_PER_PARAMETER = 28
CHECK = 1 << 20  # parameters compared with the float64 reference


def random_state(rng, n):
    """(params bf16 bits, grads bf16 bits, master fp32 = params, m, v) of n parameters, at training's sizes."""
    params_bits = to_bf16_bits(rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))
    grads_bits = to_bf16_bits(rng.standard_normal(n, dtype=np.float32) * np.float32(0.01))
    m = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    v = rng.random(n, dtype=np.float32) * np.float32(1e-5)
    return params_bits, grads_bits, from_bf16_bits(params_bits), m, v


def main():
    rng = np.random.default_rng(0)
    params_bits, grads_bits, master, m, v = random_state(rng, N)

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


def multi_tensor(descriptor, copy, words_per_thread=(1, 2, 4, 8)):
    """The model's update (one launch over every tensor, weight decay on the 2-D ones) at one size."""
    shapes = parameter_shapes(from_descriptor(descriptor))
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    decays = [name in WEIGHT_DECAY_PARAMETERS for name in shapes]
    n = sum(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    ranges = [(int(o), c, int(o), d, k) for k, (o, c, d) in enumerate(zip(offsets, sizes, decays))]
    rng = np.random.default_rng(1)
    inputs = random_state(rng, n)
    hyper = cuda.to_device(adamw.adamw_hyperparameters(10, HYPER["lr"], weight_decay=HYPER["weight_decay"], seed=99))
    scale = cuda.to_device(np.array([HYPER["grad_scale"]], np.float32))
    # bits first: each words_per_thread against the per-tensor calls, on a sample of elements
    sample = np.sort(rng.choice(n, min(n, 1 << 20), replace=False))
    expected = [cuda.to_device(a) for a in inputs]
    for (offset, count, state_offset, decay, index) in ranges:
        adamw.adamw_update(*expected, 10, HYPER["lr"], weight_decay=HYPER["weight_decay"] if decay else 0.0,
                           grad_scale=HYPER["grad_scale"], seed=(99 + index) & 0xFFFFFFFF, offset=offset,
                           count=count, state_offset=state_offset)
    expected = [a.copy_to_host()[sample] for a in expected]
    rows = []
    for wpt in words_per_thread:
        state = [cuda.to_device(a) for a in inputs]
        launch = adamw.prepare_adamw_multi_tensor(*state, ranges, words_per_thread=wpt)
        launch(hyper, scale)
        same = all(e.tobytes() == a.copy_to_host()[sample].tobytes() for e, a in zip(expected, state))
        ms = time_ms(lambda i: launch(hyper, scale), 1, per_batch=4)
        gbs = BYTES_PER_PARAMETER * n / ms / 1e6
        rows.append(dict(kernel=f"multi-tensor, {wpt} words/thread ({'same bits' if same else 'BITS DIFFER'})",
                         shape=f"{descriptor}: {n:,}", ms=ms, gbs=gbs, pct=100 * gbs / copy, err=0.0))
        del state
    print_table(f"AdamW multi-tensor, {descriptor}", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    if "--multi-only" not in sys.argv:
        main()
    bandwidth = copy_bandwidth_gbs()
    for model in ("d12", "d48"):
        multi_tensor(model, bandwidth)
