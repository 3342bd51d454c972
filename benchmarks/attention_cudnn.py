"""cuDNN flash attention (llm.c's cudnn_att.cpp path) at GPT-2 124M's shape, against attention.py.

Checks attention_forward_cudnn (out, stats) and attention_backward_cudnn (dinp) against the float64
reference on a few heads, then times them at B=8, T=1024, C=768, NH=12 (and B=64 when the card has
the memory), next to our own path (attention.py's attention_forward / attention_backward, llm.c's
default build) at the same shapes. FLOPs count causal attention as llm.c's dev/cuda does: the
forward's two T x T x HS products per head, half of them masked, 2*2*B*NH*T*T*HS/2; the backward
2.5x that (five products instead of two).

    python benchmarks/attention_cudnn.py
"""

from common import copies_needed, print_table, time_ms

import sys
import time

import numpy as np
from numba import cuda

from nanollm import reference
from nanollm.kernels import attention, attention_cudnn
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

T, C, NH = 1024, 768, 12
HS = C // NH
BATCHES = [8, 64]
POISON = 0xFFFF  # bf16 NaN: unwritten outputs show


def relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def non_finite_bf16(bits):
    return bool(((bits & 0x7F80) == 0x7F80).any())  # exponent all ones: inf or NaN


def head_of(values, b, h, parts):
    """Head h of batch b of a (B, T, parts*C) array as (1, T, parts*HS), in the same layout."""
    return np.concatenate([values[b:b + 1, :, p * C + h * HS:p * C + (h + 1) * HS] for p in range(parts)], axis=-1)


def reference_stats(qkv_head):
    q, k = qkv_head[0, :, :HS], qkv_head[0, :, HS:2 * HS]
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), q @ k.T / np.sqrt(HS), -np.inf)
    top = scores.max(axis=-1)
    return top + np.log(np.exp(scores - top[:, None]).sum(axis=-1))


