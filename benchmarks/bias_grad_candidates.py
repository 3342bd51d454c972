"""The bias-gradient candidates of nanollm/kernels/matmul.py (NANOLLM_BIAS_GRAD) side by side at
the training step's shapes: v1 (the column-sum kernel + the add kernel, the default), v2 (one launch,
16-byte loads, the same bits as v1) and epilogue (cuBLASLt's BGRADB epilogue on the dweight
product, fp32 sums, then v1's add kernel: no read of dout of its own).

    source benchmarks/gpu_env.sh; python3 benchmarks/bias_grad_candidates.py    (~1 minute)

Shapes, T=1024: d12 (B=64, C=768, 12 layers) and d48 (B=16, C=1600, 48 layers); each layer's
qkv (OC=3C), attproj (OC=C), fc (OC=4C) and fcproj (OC=C, input 4C wide) bias gradient, one call per
layer per micro-step. Three tables:
1. The kernels alone ("kernel v1 / v2 / v2 16x8", the last with half-width blocks) on dout
   (B*T, OC), inputs rotated past L2. GB/s counts dout once; "% of copy" compares with
   common.copy_bandwidth_gbs (read + write of a copy: a pure read may pass 100%); "step ms" =
   ms x layers; v2's bits against v1's.
2. The whole matmul_backward (the dinp and dweight products + dbias) under each
   NANOLLM_BIAS_GRAD, and "backward, no dbias" the two products alone: "bias ms" is the
   difference, what the bias gradient adds to the step (for the epilogue the only way to see its
   cost: it has no kernel of its own). "same": v1/v2 bits against v1's; for the epilogue its
   distance from v1 in bf16 units in the last place (it adds the same values in cuBLASLt's order),
   its relative error against float64 sums of 64 sampled columns, and whether two runs agreed.
3. Per training step: each candidate's ms summed over the layers (kernel alone, or added to
   matmul_backward), the number to compare with the step profile's bias-gradient time.
"""

import argparse

from common import copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import matmul
from nanollm.kernels.bf16 import bf16_ulps_apart, from_bf16_bits

T = 1024
SETTINGS = [("d12", 64, 768, 12), ("d48", 16, 1600, 48)]  # model, B, C, layers
SAMPLED_COLUMNS = 64


def layers(C):
    """(name, C_in, OC) of a transformer block's four biased products."""
    return [("qkv", C, 3 * C), ("attproj", C, C), ("fc", C, 4 * C), ("fcproj", 4 * C, C)]


