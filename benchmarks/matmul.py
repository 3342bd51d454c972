"""cuBLASLt matmuls at GPT-2 124M's shapes (B=8, T=1024, C=768, Vp=50304), forward and backward.

Each nanollm call is timed against the same cuBLASLt call issued directly (descriptors, layouts
and the heuristic's algorithm built here beforehand, llm.c's way; the timed loop only calls
cublasLtMatmul), and against PyTorch on the same GPU when torch with CUDA is importable. The
target: nanollm within 5% of the direct call.

    python benchmarks/matmul.py
"""

from common import bf16_bits, copies_needed, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda
from nvmath.bindings import cublasLt

from nanollm import reference
from nanollm.kernels import matmul
from nanollm.kernels.bf16 import from_bf16_bits

B, T, C, Vp = 8, 1024, 768, 50304
ROWS = B * T
# name, C_in, OC, bias, GELU epilogue in the forward, DGELU in the backward (fcproj's input is gelu(fc))
LAYERS = [
    ("qkv", C, 3 * C, True, False, False),
    ("attproj", C, C, True, False, False),
    ("fc", C, 4 * C, True, True, False),
    ("fcproj", 4 * C, C, True, False, True),
    ("lm head", C, Vp, False, False, False),
]
CHECKED_ROWS = 256  # rows of the output compared with the float64 reference (all are checked for NaN)


def relative_error(actual, expected):
    assert np.isfinite(actual).all(), "non-finite outputs"
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def as_float(bits):
    return from_bf16_bits(bits).astype(np.float64)


def pointer(array):
    return array.__cuda_array_interface__["data"][0]


class DirectMatmul:
    """One cuBLASLt product, set up once exactly as llm.c's matmul_cublaslt does (column-major
    m, n, k; weight as A); calling it is a bare cublasLtMatmul."""

    def __init__(self, handle, workspace, m, n, k, transa, transb, d, a, b, epilogue=matmul.Epilogue.DEFAULT,
                 bias=None, aux=None, beta=0.0):
        self.handle, self.workspace = handle, workspace
        self.desc = cublasLt.matmul_desc_create(matmul.CUBLAS_COMPUTE_32F, matmul.CUDA_R_32F)
        attr = cublasLt.MatmulDescAttribute
        self._set(attr.TRANSA, np.int32(matmul.CUBLAS_OP_T if transa else matmul.CUBLAS_OP_N))
        self._set(attr.TRANSB, np.int32(matmul.CUBLAS_OP_T if transb else matmul.CUBLAS_OP_N))
        self._set(attr.EPILOGUE, np.uint32(epilogue))
        if bias is not None:
            self._set(attr.BIAS_DATA_TYPE, np.int32(matmul.CUDA_R_16BF))
            self._set(attr.BIAS_POINTER, np.int64(pointer(bias)))
        if aux is not None:
            self._set(attr.EPILOGUE_AUX_LD, np.int64(m))
            self._set(attr.EPILOGUE_AUX_POINTER, np.int64(pointer(aux)))
        bf16 = matmul.CUDA_R_16BF
        self.a_layout = cublasLt.matrix_layout_create(bf16, k, m, k) if transa else cublasLt.matrix_layout_create(bf16, m, k, m)
        self.b_layout = cublasLt.matrix_layout_create(bf16, n, k, n) if transb else cublasLt.matrix_layout_create(bf16, k, n, k)
        self.d_layout = cublasLt.matrix_layout_create(bf16, m, n, m)
        preference = cublasLt.matmul_preference_create()
        size = np.array([matmul.WORKSPACE_BYTES], dtype=np.uint64)
        cublasLt.matmul_preference_set_attribute(preference, cublasLt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES,
                                                 size.ctypes.data, size.nbytes)
        self.heuristic = cublasLt.MatmulHeuristicResult()
        found = np.zeros(1, dtype=np.int32)
        cublasLt.matmul_algo_get_heuristic(handle, self.desc, self.a_layout, self.b_layout, self.d_layout,
                                           self.d_layout, preference, 1, self.heuristic.ptr, found.ctypes.data)
        cublasLt.matmul_preference_destroy(preference)
        assert found[0] == 1, f"direct: no cuBLASLt algorithm for m={m} n={n} k={k} epilogue {epilogue}"
        self.alpha = np.ones(1, dtype=np.float32)
        self.beta = np.array([beta], dtype=np.float32)
        self.args = (self.alpha.ctypes.data, pointer(a), self.a_layout, pointer(b), self.b_layout, self.beta.ctypes.data,
                     pointer(d), self.d_layout, pointer(d), self.d_layout, self.heuristic.ptr, pointer(workspace),
                     matmul.WORKSPACE_BYTES, 0)

    def _set(self, attribute, value):
        value = np.asarray(value)
        cublasLt.matmul_desc_set_attribute(self.desc, attribute, value.ctypes.data, value.nbytes)

    def __call__(self):
        cublasLt.matmul(self.handle, self.desc, *self.args)


