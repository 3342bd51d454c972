"""cuBLASLt algorithms at the training step's shapes: the heuristic's first choice (llm.c's) against
the best of its top candidates (what nanollm.kernels.matmul_tuning picks), per product, forward and
backward; and the fc forward with cuBLASLt's GELU_AUX_BIAS epilogue against a BIAS matmul followed
by nanollm's GELU kernel (the unfused forward the issue asks about).

    python benchmarks/matmul_tuning.py                 # d12 at B=64 and d48 at B=16, T=1024

Each candidate's output is compared with the heuristic's (the same product summed in another
order: bf16-rounding-sized differences), then every candidate is timed with benchmarks/common's
harness (launches queued behind a spinning kernel, median). "step ms" weighs each product by how
often a training step runs it (per layer x L, the lm head once), so the last lines say what the
tuned choice and the unfused fc forward would save per step, before any other cost.
"""

from common import print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.config import from_descriptor
from nanollm.kernels import gelu, matmul, matmul_tuning
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

SETTINGS = [("d12", 64), ("d48", 16)]  # model, B (T = 1024): llm.c's settings for each
T = 1024


def random_device(rng, shape, scale, pattern=1 << 22):
    """A device bf16 array of random values (a random block tiled, so the host draws little)."""
    size = int(np.prod(shape))
    block = to_bf16_bits(rng.standard_normal(min(size, pattern)).astype(np.float32) * np.float32(scale))
    out = cuda.device_array(size, dtype=np.uint16)
    source = cuda.to_device(block)
    for start in range(0, size, block.size):
        stop = min(size, start + block.size)
        out[start:stop].copy_to_device(source[:stop - start])
    return out.reshape(shape)


def sample(device_array, count=1 << 20):
    return from_bf16_bits(device_array.reshape(device_array.size)[:count].copy_to_host()).astype(np.float64)


def products(config, B):
    """(name, calls per step, launch, output): every cuBLASLt product of a training step at (B, T)."""
    rng = np.random.default_rng(0)
    C, Vp, L = config.channels, config.padded_vocab_size, config.num_layers
    rows = B * T
    listed = []
    for name, c_in, oc, bias, gelu_in in [("qkv", C, 3 * C, True, False), ("attproj", C, C, True, False),
                                          ("fc", C, 4 * C, True, False), ("fcproj", 4 * C, C, True, True),
                                          ("lm head", C, Vp, False, False)]:
        calls = 1 if name == "lm head" else L
        inp = random_device(rng, (rows, c_in), 1.0)
        weight = random_device(rng, (oc, c_in), 0.02)
        b = random_device(rng, (oc,), 0.02) if bias else None
        out = cuda.device_array((rows, oc), dtype=np.uint16)
        if name == "fc":  # the fused GELU forward, as the model runs it
            pre = cuda.device_array((rows, oc), dtype=np.uint16)
            listed.append((f"{name} forward + GELU_AUX_BIAS", calls,
                           lambda out=out, inp=inp, w=weight, b=b, pre=pre: matmul.matmul_forward(out, inp, w, b, pre),
                           out))
            listed.append((f"{name} forward, BIAS only", calls,
                           lambda out=pre, inp=inp, w=weight, b=b: matmul.matmul_forward(out, inp, w, b), pre))
        else:
            listed.append((f"{name} forward", calls,
                           lambda out=out, inp=inp, w=weight, b=b: matmul.matmul_forward(out, inp, w, b), out))
        dout = random_device(rng, (rows, oc), 1.0)
        dinp = cuda.device_array((rows, c_in), dtype=np.uint16)
        pre_gelu = random_device(rng, (rows, c_in), 1.0) if gelu_in else None
        epilogue = matmul.Epilogue.DGELU if gelu_in else matmul.Epilogue.DEFAULT
        listed.append((f"{name} dinp{' + DGELU' if gelu_in else ''}", calls,
                       lambda d=dinp, g=dout, w=weight, e=epilogue, p=pre_gelu, r=rows, c=c_in, o=oc:
                       matmul._gemm(d, g, w, r, c, o, 1, False, False, e, aux=p), dinp))
        dweight = random_device(rng, (oc, c_in), 0.01)
        listed.append((f"{name} dweight (+=)", calls,
                       lambda d=dweight, g=dout, x=inp, r=rows, c=c_in, o=oc:
                       matmul._gemm(d, g, x, o, c, r, 1, True, False, beta=1.0), dweight))
    return listed


