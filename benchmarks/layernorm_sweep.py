"""LayerNorm launch shapes at the training step's sizes: which rows-per-block / grid for
layernorm_backward, and warps-per-block for the fused residual + layernorm forward, are fastest at
d12 B=64 and d48 B=16 (T=1024). The kernels are unchanged; only their launch parameters move.

    python benchmarks/layernorm_sweep.py

layernorm_backward's dinp is computed per row with the row's own sums, so every configuration gives
the same dinp bits (checked here); dweight/dbias are summed per block, so the grid and rows per
block set their summation order (still deterministic; checked against the default to fp32 noise).
The forward writes the same bits for any warps per block (one warp per row; checked). "step ms"
multiplies by the calls per training step (d12: 25 backward, 24 fused forward; d48: 97 and 96).
"""

from common import copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import layernorm
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

T = 1024
SETTINGS = [("d12", 64, 768, 12), ("d48", 16, 1600, 48)]  # model, B, C, L
WARPS = (2, 4, 8, 16, 32)  # fused forward: warps (rows) per block
ROWS = (1, 2, 3, 4, 5)  # backward: rows per block (while the block has <= 1024 threads)
BLOCKS = (132, 256, 528, 1056, 2112)  # backward: most blocks


def bf16_device(rng, shape, scale=1.0, shift=0.0):
    return cuda.to_device(to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
                                       + np.float32(shift)))


def main():
    copy = copy_bandwidth_gbs()
    rows_out = []
    for model, B, C, L in SETTINGS:
        rng = np.random.default_rng(0)
        shape, N = (B, T, C), B * T
        act = N * C * 2
        x, y, g = bf16_device(rng, shape, 2.0, 0.5), bf16_device(rng, shape), bf16_device(rng, shape)
        weight, bias = bf16_device(rng, (C,), 0.2, 1.0), bf16_device(rng, (C,), 0.2)
        out, residual = cuda.device_array(shape, np.uint16), cuda.device_array(shape, np.uint16)
        mean, rstd = cuda.device_array((B, T), np.float32), cuda.device_array((B, T), np.float32)
        layernorm.fused_residual_layernorm_forward(residual, out, mean, rstd, x, y, weight, bias)
        reference_out = out.copy_to_host()
        for warps in WARPS:
            layernorm.fused_residual_layernorm_forward(residual, out, mean, rstd, x, y, weight, bias,
                                                       warps_per_block=warps)
            same = bool(np.array_equal(out.copy_to_host(), reference_out))
            ms = time_ms(lambda i: layernorm.fused_residual_layernorm_forward(
                residual, out, mean, rstd, x, y, weight, bias, warps_per_block=warps), warmup=3, repeat=9,
                per_batch=5)
            gbs = (4 * act + 2 * N * 4) / ms / 1e6
            rows_out.append(dict(model=f"{model} B={B}", kernel="fused_residual_layernorm_forward",
                                 config=f"{warps} warps/block" + (" (default)" if warps == layernorm.FORWARD_WARPS
                                                                  else ""),
                                 ms=ms, pct=100 * gbs / copy, step=(L * 2) * ms, same="yes" if same else "NO"))

        width = -(-C // 4 // 32) * 32
        scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C, 4096), np.float32)
        dinp0, dweight0, dbias0 = cuda.device_array(shape, np.uint16), cuda.device_array(C, np.uint16), \
            cuda.device_array(C, np.uint16)
        results = {}
        default_rows = layernorm.layernorm_backward_block(C)[1]
        for rows in sorted(set(ROWS) | {default_rows}):
            if width * rows > 1024:
                continue
            for blocks in sorted(set(BLOCKS) | {layernorm.BACKWARD_BLOCKS}):
                dinp, dweight, dbias = cuda.device_array_like(dinp0), cuda.device_array_like(dweight0), \
                    cuda.device_array_like(dbias0)
                for a, b in ((dinp, g), (dweight, weight), (dbias, bias)):
                    a.copy_to_device(b)
                try:
                    layernorm.layernorm_backward(dinp, dweight, dbias, scratch, g, x, weight, mean, rstd,
                                                 num_blocks=blocks, rows_per_block=rows)
                except Exception as error:  # more registers a block than an SM has (not a sticky error)
                    if "OUT_OF_RESOURCES" not in str(error):
                        raise
                    print(f"{model}: {rows} rows x {width} threads do not launch ({layernorm.BACKWARD_VARIANT}'s "
                          "registers): skipped")
                    break
                results[rows, blocks] = [a.copy_to_host() for a in (dinp, dweight, dbias)]
                ms = time_ms(lambda i: layernorm.layernorm_backward(
                    dinp, dweight, dbias, scratch, g, x, weight, mean, rstd, num_blocks=blocks, rows_per_block=rows),
                    warmup=3, repeat=9, per_batch=5)
                gbs = (4 * act + 2 * N * 4 + 5 * C * 2) / ms / 1e6
                default = (rows == default_rows and blocks == layernorm.BACKWARD_BLOCKS)
                rows_out.append(dict(model=f"{model} B={B}", kernel="layernorm_backward",
                                     config=f"{rows} rows x {width} threads, <= {blocks} blocks"
                                     + (" (default)" if default else ""),
                                     ms=ms, pct=100 * gbs / copy, step=(2 * L + 1) * ms, same=None,
                                     key=(rows, blocks)))
        base = results[default_rows, layernorm.BACKWARD_BLOCKS]
        for row in rows_out:
            if row["kernel"] == "layernorm_backward" and row["same"] is None:
                got = results[row["key"]]
                dinp_same = np.array_equal(got[0], base[0])
                sums = max(np.max(np.abs(from_bf16_bits(a).astype(np.float64) - from_bf16_bits(b)))
                           / max(np.max(np.abs(from_bf16_bits(b))), 1e-30) for a, b in zip(got[1:], base[1:]))
                row["same"] = f"dinp {'yes' if dinp_same else 'NO'}, dw/db {sums:.0e}"
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("LayerNorm launch shapes (ms per call; step ms: x calls per step; same: bits vs the default)",
                rows_out, [("model", "model", "{}"), ("kernel", "kernel", "{}"), ("config", "config", "{}"),
                           ("ms", "ms", "{:.4f}"), ("pct", "% of copy", "{:.0f}%"), ("step", "step ms", "{:.2f}"),
                           ("same", "same", "{}")])


if __name__ == "__main__":
    main()