def try_torch():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def check_layer(rng, name, C_in, OC, bias, gelu, dgelu, s):
    """nanollm against the float64 reference on a sample of rows; returns the largest rel. error."""
    def down(array):
        return as_float(array.copy_to_host())

    inp, weight = down(s["inp"]), down(s["weight"])
    b = down(s["bias"]) if bias else None
    rows = np.sort(rng.choice(ROWS, size=CHECKED_ROWS, replace=False))
    matmul.matmul_forward(s["out"], s["inp"], s["weight"], s["bias"], s["pre_gelu"])
    expected = reference.matmul_forward(inp[rows], weight, b)
    errors = []
    if gelu:
        errors.append(relative_error(down(s["pre_gelu"])[rows], expected))
        expected = reference.gelu_forward(expected)
    errors.append(relative_error(down(s["out"])[rows], expected))

    dweight_before, dbias_before = down(s["dweight"]), down(s["dbias"]) if bias else None
    matmul.matmul_backward(s["dinp"], s["dweight"], s["dbias"], s["dout"], s["inp"], s["weight"], s["dgelu_pre"])
    dout = down(s["dout"])
    expected_dinp = dout[rows] @ weight
    if dgelu:
        expected_dinp = reference.gelu_backward(expected_dinp, down(s["dgelu_pre"])[rows])
    errors.append(relative_error(down(s["dinp"])[rows], expected_dinp))
    oc_rows = np.sort(rng.choice(OC, size=min(OC, CHECKED_ROWS), replace=False))
    errors.append(relative_error(down(s["dweight"])[oc_rows], dweight_before[oc_rows] + dout[:, oc_rows].T @ inp))
    if bias:
        errors.append(relative_error(down(s["dbias"]), dbias_before + dout.sum(axis=0)))
    worst = max(errors)
    assert worst < 4e-3, f"{name}: rel. errors {errors} (forward, [pre_gelu], dinp, dweight, [dbias])"
    return worst