def main():
    matmul_tuning.ENABLED = True
    matmul_tuning.choose = lambda *args, **kwargs: None  # plans keep all candidates; this script times them
    rows_out = []
    for model, B in SETTINGS:
        config = from_descriptor(model)
        listed = products(config, B)
        step_heuristic = step_best = 0.0
        fc = {}
        for name, calls, launch, out in listed:
            before = set(matmul._plans)
            launch()  # builds the plan with the heuristic's candidates
            cuda.synchronize()
            new = [key for key in matmul._plans if key not in before]
            if len(new) != 1:
                print(f"{model} {name}: shares its plan with an earlier product; not timed again")
                continue
            plan = matmul._plans[new[0]]
            launch()
            reference = sample(out)
            times, errors = [], []
            for candidate in range(plan.found):
                plan.use(candidate)
                launch()
                cuda.synchronize()
                got = sample(out)
                errors.append(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30))
                times.append(time_ms(lambda i: launch(), warmup=2, repeat=7, per_batch=3))
            plan.use(0)
            best = int(np.argmin(times))
            chosen = best if times[best] < (1 - matmul_tuning.MARGIN) * times[0] else 0
            if max(errors) > 2e-2 and "+=" not in name:
                print(f"warning: {model} {name}: a candidate differs from the heuristic's output by {max(errors):.1e}")
            step_heuristic += calls * times[0]
            step_best += calls * times[chosen]
            rows_out.append(dict(model=f"{model} B={B}", product=name, candidates=plan.found, heuristic=times[0],
                                 best=times[chosen], index=chosen, gain=100 * (1 - times[chosen] / times[0]),
                                 step=calls * (times[0] - times[chosen])))
            if name.startswith("fc forward"):
                fc[name] = (times[0], times[chosen], calls)
        # the unfused fc forward: BIAS product + nanollm's GELU kernel, against the fused epilogue
        config_rows = B * T
        pre = cuda.device_array((config_rows, 4 * config.channels), dtype=np.uint16)
        pre.copy_to_device(random_device(np.random.default_rng(1), pre.shape, 1.0))
        activated = cuda.device_array_like(pre)
        gelu_ms = time_ms(lambda i: gelu.gelu_forward(activated, pre), warmup=2, repeat=7, per_batch=3)
        fused = fc["fc forward + GELU_AUX_BIAS"]
        bias_only = fc["fc forward, BIAS only"]
        for label, fused_ms, unfused_ms in (("heuristic", fused[0], bias_only[0] + gelu_ms),
                                            ("tuned", fused[1], bias_only[1] + gelu_ms)):
            print(f"{model} B={B} fc forward ({label} algorithms): fused GELU_AUX_BIAS {fused_ms:.4f} ms, "
                  f"BIAS + gelu_forward {unfused_ms:.4f} ms ({gelu_ms:.4f} of it GELU) -> per step "
                  f"{fused[2] * (fused_ms - unfused_ms):+.2f} ms if unfused")
        print(f"{model} B={B}: cuBLASLt products per step {step_heuristic:.2f} ms with the heuristic's first "
              f"choice, {step_best:.2f} ms tuned ({step_heuristic - step_best:.2f} ms saved; the fc forward "
              f"counted both ways, fused and BIAS-only)")
        matmul._plans.clear()
    print_table("cuBLASLt: heuristic's first choice vs the best of its top candidates (ms per call; step: ms "
                "saved per training step)", rows_out,
                [("model", "model", "{}"), ("product", "product", "{}"), ("candidates", "cand.", "{}"),
                 ("heuristic", "heuristic ms", "{:.4f}"), ("best", "tuned ms", "{:.4f}"), ("index", "pick", "{}"),
                 ("gain", "gain", "{:.1f}%"), ("step", "step ms", "{:.2f}")])


if __name__ == "__main__":
    main()
