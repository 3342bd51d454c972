"""Attention (llm.c's non-cuDNN path) at GPT-2 124M's shape: B=8, T=1024, C=768, NH=12.

Times attention_forward and attention_backward whole, then each of their kernels on its own
(GB/s against the card's copy bandwidth) and the batched cuBLASLt products (TFLOP/s).

    python benchmarks/attention.py
"""

from common import MEMORY_COLUMNS, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import math

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import attention
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits
from nanollm.kernels.matmul import matmul_batched

B, T, C, NH = 8, 1024, 768, 12
HS = C // NH
CHECKED_BATCH = [0, B - 1]  # the float64 reference runs on two batch elements (heads are independent per b)


def relative_error(actual, expected):
    assert np.isfinite(actual).all(), "non-finite outputs"
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def down(array):
    return from_bf16_bits(array.copy_to_host()).astype(np.float64)


def causal_elements():
    """bf16 elements of the (T, T) attention matrices the softmax kernels read: row t1 reads
    words 0..t1//4, i.e. 4 * (t1//4 + 1) elements."""
    return B * NH * sum(4 * (t // 4 + 1) for t in range(T))


def main():
    rng = np.random.default_rng(0)
    n = B * T * C
    inp_bits = to_bf16_bits(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    dout_bits = to_bf16_bits(rng.standard_normal((B, T, C)).astype(np.float32))

    def buffers():
        return dict(inp=cuda.to_device(inp_bits), out=cuda.device_array((B, T, C), np.uint16),
                    qkvr=cuda.device_array((3, B, NH, T, HS), np.uint16), att=cuda.device_array((B, NH, T, T), np.uint16),
                    scratch=cuda.device_array((B, T, C), np.uint16), dout=cuda.to_device(dout_bits),
                    dinp=cuda.device_array((B, T, 3 * C), np.uint16),
                    dqkvr=cuda.device_array((3, B, NH, T, HS), np.uint16), datt=cuda.device_array((B, NH, T, T), np.uint16))

    # correctness first, at the benchmark's own shape
    s = buffers()
    attention.attention_forward(s["out"], s["qkvr"], s["att"], s["scratch"], s["inp"], NH)
    attention.attention_backward(s["dinp"], s["dqkvr"], s["datt"], s["dout"], s["qkvr"], s["att"], NH)
    inp_ref = from_bf16_bits(inp_bits).astype(np.float64)[CHECKED_BATCH]
    dout_ref = from_bf16_bits(dout_bits).astype(np.float64)[CHECKED_BATCH]
    out_ref, att_ref = reference.attention_forward(inp_ref, NH)
    att = down(s["att"])[CHECKED_BATCH]
    forward_err = max(relative_error(down(s["out"])[CHECKED_BATCH], out_ref), relative_error(att, att_ref))
    backward_err = relative_error(down(s["dinp"])[CHECKED_BATCH], reference.attention_backward(dout_ref, inp_ref, att, NH))
    assert forward_err < 1e-2 and backward_err < 1e-2, (forward_err, backward_err)

    copy = copy_bandwidth_gbs()
    n_sets = copies_needed(2 * 2 * n * 2)  # the permutes' largest in + out, bf16
    sets = [s] + [buffers() for _ in range(n_sets - 1)]

    # whole launchers; few launches per timed batch: one call queues ~15 launches of host work
    fwd_ms = time_ms(lambda i: attention.attention_forward(sets[i]["out"], sets[i]["qkvr"], sets[i]["att"],
                                                           sets[i]["scratch"], sets[i]["inp"], NH), n_sets, per_batch=3)
    bwd_ms = time_ms(lambda i: attention.attention_backward(sets[i]["dinp"], sets[i]["dqkvr"], sets[i]["datt"],
                                                            sets[i]["dout"], sets[i]["qkvr"], sets[i]["att"], NH),
                     n_sets, per_batch=3)

    # each kernel alone, launched as the launchers launch them
    HS4, n_words, rows = HS // 4, n // 4, B * NH * T
    permute_grid, permute_block = attention._permute_grid(B, T, NH, HS4)
    softmax_grid, softmax_block = attention._softmax_grid(rows)
    scale = np.float32(1.0 / math.sqrt(HS))
    w = [{key: attention._words(value) for key, value in st.items()} for st in sets]

    def thirds(words):
        return words[:n_words], words[n_words:2 * n_words], words[2 * n_words:]

    # sliced once here: slicing a device array costs the host tens of microseconds, which must not
    # ride along in the timed launches
    qkvr_thirds = [thirds(wi["qkvr"]) for wi in w]
    dqkvr_thirds = [thirds(wi["dqkvr"]) for wi in w]

    causal_bytes = causal_elements() * 2
    full_bytes = rows * T * 2
    kernels = [
        ("permute", lambda i: attention.permute_kernel[permute_grid, permute_block](*qkvr_thirds[i], w[i]["inp"], T, NH, HS4),
         2 * 3 * n * 2, n_sets),
        ("softmax_forward (in place)", lambda i: attention.softmax_forward_kernel[softmax_grid, softmax_block](
            w[0]["att"], w[0]["att"], rows, T // 4, scale), causal_bytes + full_bytes, 1),
        ("unpermute", lambda i: attention.unpermute_kernel[permute_grid, permute_block](w[i]["out"], w[i]["scratch"], T, NH, HS4),
         2 * n * 2, n_sets),
        ("unpermute_backward", lambda i: attention.unpermute_backward_kernel[permute_grid, permute_block](
            dqkvr_thirds[i][0], w[i]["dout"], T, NH, HS4), 2 * n * 2, n_sets),
        ("softmax_backward (in place)", lambda i: attention.softmax_backward_kernel[softmax_grid, softmax_block](
            w[0]["datt"], w[0]["datt"], w[0]["att"], rows, T // 4, scale), 2 * causal_bytes + full_bytes, 1),
        ("permute_backward", lambda i: attention.permute_backward_kernel[permute_grid, permute_block](
            w[i]["dinp"], *dqkvr_thirds[i], T, NH, HS4), 2 * 3 * n * 2, n_sets),
    ]
    memory_rows = []
    for name, launch, nbytes, k_sets in kernels:
        ms = time_ms(launch, k_sets)
        gbs = nbytes / ms / 1e6
        memory_rows.append(dict(kernel=name, shape=f"{B}x{NH}x{T}x{HS}", ms=ms, gbs=gbs, pct=100 * gbs / copy,
                                err=forward_err if "backward" not in name else backward_err))
    # the softmax forward at this point has turned att into softmax(softmax(...)): harmless for timing,
    # but the products below only need valid bf16 values

    heads = [dict(q=st["qkvr"].reshape(3, B * NH, T, HS)[0], k=st["qkvr"].reshape(3, B * NH, T, HS)[1],
                  v=st["qkvr"].reshape(3, B * NH, T, HS)[2], att=st["att"].reshape(B * NH, T, T),
                  datt=st["datt"].reshape(B * NH, T, T), vaccum=st["scratch"].reshape(B * NH, T, HS),
                  dq=st["dqkvr"].reshape(3, B * NH, T, HS)[0], dk=st["dqkvr"].reshape(3, B * NH, T, HS)[1],
                  dv=st["dqkvr"].reshape(3, B * NH, T, HS)[2]) for st in sets]
    flops = 2 * B * NH * T * T * HS
    products = [
        ("preatt = q @ k^T", lambda h: matmul_batched(h["att"], h["q"], h["k"], transb=True)),
        ("out_h = att @ v", lambda h: matmul_batched(h["vaccum"], h["att"], h["v"])),
        ("datt = dout_h @ v^T", lambda h: matmul_batched(h["datt"], h["dq"], h["v"], transb=True)),
        ("dv = att^T @ dout_h", lambda h: matmul_batched(h["dv"], h["att"], h["dq"], transa=True)),
        ("dq = dpreatt @ k", lambda h: matmul_batched(h["dq"], h["datt"], h["k"])),
        ("dk = dpreatt^T @ q", lambda h: matmul_batched(h["dk"], h["datt"], h["q"], transa=True)),
    ]
    product_rows = []
    for name, launch in products:
        ms = time_ms(lambda i: launch(heads[i]), n_sets)
        product_rows.append(dict(product=name, shape=f"{B * NH} x {T}x{T}x{HS}", ms=ms, tflops=flops / ms / 1e9))

    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print(f"attention_forward {fwd_ms:.3f} ms, attention_backward {bwd_ms:.3f} ms, "
          f"forward + backward {fwd_ms + bwd_ms:.3f} ms (B={B}, T={T}, C={C}, NH={NH}); "
          f"rel. errors forward {forward_err:.1e}, backward {backward_err:.1e}")
    print_table("attention kernels (bytes: each input read once, each output written once; softmax reads only "
                "the causal words)", memory_rows, MEMORY_COLUMNS)
    print_table("attention's batched cuBLASLt products", product_rows,
                [("product", "product", "{}"), ("shape", "shape", "{}"), ("ms", "ms", "{:.4f}"),
                 ("tflops", "TFLOP/s", "{:.0f}")])


if __name__ == "__main__":
    main()