def main():
    rng = np.random.default_rng(0)
    torch = try_torch()
    handle = matmul._cublaslt_handle()
    workspace = cuda.device_array(matmul.WORKSPACE_BYTES, dtype=np.uint8)
    copy = copy_bandwidth_gbs()
    rows, bias_rows = [], []
    for name, C_in, OC, bias, gelu, dgelu in LAYERS:
        flops = 2 * ROWS * C_in * OC
        n_sets = copies_needed(2 * (ROWS * C_in + OC * C_in + ROWS * OC))
        host = dict(inp=bf16_bits(rng, (ROWS, C_in)), weight=bf16_bits(rng, (OC, C_in), 1 / np.sqrt(C_in)),
                    bias=bf16_bits(rng, (OC,), 0.5), dout=bf16_bits(rng, (ROWS, OC)),
                    dgelu_pre=bf16_bits(rng, (ROWS, C_in), 2.0), dweight=np.zeros((OC, C_in), np.uint16),
                    dbias=np.zeros(OC, np.uint16))
        sets = []
        for _ in range(n_sets):
            s = {key: cuda.to_device(value) for key, value in host.items()}
            s["out"] = cuda.device_array((ROWS, OC), np.uint16)
            s["pre_gelu"] = cuda.device_array((ROWS, OC), np.uint16) if gelu else None
            s["dinp"] = cuda.device_array((ROWS, C_in), np.uint16)
            if not bias:
                s["bias"] = s["dbias"] = None
            if not dgelu:
                s["dgelu_pre"] = None
            sets.append(s)
        err = check_layer(rng, name, C_in, OC, bias, gelu, dgelu, sets[0])

        # the same products, issued directly (llm.c's argument order: weight first)
        fwd_epilogue = (matmul.Epilogue.GELU_AUX_BIAS if gelu else matmul.Epilogue.BIAS) if bias else matmul.Epilogue.DEFAULT
        direct_fwd, direct_bwd = [], []
        for s in sets:
            direct_fwd.append(DirectMatmul(handle, workspace, OC, ROWS, C_in, True, False, s["out"], s["weight"], s["inp"],
                                           fwd_epilogue, s["bias"], s["pre_gelu"]))
            dinp = DirectMatmul(handle, workspace, C_in, ROWS, OC, False, False, s["dinp"], s["weight"], s["dout"],
                                matmul.Epilogue.DGELU if dgelu else matmul.Epilogue.DEFAULT, aux=s["dgelu_pre"])
            dweight = DirectMatmul(handle, workspace, C_in, OC, ROWS, False, True, s["dweight"], s["inp"], s["dout"],
                                   beta=1.0)
            direct_bwd.append((dinp, dweight))

        def nano_fwd(i):
            s = sets[i]
            matmul.matmul_forward(s["out"], s["inp"], s["weight"], s["bias"], s["pre_gelu"])

        def nano_bwd(i):  # the two products; the bias gradient is timed on its own below
            s = sets[i]
            matmul.matmul_backward(s["dinp"], s["dweight"], None, s["dout"], s["inp"], s["weight"], s["dgelu_pre"])

        def direct_backward(i):
            direct_bwd[i][0]()
            direct_bwd[i][1]()

        timings = {
            "forward": (time_ms(nano_fwd, n_sets), time_ms(lambda i: direct_fwd[i](), n_sets), flops),
            "backward": (time_ms(nano_bwd, n_sets), time_ms(direct_backward, n_sets), 2 * flops),
        }
        torch_ms = time_torch(torch, host, C_in, OC, bias, gelu, dgelu, n_sets) if torch else {}
        for direction, (nano_ms, direct_ms, n_flops) in timings.items():
            label = direction + (" +gelu" if gelu and direction == "forward" else "") + \
                (" +dgelu" if dgelu and direction == "backward" else "")
            t_ms = torch_ms.get(direction, float("nan"))
            rows.append(dict(layer=name, op=label, shape=f"{ROWS}x{C_in}->{OC}", ms=nano_ms,
                             tflops=n_flops / nano_ms / 1e9, direct_ms=direct_ms, pct=100 * direct_ms / nano_ms,
                             torch_ms=t_ms, torch_pct=100 * t_ms / nano_ms, err=err))
        if bias:
            ms = time_ms(lambda i: matmul.matmul_backward_bias(sets[i]["dbias"], sets[i]["dout"]), n_sets)
            gbs = (ROWS * OC * 2 + 2 * OC * 2) / ms / 1e6  # dout read once, dbias read and written
            bias_rows.append(dict(kernel="matmul_backward_bias", shape=f"{ROWS}x{OC}", ms=ms, gbs=gbs,
                                  pct=100 * gbs / copy, err=err))

    # the bias gradient at the model's training batch, B=64 (B*T = 65536 rows)
    big_rows = 64 * T
    for OC in (C, 3 * C, 4 * C):
        dout_bits = bf16_bits(rng, (big_rows, OC))
        expected = from_bf16_bits(dout_bits).sum(axis=0, dtype=np.float64)
        n_sets = copies_needed(big_rows * OC * 2)
        douts = [cuda.to_device(dout_bits) for _ in range(n_sets)]
        dbias = cuda.to_device(np.zeros(OC, np.uint16))
        matmul.matmul_backward_bias(dbias, douts[0])
        err = relative_error(as_float(dbias.copy_to_host()), expected)
        assert err < 4e-3, f"bias gradient {big_rows}x{OC}: rel. error {err:.1e}"
        ms = time_ms(lambda i: matmul.matmul_backward_bias(dbias, douts[i]), n_sets)
        gbs = (big_rows * OC * 2 + 2 * OC * 2) / ms / 1e6
        bias_rows.append(dict(kernel="matmul_backward_bias", shape=f"{big_rows}x{OC}", ms=ms, gbs=gbs,
                              pct=100 * gbs / copy, err=err))

    print(f"copy bandwidth (read + write): {copy:.0f} GB/s; torch: {'yes' if torch else 'not available'}")
    print_table("cuBLASLt matmuls, GPT-2 124M (B=8, T=1024); backward = dinp + dweight products; "
                "'% direct' = direct ms / nanollm ms (target >= 95%), '% torch' likewise", rows,
                [("layer", "layer", "{}"), ("op", "op", "{}"), ("shape", "shape", "{}"), ("ms", "ms", "{:.4f}"),
                 ("tflops", "TFLOP/s", "{:.0f}"), ("direct_ms", "direct ms", "{:.4f}"), ("pct", "% direct", "{:.1f}%"),
                 ("torch_ms", "torch ms", "{:.4f}"), ("torch_pct", "% torch", "{:.0f}%"), ("err", "rel.err", "{:.1e}")])
    print_table("bias gradient (column sums, fp32, deterministic)", bias_rows,
                [("kernel", "kernel", "{}"), ("shape", "shape", "{}"), ("ms", "ms", "{:.4f}"), ("gbs", "GB/s", "{:.0f}"),
                 ("pct", "% of copy", "{:.0f}%"), ("err", "rel.err", "{:.1e}")])
    slow = [r for r in rows if r["pct"] < 95]
    if slow:
        print("\nslower than 95% of the direct call: " + ", ".join(f"{r['layer']} {r['op']} ({r['pct']:.1f}%)" for r in slow))


