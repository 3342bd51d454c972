"""GELU forward and backward at GPT-2 124M's fc activation shape (B=8, T=1024, 4C=3072).

    python benchmarks/gelu.py
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import gelu
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

B, T, C4 = 8, 1024, 3072


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def main():
    rng = np.random.default_rng(0)
    shape = (B, T, C4)
    n = B * T * C4
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * 2)
    grad_bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32))
    x = from_bf16_bits(bits).astype(np.float64)
    dout = from_bf16_bits(grad_bits).astype(np.float64)

    # correctness first, at the benchmark's own shape
    inp, out = cuda.to_device(bits), cuda.device_array(shape, np.uint16)
    gelu.gelu_forward(out, inp)
    forward_err = relative_error(from_bf16_bits(out.copy_to_host()), reference.gelu_forward(x))
    grad = cuda.to_device(grad_bits)
    gelu.gelu_backward_inplace(grad, inp)
    backward_err = relative_error(from_bf16_bits(grad.copy_to_host()), reference.gelu_backward(dout, x))
    assert forward_err < 4e-3 and backward_err < 4e-3, (forward_err, backward_err)

    n_sets = copies_needed(2 * n * 2)
    inputs = [cuda.to_device(bits) for _ in range(n_sets)]
    outputs = [cuda.device_array(shape, np.uint16) for _ in range(n_sets)]
    grads = [cuda.to_device(grad_bits) for _ in range(n_sets)]
    copy = copy_bandwidth_gbs()
    rows = []
    # forward reads x, writes out; backward reads x and dout, writes dinp (in place)
    for name, launch, nbytes, err in [
        ("gelu_forward", lambda i: gelu.gelu_forward(outputs[i], inputs[i]), 2 * n * 2, forward_err),
        ("gelu_backward_inplace", lambda i: gelu.gelu_backward_inplace(grads[i], inputs[i]), 3 * n * 2, backward_err),
    ]:
        ms = time_ms(launch, n_sets)
        gbs = nbytes / ms / 1e6
        rows.append(dict(kernel=name, shape="x".join(map(str, shape)), ms=ms, gbs=gbs, pct=100 * gbs / copy, err=err))
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("GELU", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
