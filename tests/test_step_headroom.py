"""benchmarks/step_headroom.py's grouping and ncu CSV parsing, on rows in the shape `ncu --csv --page raw
--print-units base` prints (the GPU run itself is for a GPU job)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("step_headroom",
                                               Path(__file__).parent.parent / "benchmarks/step_headroom.py")
step_headroom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_headroom)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"')
UNITS = '"","","","","","","","","","","","byte","byte","nsecond"'


def row(i, name, read, write, ns):
    return f'"{i}","77","python3","localhost","{name}","1","13","(256, 1, 1)","(132, 1, 1)","0","9.0","{read}","{write}","{ns}"'


LN_MANGLED = "_ZN7nanollm7kernels9layernorm25layernorm_backward_kernelB2v1B104cw51cXTLSUwv1sDUaKthqaNgoKmjgMVuW1AiA8rAEg2Uj0iEsMB"


def test_kernel_group_names_ours_and_pools_the_libraries():
    assert step_headroom.kernel_group(LN_MANGLED) == "layernorm_backward_kernel"
    assert step_headroom.kernel_group(
        "nanollm::kernels::adamw::adamw_multi_tensor_kernel[abi:v1][abi:cw51c](Array<float, 1>)") \
        == "adamw_multi_tensor_kernel"
    assert step_headroom.kernel_group(  # as ncu 2025.3 prints them
        "layernorm::layernorm_forward_prefetch_kernel[abi:v10,cw51cXTLSUwv1sDU]") == "layernorm_forward_prefetch_kernel"
    assert step_headroom.kernel_group("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT") == step_headroom.CUBLASLT
    assert step_headroom.kernel_group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") \
        == step_headroom.CUBLASLT
    assert step_headroom.kernel_group(
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64") == step_headroom.CUDNN
    assert step_headroom.kernel_group("void cudnn::fusion::matmul_dq<true, 64>(const void *)") == step_headroom.CUDNN
    assert step_headroom.kernel_group("void cublasLt::splitKreduce_kernel<32, 16, int, float>(cublasLt::Params)") \
        == step_headroom.CUBLASLT
    assert step_headroom.kernel_group("some_other_kernel").startswith("other: ")


def test_parse_sums_each_group_over_its_launches():
    text = "\n".join([
        "==PROF== Connected to process 77",
        HEADER, UNITS,
        row(0, LN_MANGLED, "1,000,000", "500,000", "2,000"),
        row(1, LN_MANGLED, "3000000", "0", "4000"),
        row(2, "nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NTT", "10", "20", "1000000"),
        "==PROF== Disconnected from process 77",
    ])
    groups = step_headroom.parse_ncu_csv(text)
    assert groups["layernorm_backward_kernel"] == {"launches": 2, "ms": pytest.approx(0.006), "bytes": 4.5e6}
    assert groups[step_headroom.CUBLASLT] == {"launches": 1, "ms": pytest.approx(1.0), "bytes": 30.0}


def test_parse_refuses_scaled_units_and_missing_columns():
    with pytest.raises(ValueError, match="base units"):
        step_headroom.parse_ncu_csv("\n".join([HEADER, UNITS.replace('"byte","byte"', '"Mbyte","byte"'),
                                               row(0, LN_MANGLED, "1", "1", "1")]))
    with pytest.raises(ValueError, match="lacks the columns"):
        step_headroom.parse_ncu_csv("\n".join([HEADER.replace("gpu__time_duration.sum", "x"), UNITS]))
    with pytest.raises(ValueError, match="no CSV rows"):
        step_headroom.parse_ncu_csv("==ERROR== no kernels were profiled")


def test_matmul_flops_at_d12():
    from nanollm.config import from_descriptor

    # 6 * tokens * (the 12 L C^2 weights of the blocks + the lm head's Vp C): 48.6 TFLOP a d12 B=64 step
    assert step_headroom.matmul_tflop(from_descriptor("d12"), 64, 1024) == pytest.approx(48.59, abs=0.01)
