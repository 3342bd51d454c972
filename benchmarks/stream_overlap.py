"""Does a weight-gradient product overlap the backward's memory-bound kernels on a second stream?

The backward's weight gradients (dweight += dout^T @ inp) and bias gradients feed nothing later in
the step, so they could run on a side stream while the main stream goes on with the chain of
input gradients (dinp products, layernorm backward, GELU backward, attention). Whether that pays
depends on the GPU running a compute-bound cuBLASLt kernel and a memory-bound Numba kernel at the
same time. This measures it for the backward's pairs at GPT-2 d12 (B=64) and d48 (B=16) shapes:
each kernel alone, the pair one after the other on one stream, and the pair on two streams.
Numbers are ms per pair (10 pairs queued per timing behind a spinning kernel).

    python3 benchmarks/stream_overlap.py [--shapes d12,d48]
"""

import argparse

from common import print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import gelu, layernorm, matmul

SHAPES = {"d12": (64 * 1024, 768), "d48": (16 * 1024, 1600)}


def random_bf16(shape, rng, scale=1.0):
    values = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * scale).view(np.uint32)
    return cuda.to_device((values >> 16).astype(np.uint16).reshape(shape))


def kernels(rows, C, rng):
    """name -> (launch(stream), kind) for one layer's backward pieces at this shape."""
    C4 = 4 * C
    dout4 = random_bf16((rows, C4), rng)
    dout3 = random_bf16((rows, 3 * C), rng)
    inp = random_bf16((rows, C), rng)
    pre = random_bf16((rows, C4), rng)
    dinp = random_bf16((rows, C), rng, 0.01)
    dW4 = random_bf16((C4, C), rng, 0.0)
    dW3 = random_bf16((3 * C, C), rng, 0.0)
    dW4t = random_bf16((C, C4), rng, 0.0)
    out4 = random_bf16((rows, C4), rng)
    ln_w = random_bf16((C,), rng)
    ln_dw, ln_db = random_bf16((C,), rng, 0.0), random_bf16((C,), rng, 0.0)
    mean = cuda.to_device(rng.standard_normal(rows, dtype=np.float32) * 0.1)
    rstd = cuda.to_device(np.abs(rng.standard_normal(rows, dtype=np.float32)) + 0.5)
    ln_scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C), np.float32)
    dbias = random_bf16((C4,), rng, 0.0)
    bias_scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * C4, np.float32)
    return {
        "fc dW (4C x C)": (lambda s: matmul._gemm(dW4, dout4, inp, C4, C, rows, 1, True, False, beta=1.0, stream=s),
                           "matmul"),
        "qkv dW (3C x C)": (lambda s: matmul._gemm(dW3, dout3, inp, 3 * C, C, rows, 1, True, False, beta=1.0,
                                                   stream=s), "matmul"),
        "fcproj dW (C x 4C)": (lambda s: matmul._gemm(dW4t, inp, pre, C, C4, rows, 1, True, False, beta=1.0,
                                                      stream=s), "matmul"),
        "layernorm backward": (lambda s: layernorm.layernorm_backward(dinp, ln_dw, ln_db, ln_scratch, inp, inp, ln_w,
                                                                      mean, rstd, stream=s), "memory"),
        "bias grad (4C)": (lambda s: matmul.matmul_backward_bias(dbias, dout4, bias_scratch, stream=s), "memory"),
        "GELU backward (4C)": (lambda s: gelu.gelu_backward_inplace(out4, pre, stream=s), "memory"),
    }


PAIRS = [("fc dW (4C x C)", "layernorm backward"), ("qkv dW (3C x C)", "layernorm backward"),
         ("fcproj dW (C x 4C)", "GELU backward (4C)"), ("qkv dW (3C x C)", "bias grad (4C)"),
         ("fc dW (4C x C)", "GELU backward (4C)")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="d12,d48")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    main_stream, side_stream = cuda.stream(), cuda.stream()  # blocking streams: ordered with the timing events
    rows_out = []
    for shape in args.shapes.split(","):
        rows, C = SHAPES[shape]
        launches = kernels(rows, C, rng)
        alone = {name: time_ms(lambda i, f=f: f(main_stream)) for name, (f, _) in launches.items()}
        for a, b in PAIRS:
            fa, fb = launches[a][0], launches[b][0]
            serial = time_ms(lambda i: (fa(main_stream), fb(main_stream)))
            overlapped = time_ms(lambda i: (fa(side_stream), fb(main_stream)))
            rows_out.append(dict(shape=shape, pair=f"{a} | {b}", a=alone[a], b=alone[b], serial=serial,
                                 overlapped=overlapped, saved=serial - overlapped))
        del launches
    print_table("A weight-gradient product beside a memory-bound kernel (ms per pair)", rows_out,
                [("shape", "shape", "{}"), ("pair", "pair", "{}"), ("a", "a alone", "{:.4f}"),
                 ("b", "b alone", "{:.4f}"), ("serial", "one stream", "{:.4f}"),
                 ("overlapped", "two streams", "{:.4f}"), ("saved", "saved", "{:+.4f}")])


if __name__ == "__main__":
    main()
