"""Encoder forward and backward at GPT-2 124M's shape (B=8, T=1024, C=768, Vp=50304).

The backward's two kernels are timed apart, with the buckets built beforehand: encoder_backward
itself builds them on the CPU and copies them to the GPU each call (timed separately, wall clock).
Tokens are drawn uniformly and from a Zipf law (skewed like text: a few huge buckets).

    python benchmarks/encoder.py
"""

import time

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import encoder
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits
from nanollm.kernels.cuda_common import WARP_SIZE, ceil_div

B, T, C, V, Vp, maxT = 8, 1024, 768, 50257, 50304, 1024


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def bf16(rng, shape):
    bits = to_bf16_bits(rng.standard_normal(shape).astype(np.float32))
    return bits, from_bf16_bits(bits).astype(np.float64)


def download(array):
    return from_bf16_bits(array.copy_to_host()).astype(np.float64)


def main():
    rng = np.random.default_rng(0)
    token_sets = {"uniform": rng.integers(0, V, size=(B, T)).astype(np.int32),
                  "zipf": ((rng.zipf(1.1, size=(B, T)) - 1) % V).astype(np.int32)}
    wte_bits, wte_ref = bf16(rng, (Vp, C))
    wpe_bits, wpe_ref = bf16(rng, (maxT, C))
    dout_bits, dout_ref = bf16(rng, (B, T, C))
    wte, wpe, dout = cuda.to_device(wte_bits), cuda.to_device(wpe_bits), cuda.to_device(dout_bits)

    # correctness first, at the benchmark's own shape
    tokens = token_sets["zipf"]
    out = cuda.device_array((B, T, C), np.uint16)
    encoder.encoder_forward(out, cuda.to_device(tokens), wte, wpe)
    forward_err = relative_error(download(out), reference.encoder_forward(tokens, wte_ref, wpe_ref))
    dwte, dwpe = cuda.to_device(wte_bits), cuda.to_device(wpe_bits)
    encoder.encoder_backward(dwte, dwpe, dout, tokens)
    expected = wte_ref.copy(), wpe_ref.copy()
    reference.encoder_backward(*expected, dout_ref, tokens)
    backward_err = max(relative_error(download(a), e) for a, e in zip([dwte, dwpe], expected))
    assert forward_err < 4e-3 and backward_err < 4e-3, (forward_err, backward_err)

    act = B * T * C * 2
    n_sets = copies_needed(2 * act)
    outs = [cuda.device_array((B, T, C), np.uint16) for _ in range(n_sets)]
    douts = [cuda.to_device(dout_bits) for _ in range(n_sets)]
    copy = copy_bandwidth_gbs()
    C4, words = C // 4, (lambda a: a.reshape(a.size).view(np.uint64))
    dwte_words, dwpe_words = words(dwte), words(dwpe)
    rows = []

    def add_row(name, launch, nbytes, err):
        ms = time_ms(launch, n_sets)
        gbs = nbytes / ms / 1e6
        rows.append(dict(kernel=name, shape=f"{B}x{T}x{C}", ms=ms, gbs=gbs, pct=100 * gbs / copy, err=err))

    # bytes: each input read once, each output written once; wte counts the B*T rows gathered
    for dist, tokens in token_sets.items():
        device_tokens = cuda.to_device(tokens)
        add_row(f"encoder_forward ({dist})", lambda i: encoder.encoder_forward(outs[i], device_tokens, wte, wpe),
                2 * act + T * C * 2 + B * T * 4, forward_err)
    # wpe: dout read, dwpe[:T] read and written
    add_row("wpe_backward_kernel", lambda i: encoder.wpe_backward_kernel[ceil_div(T * C4, 256), 256](
        dwpe_words, words(douts[i]), B, T * C4), act + 2 * T * C * 2, backward_err)
    host_ms = {}
    warps = encoder.WTE_BACKWARD_WARPS
    for dist, tokens in token_sets.items():
        buckets, positions = encoder.encoder_backward_buckets(tokens)
        start = time.perf_counter()
        for _ in range(20):
            encoder.encoder_backward_buckets(tokens)
        host_ms[dist] = (time.perf_counter() - start) / 20 * 1e3
        device_buckets, device_positions = cuda.to_device(buckets.reshape(-1)), cuda.to_device(positions)
        grid = (buckets.shape[0], ceil_div(C4, WARP_SIZE))
        # dout read, the rows of the tokens present read and written, the buckets read
        nbytes = act + 2 * buckets.shape[0] * C * 2 + positions.nbytes + buckets.nbytes
        add_row(f"wte_backward_kernel ({dist}, largest bucket {buckets[0, 1]})",
                lambda i: encoder.wte_backward_kernel[grid, (WARP_SIZE, warps), 0, warps * 4 * WARP_SIZE * 4](
                    dwte_words, words(douts[i]), device_buckets, device_positions, C4),
                nbytes, backward_err)
    # the whole launcher, host bucketing and copy included (wall clock, synchronised)
    scratch = cuda.device_array(encoder.encoder_backward_scratch_size(B, T), np.int32)
    for dist, tokens in token_sets.items():
        encoder.encoder_backward(dwte, dwpe, dout, tokens, scratch=scratch)
        cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            encoder.encoder_backward(dwte, dwpe, dout, tokens, scratch=scratch)
        cuda.synchronize()
        wall = (time.perf_counter() - start) / 20 * 1e3
        print(f"encoder_backward ({dist}): host bucketing {host_ms[dist]:.3f} ms, whole call {wall:.3f} ms wall")
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table("Encoder", rows, MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
