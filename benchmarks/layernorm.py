"""LayerNorm forward/backward, residual add and fused residual + layernorm at GPT-2 124M's shape
(B=8, T=1024, C=768).

    python benchmarks/layernorm.py
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import layernorm
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

B, T, C = 8, 1024, 768


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def bf16(rng, shape, scale=1.0, shift=0.0):
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale) + np.float32(shift))
    return bits, from_bf16_bits(bits).astype(np.float64)


def download(array):
    return from_bf16_bits(array.copy_to_host()).astype(np.float64)


def main():
    rng = np.random.default_rng(0)
    shape, N = (B, T, C), B * T
    x_bits, x = bf16(rng, shape, 2.0, 0.5)
    y_bits, y = bf16(rng, shape)
    w_bits, w = bf16(rng, (C,), 0.2, 1.0)
    b_bits, b = bf16(rng, (C,), 0.2)
    g_bits, g = bf16(rng, shape)
    weight, bias = cuda.to_device(w_bits), cuda.to_device(b_bits)
    scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C), np.float32)

    # correctness first, at the benchmark's own shape
    inp, inp2 = cuda.to_device(x_bits), cuda.to_device(y_bits)
    out, mean, rstd = cuda.device_array(shape, np.uint16), cuda.device_array((B, T), np.float32), \
        cuda.device_array((B, T), np.float32)
    layernorm.layernorm_forward(out, mean, rstd, inp, weight, bias)
    out_ref, mean_ref, rstd_ref = reference.layernorm_forward(x, w, b)
    forward_err = relative_error(download(out), out_ref)
    layernorm.residual_forward(out, inp, inp2)
    residual_err = relative_error(download(out), x + y)
    residual = cuda.device_array(shape, np.uint16)
    layernorm.fused_residual_layernorm_forward(residual, out, mean, rstd, inp, inp2, weight, bias)
    fused_err = relative_error(download(out), reference.fused_residual_layernorm_forward(x, y, w, b)[1])
    mean, rstd = cuda.to_device(mean_ref.astype(np.float32)), cuda.to_device(rstd_ref.astype(np.float32))
    dinp, dweight, dbias = cuda.to_device(g_bits), cuda.to_device(w_bits), cuda.to_device(b_bits)
    layernorm.layernorm_backward(dinp, dweight, dbias, scratch, cuda.to_device(g_bits), inp, weight, mean, rstd)
    expected = [g.copy(), w.copy(), b.copy()]
    reference.layernorm_backward(*expected, g, x, w, mean_ref, rstd_ref)
    backward_err = max(relative_error(download(a), e) for a, e in zip([dinp, dweight, dbias], expected))
    errors = [forward_err, residual_err, fused_err, backward_err]
    assert max(errors) < 4e-3, errors

    act = N * C * 2  # bytes of one (B,T,C) bf16 tensor
    n_sets = copies_needed(4 * act)
    xs = [cuda.to_device(x_bits) for _ in range(n_sets)]
    ys = [cuda.to_device(y_bits) for _ in range(n_sets)]
    outs = [cuda.device_array(shape, np.uint16) for _ in range(n_sets)]
    residuals = [cuda.device_array(shape, np.uint16) for _ in range(n_sets)]
    douts = [cuda.to_device(g_bits) for _ in range(n_sets)]
    dinps = [cuda.to_device(g_bits) for _ in range(n_sets)]
    means = [cuda.to_device(mean_ref.astype(np.float32)) for _ in range(n_sets)]
    rstds = [cuda.to_device(rstd_ref.astype(np.float32)) for _ in range(n_sets)]
    copy = copy_bandwidth_gbs()
    stats = 2 * N * 4  # mean and rstd
    params = 2 * C * 2  # weight and bias
    rows = []
    # bytes: each input read once, each output written once (dinp is read and written; the fp32
    # partials in scratch are the backward's own traffic and not counted)
    for name, launch, nbytes, err in [
        ("layernorm_forward", lambda i: layernorm.layernorm_forward(outs[i], means[i], rstds[i], xs[i], weight, bias),
         2 * act + stats + params, forward_err),
        ("layernorm_backward", lambda i: layernorm.layernorm_backward(
            dinps[i], dweight, dbias, scratch, douts[i], xs[i], weight, means[i], rstds[i]),
         4 * act + stats + 5 * C * 2, backward_err),  # weight; dweight, dbias read and written
        ("residual_forward", lambda i: layernorm.residual_forward(outs[i], xs[i], ys[i]), 3 * act, residual_err),
        ("fused_residual_layernorm_forward", lambda i: layernorm.fused_residual_layernorm_forward(
            residuals[i], outs[i], means[i], rstds[i], xs[i], ys[i], weight, bias),
         4 * act + stats + params, fused_err),
    ]:
        ms = time_ms(launch, n_sets)
        gbs = nbytes / ms / 1e6
        rows.append(dict(kernel=name, shape="x".join(map(str, shape)), ms=ms, gbs=gbs, pct=100 * gbs / copy, err=err))
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("LayerNorm", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