def time_torch(torch, host, C_in, OC, bias, gelu, dgelu, n_sets):
    """The same products through PyTorch (cuBLAS(Lt) underneath): addmm / _addmm_activation for the
    forward, matmul + addmm_ (accumulating) for the backward."""
    def to_torch(bits):
        return torch.from_numpy(from_bf16_bits(bits)).to(device="cuda", dtype=torch.bfloat16)

    sets = []
    for _ in range(n_sets):
        sets.append({key: to_torch(host[key]) for key in ("inp", "weight", "bias", "dout", "dgelu_pre", "dweight")})

    def forward(i):
        s = sets[i]
        if gelu:
            torch._addmm_activation(s["bias"], s["inp"], s["weight"].t(), use_gelu=True)
        elif bias:
            torch.addmm(s["bias"], s["inp"], s["weight"].t())
        else:
            torch.matmul(s["inp"], s["weight"].t())

    def backward(i):
        s = sets[i]
        dinp = torch.matmul(s["dout"], s["weight"])
        if dgelu:
            dinp = torch.ops.aten.gelu_backward(dinp, s["dgelu_pre"], approximate="tanh")
        s["dweight"].addmm_(s["dout"].t(), s["inp"])

    result = {"forward": time_ms(forward, n_sets), "backward": time_ms(backward, n_sets)}
    torch.cuda.synchronize()
    return result


if __name__ == "__main__":
    main()