def random_bf16_bits(rng, n):
    """n random bf16 (normal, truncated from fp32: the rounding does not matter for data)."""
    return (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="d12,d48", help="which of d12, d48")
    args = parser.parse_args()
    copy = copy_bandwidth_gbs()
    table, totals = [], []
    for model, B, C, L in SETTINGS:
        if model not in args.models.split(","):
            continue
        rng = np.random.default_rng(0)
        rows = B * T
        # one pool of random dout values; each shape's copies (rotated past L2) are slices of it
        pool_host = random_bf16_bits(rng, rows * 4 * C)
        pool = cuda.to_device(pool_host)
        for name, C_in, OC in layers(C):
            n = rows * OC
            sets = min(copies_needed(2 * n), pool.size // n)
            douts = [pool[k * n:(k + 1) * n].reshape(rows, OC) for k in range(sets)]
            start = random_bf16_bits(rng, OC)
            dbias = cuda.to_device(start)
            scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * OC, np.float32)
            inp = cuda.to_device(random_bf16_bits(rng, rows * C_in).reshape(rows, C_in))
            weight = cuda.to_device((random_bf16_bits(rng, OC * C_in) & 0xBFFF).reshape(OC, C_in))  # |w| < 2
            dweight = cuda.to_device(np.zeros((OC, C_in), np.uint16))
            dinp = cuda.device_array((rows, C_in), np.uint16)
            gb = n * 2 / 1e9
            label = dict(model=f"{model} B={B}", layer=name, shape=f"{rows}x{OC}", shape_gb=gb)

            def bias_result(run):
                dbias.copy_to_device(start)
                run()
                return dbias.copy_to_host()

            # the kernels alone
            v1_bits = bias_result(lambda: matmul.matmul_backward_bias(dbias, douts[0], scratch, variant="v1"))
            for candidate, variant, block in (("kernel v1", "v1", None), ("kernel v2", "v2", None),
                                              ("kernel v2 16x8", "v2", (16, matmul.BIAS_BLOCK_ROWS))):
                bits = bias_result(lambda: matmul.matmul_backward_bias(dbias, douts[0], scratch, block=block,
                                                                       variant=variant))
                same = "(reference)" if variant == "v1" else (
                    "yes" if np.array_equal(bits, v1_bits) else f"NO: {np.count_nonzero(bits != v1_bits)} differ")
                ms = time_ms(lambda i: matmul.matmul_backward_bias(dbias, douts[i % sets], scratch, block=block,
                                                                   variant=variant), sets, repeat=15)
                gbs = gb * 1e3 / ms
                table.append(dict(label, candidate=candidate, ms=ms, gbs=f"{gbs:.0f}", pct=f"{100 * gbs / copy:.0f}%",
                                  bias_ms=ms, step=ms * L, same=same))

            # the whole backward of the layer, per variant, and without dbias
            def backward(i, with_bias=True):
                matmul.matmul_backward(dinp, dweight, dbias if with_bias else None, douts[i % sets], inp, weight,
                                       dbias_scratch=scratch)

            products_ms = time_ms(lambda i: backward(i, with_bias=False), sets, repeat=15)
            table.append(dict(label, candidate="backward, no dbias", ms=products_ms, gbs="", pct="",
                              bias_ms=0.0, step=products_ms * L, same=""))
            saved = matmul.BIAS_GRAD
            try:
                for variant in ("v1", "v2", "epilogue"):
                    matmul.BIAS_GRAD = variant
                    try:
                        bits = bias_result(lambda: backward(0))
                        again = bias_result(lambda: backward(0))
                        ms = time_ms(backward, sets, repeat=15)
                    except RuntimeError as error:  # e.g. cuBLASLt has no BGRADB kernel with an fp32 bias
                        table.append(dict(label, candidate=f"backward + {variant}", ms=float("nan"), gbs="",
                                          pct="", bias_ms=float("nan"), step=float("nan"),
                                          same=f"FAILED: {str(error)[:120]}"))
                        continue
                    if variant == "epilogue":
                        ulps, differ = bf16_ulps_apart(bits, v1_bits), np.count_nonzero(bits != v1_bits)
                        cols = np.sort(rng.choice(OC, size=min(OC, SAMPLED_COLUMNS), replace=False))
                        dout_host = from_bf16_bits(pool_host[:n].reshape(rows, OC)[:, cols])
                        expected = from_bf16_bits(start[cols]).astype(np.float64) + dout_host.sum(0, dtype=np.float64)
                        got = from_bf16_bits(bits[cols]).astype(np.float64)
                        err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
                        same = (f"<= {ulps:.0f} ulp of v1 ({differ} of {OC} differ), rel.err {err:.1e}, "
                                f"{'deterministic' if np.array_equal(bits, again) else 'NOT DETERMINISTIC'}")
                    else:
                        same = ("yes" if np.array_equal(bits, v1_bits) else "NO") + (
                            "" if np.array_equal(bits, again) else ", NOT DETERMINISTIC")
                    table.append(dict(label, candidate=f"backward + {variant}", ms=ms, gbs="", pct="",
                                      bias_ms=ms - products_ms, step=ms * L, same=same))
            finally:
                matmul.BIAS_GRAD = saved
            del inp, weight, dweight, dinp, scratch
        totals.append((model, B, L))
        del pool

    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    columns = [("model", "model", "{}"), ("layer", "layer", "{}"), ("shape", "dout", "{}"),
               ("candidate", "candidate", "{}"), ("ms", "ms", "{:.4f}")]
    print_table("the bias-gradient kernels alone (ms per call; step ms: x layers)",
                [r for r in table if r["candidate"].startswith("kernel")],
                columns + [("gbs", "GB/s", "{}"), ("pct", "% of copy", "{}"), ("step", "step ms", "{:.2f}"),
                           ("same", "same bits as v1", "{}")])
    print_table("matmul_backward per NANOLLM_BIAS_GRAD (bias ms: what dbias adds to the two products)",
                [r for r in table if r["candidate"].startswith("backward")],
                columns + [("bias_ms", "bias ms", "{:.4f}"), ("step", "step ms", "{:.2f}"), ("same", "same", "{}")])
    summary = []
    for model, B, L in totals:
        for candidate in ("kernel v1", "kernel v2", "kernel v2 16x8", "v1", "v2", "epilogue"):
            mine = [r for r in table if r["model"] == f"{model} B={B}" and
                    r["candidate"] in (candidate, f"backward + {candidate}")]
            kernel = candidate.startswith("kernel")
            summary.append(dict(model=f"{model} B={B}", candidate=candidate if kernel else f"backward + {candidate}",
                                what="kernel alone" if kernel else "added to matmul_backward",
                                step=sum(r["bias_ms"] for r in mine) * L,
                                gbs=(f"{sum(r['shape_gb'] for r in mine) * 1e3 / sum(r['ms'] for r in mine):.0f}"
                                     if kernel else ""),
                                same="; ".join(sorted({r["same"].split(" (")[0].split(",")[0] for r in mine}))))
    print_table("per training step (one micro-step: 4 bias gradients per layer; GB/s over the four shapes)",
                summary, [("model", "model", "{}"), ("candidate", "candidate", "{}"), ("what", "bias gradient", "{}"),
                          ("step", "ms per step", "{:.2f}"), ("gbs", "GB/s", "{}"), ("same", "same", "{}")])


if __name__ == "__main__":
    main()