def check(B, inp_bits, dout_bits):
    """cuDNN forward and backward once on fresh (poisoned) outputs, compared on four heads."""
    inp, dout = cuda.to_device(inp_bits), cuda.to_device(dout_bits)
    out = cuda.to_device(np.full((B, T, C), POISON, np.uint16))
    stats = cuda.to_device(np.full((B, NH, T), np.nan, np.float32))
    dinp = cuda.to_device(np.full((B, T, 3 * C), POISON, np.uint16))
    attention_cudnn.attention_forward_cudnn(out, stats, inp, NH)
    attention_cudnn.attention_backward_cudnn(dinp, dout, inp, out, stats, NH)
    out_bits, stats_host, dinp_bits = out.copy_to_host(), stats.copy_to_host(), dinp.copy_to_host()
    assert not non_finite_bf16(out_bits) and np.isfinite(stats_host).all() and not non_finite_bf16(dinp_bits), \
        "unwritten or non-finite outputs"
    errors = {"out": [[], []], "dinp": [[], []], "stats": 0.0}
    for b, h in [(0, 0), (0, NH - 1), (B - 1, NH // 2), (B - 1, NH - 1)]:
        qkv = head_of(from_bf16_bits(inp_bits[b:b + 1]).astype(np.float64), 0, h, 3)
        dout_h = head_of(from_bf16_bits(dout_bits[b:b + 1]).astype(np.float64), 0, h, 1)
        expected_out, att = reference.attention_forward(qkv, 1)
        errors["out"][0].append(head_of(from_bf16_bits(out_bits[b:b + 1]).astype(np.float64), 0, h, 1))
        errors["out"][1].append(expected_out)
        errors["dinp"][0].append(head_of(from_bf16_bits(dinp_bits[b:b + 1]).astype(np.float64), 0, h, 3))
        errors["dinp"][1].append(reference.attention_backward(dout_h, qkv, att, 1))
        errors["stats"] = max(errors["stats"], float(np.abs(stats_host[b, h] - reference_stats(qkv)).max()))
    forward_err = relative_error(np.concatenate(errors["out"][0]), np.concatenate(errors["out"][1]))
    backward_err = relative_error(np.concatenate(errors["dinp"][0]), np.concatenate(errors["dinp"][1]))
    assert forward_err < 1e-2 and backward_err < 1e-2 and errors["stats"] < 1e-3, \
        (forward_err, backward_err, errors["stats"])
    return forward_err, backward_err, errors["stats"]


def bench(B, rng):
    n = B * T * C
    inp_bits = to_bf16_bits(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    dout_bits = to_bf16_bits(rng.standard_normal((B, T, C)).astype(np.float32))

    start = time.perf_counter()
    ok, why = attention_cudnn.is_available(B, T, NH, HS)  # builds (and caches) both graphs
    build_s = time.perf_counter() - start
    if not ok:
        print(f"cuDNN attention unavailable at B={B}: {why}")
        return None
    forward_err, backward_err, stats_err = check(B, inp_bits, dout_bits)

    # cuDNN: inp read, out + stats written; backward reads inp, out, dout, stats, writes dinp
    cudnn_bytes = (3 * n + n + n + 3 * n) * 2 + B * NH * T * 4
    n_cudnn = copies_needed(cudnn_bytes)
    sets = [dict(inp=cuda.to_device(inp_bits), dout=cuda.to_device(dout_bits),
                 out=cuda.device_array((B, T, C), np.uint16), stats=cuda.device_array((B, NH, T), np.float32),
                 dinp=cuda.device_array((B, T, 3 * C), np.uint16)) for _ in range(n_cudnn)]
    for s in sets:  # valid out and stats for the backward
        attention_cudnn.attention_forward_cudnn(s["out"], s["stats"], s["inp"], NH)
    flops = 2 * 2 * B * NH * T * T * HS / 2
    rows = []

    def row(path, what, ms, flop, err):
        rows.append(dict(path=path, what=what, shape=f"B={B}", ms=ms, tflops=flop / ms / 1e9, err=err))

    fwd = time_ms(lambda i: attention_cudnn.attention_forward_cudnn(sets[i]["out"], sets[i]["stats"], sets[i]["inp"], NH),
                  n_cudnn)
    inference = time_ms(lambda i: attention_cudnn.attention_forward_cudnn(sets[i]["out"], None, sets[i]["inp"], NH),
                        n_cudnn)
    bwd = time_ms(lambda i: attention_cudnn.attention_backward_cudnn(sets[i]["dinp"], sets[i]["dout"], sets[i]["inp"],
                                                                     sets[i]["out"], sets[i]["stats"], NH), n_cudnn)
    # host time of one call (graph lookup, variant pack, cudnnBackendExecute): the launches are
    # asynchronous, so a loop of calls measures only what the CPU spends per call
    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        attention_cudnn.attention_forward_cudnn(sets[0]["out"], sets[0]["stats"], sets[0]["inp"], NH)
        attention_cudnn.attention_backward_cudnn(sets[0]["dinp"], sets[0]["dout"], sets[0]["inp"], sets[0]["out"],
                                                 sets[0]["stats"], NH)
    host_us = (time.perf_counter() - start) / 100 * 1e6
    cuda.synchronize()
    row("cuDNN", "forward", fwd, flops, forward_err)
    row("cuDNN", "forward, inference (no stats)", inference, flops, forward_err)
    row("cuDNN", "backward", bwd, 2.5 * flops, backward_err)
    row("cuDNN", "forward + backward", fwd + bwd, 3.5 * flops, max(forward_err, backward_err))
    sets.clear()  # free the cuDNN buffers before our path allocates

    # our own path (checked in benchmarks/attention.py): (B,NH,T,T) att and datt, permuted copies
    att_bytes = B * NH * T * T * 2
    n_ours = copies_needed(2 * n * 2 + 2 * att_bytes)  # the forward's inp and out, att and datt
    set_bytes = 15 * n * 2 + 2 * att_bytes  # inp, dinp, qkvr, dqkvr (3n each), out, dout, scratch (n each), att, datt
    free, _ = cuda.current_context().get_memory_info()
    if free < 1.2 * n_ours * set_bytes:
        print(f"B={B}: not enough free GPU memory ({free / 2**30:.1f} GiB) for attention.py's buffers "
              f"({n_ours * set_bytes / 2**30:.1f} GiB); skipped")
    else:
        ours = [dict(inp=cuda.to_device(inp_bits), dout=cuda.to_device(dout_bits),
                     out=cuda.device_array((B, T, C), np.uint16), qkvr=cuda.device_array((3, B, NH, T, HS), np.uint16),
                     att=cuda.device_array((B, NH, T, T), np.uint16), scratch=cuda.device_array((B, T, C), np.uint16),
                     dinp=cuda.device_array((B, T, 3 * C), np.uint16),
                     dqkvr=cuda.device_array((3, B, NH, T, HS), np.uint16),
                     datt=cuda.device_array((B, NH, T, T), np.uint16)) for _ in range(n_ours)]
        for s in ours:
            attention.attention_forward(s["out"], s["qkvr"], s["att"], s["scratch"], s["inp"], NH)
        our_fwd = time_ms(lambda i: attention.attention_forward(ours[i]["out"], ours[i]["qkvr"], ours[i]["att"],
                                                                ours[i]["scratch"], ours[i]["inp"], NH),
                          n_ours, per_batch=3)
        our_bwd = time_ms(lambda i: attention.attention_backward(ours[i]["dinp"], ours[i]["dqkvr"], ours[i]["datt"],
                                                                 ours[i]["dout"], ours[i]["qkvr"], ours[i]["att"], NH),
                          n_ours, per_batch=3)
        row("attention.py", "forward", our_fwd, flops, float("nan"))
        row("attention.py", "backward", our_bwd, 2.5 * flops, float("nan"))
        row("attention.py", "forward + backward", our_fwd + our_bwd, 3.5 * flops, float("nan"))
        print(f"B={B}: cuDNN forward + backward is {(our_fwd + our_bwd) / (fwd + bwd):.1f}x faster than attention.py")
        ours.clear()
    print(f"B={B}: graph build (forward + backward) {build_s:.2f} s, cuDNN workspace "
          f"{attention_cudnn.workspace_bytes() / 2**20:.1f} MiB, host time {host_us:.0f} us per call, "
          f"stats max abs. error {stats_err:.1e}")
    return rows


def main():
    ok, why = attention_cudnn.is_available()
    if not ok:
        sys.exit(f"cuDNN attention unavailable: {why}")
    print(f"cuDNN attention: {why}")
    rng = np.random.default_rng(0)
    rows = []
    for B in BATCHES:
        result = bench(B, rng)
        if result is None and B == BATCHES[0]:
            sys.exit(1)
        rows += result or []
    print_table(f"causal attention, T={T}, C={C}, NH={NH}, HS={HS} (FLOPs: forward 2*B*NH*T*T*HS, backward 2.5x)",
                rows, [("path", "path", "{}"), ("what", "pass", "{}"), ("shape", "shape", "{}"), ("ms", "ms", "{:.4f}"),
                       ("tflops", "TFLOP/s", "{:.0f}"), ("err", "rel.err", "{:.1e}")])


if __name__ == "__main__":
    main()
