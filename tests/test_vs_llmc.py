"""benchmarks/vs_llmc.py's log parsing, on the step lines llm.c's train_gpt2cu and nanollm.train print
(the GPU runs themselves are for the lead's GPU job)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("vs_llmc", Path(__file__).parent.parent / "benchmarks/vs_llmc.py")
vs_llmc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_llmc)

LLMC_LOG = """\
| device                | NVIDIA H200                                        |
allocating 1439 MiB for activations
val loss 11.009216
step    1/5 | loss 11.009872 (+nanz)| norm 15.3812 (+nanz)| lr 1.20e-04 | 4270.19 ms | 11.3% bf16 MFU | 15347 tok/s
step    2/5 | loss 10.208179 (+nanz)| norm 5.9134 (+nanz)| lr 2.40e-04 | 116.90 ms | 41.2% bf16 MFU | 560611 tok/s
step    3/5 | loss 9.739183 (-0.71z)| norm 2.7322 (-0.86z)| lr 3.60e-04 | 116.30 ms | 41.4% bf16 MFU | 562000 tok/s
step    4/5 | loss 9.461111 (-0.60z)| norm 2.0000 (-0.70z)| lr 4.80e-04 | 117.00 ms | 41.1% bf16 MFU | 561000 tok/s
step    5/5 | loss 9.100000 (-0.50z)| norm 1.9000 (-0.60z)| lr 6.00e-04 | 115.00 ms | 41.8% bf16 MFU | 563000 tok/s
total average iteration time: 116.300000 ms
"""

NANOLLM_LOG = """\
model d12: L=12 C=768 NH=12 V=50257 (padded 50304), 124,475,904 parameters
time to first step: 9.8 s (start-up, compilation, step 0)
step    1/4 | loss 11.011234 | norm 15.3701 | lr 1.20e-04 | 900.10 ms | 8.0% bf16 MFU | 72,811 tok/s
step    2/4 | loss 10.211234 | norm 5.9100 | lr 2.40e-04 | 119.00 ms | 40.4% bf16 MFU | 550,722 tok/s
step    3/4 | loss 9.731234 | norm 2.7300 | lr 3.60e-04 | 118.00 ms | 40.8% bf16 MFU | 555,389 tok/s
step    4/4 | loss 9.461234 | norm 2.0100 | lr 4.80e-04 | 120.00 ms | 40.1% bf16 MFU | 546,133 tok/s
median over steps 2..4: 119.00 ms/step, 550,722 tok/s
"""


def test_step_lines_of_both_programs():
    llmc = vs_llmc.parse_steps(LLMC_LOG)
    assert [s for s, _, _ in llmc] == [1, 2, 3, 4, 5]
    assert llmc[2] == (3, 9.739183, 116.30)
    assert vs_llmc.median_ms(llmc) == pytest.approx(116.30)  # steps 3..5: 116.3, 117.0, 115.0
    nano = vs_llmc.parse_steps(NANOLLM_LOG)
    assert nano[-1] == (4, 9.461234, 120.00)
    assert vs_llmc.median_ms(nano) == pytest.approx(119.0)  # steps 3..4
    assert vs_llmc.median_ms(vs_llmc.parse_steps("no steps here")) is None


def test_tokens_per_step_and_table():
    assert vs_llmc.tokens_per_step("-e d12 -b 64 -t 1024 -d 65536 -r 1") == 65536
    assert vs_llmc.tokens_per_step("-e d48 -b 16 -t 1024") == 16 * 1024
    table = vs_llmc.format_table([
        dict(row="d12", program="llm.c", ms=116.3, tok_s=563500.0, mem_mib=22630, first_s=4.5, loss=9.1, ratio=None,
             note=""),
        dict(row="d12", program="nanollm", ms=None, tok_s=None, mem_mib=None, first_s=None, loss=None, ratio=None,
             note="(exit 1)")])
    assert "| d12 | llm.c | 116.3 | 563,500 | 22,630 MiB | 4.5 s | 9.100000 | - |" in table
    assert "| d12 | nanollm | - | - | - | - | - | - (exit 1) |" in table


def test_cuda13_patch_applies_to_llmc_source(tmp_path):
    source = tmp_path / "llm.c"
    (source / "llmc").mkdir(parents=True)
    (source / "train_gpt2.cu").write_text("int main() {}\n")
    (source / "llmc/cuda_utils.cuh").write_text(
        f"        cudaCheck_({vs_llmc.CUDA13_MEMADVISE[0]}, file, line);\n")
    copy = tmp_path / "build"
    assert vs_llmc.prepare_build_copy(source, copy) == "cudaMemAdvise patched for CUDA 13"
    assert vs_llmc.CUDA13_MEMADVISE[1] in (copy / "llmc/cuda_utils.cuh").read_text()
    assert vs_llmc.CUDA13_MEMADVISE[0] in (source / "llmc/cuda_utils.cuh").read_text()  # the source is untouched


def test_rounds_alternate_the_order():
    assert vs_llmc.round_order(2, 1) == [(1, 0), (1, 1)]
    assert vs_llmc.round_order(2, 2) == [(1, 0), (1, 1), (2, 1), (2, 0)]  # ABBA
    assert vs_llmc.round_order(3, 3) == [(1, 0), (1, 1), (1, 2), (2, 2), (2, 1), (2, 0), (3, 0), (3, 1), (3, 2)]


def _run(ms, loss=6.28, mem=24000, note=""):
    return dict(row="d12", program="nanollm", ms=ms, tok_s=None if ms is None else 65536 / (ms / 1e3),
                mem_mib=mem, first_s=3.0, loss=loss, ratio=None, note=note)


def test_rounds_combine_to_the_mean_of_medians():
    one = vs_llmc.combine_rounds([_run(106.0)], 65536)
    assert one["ms"] == 106.0 and one["note"] == ""
    both = vs_llmc.combine_rounds([_run(106.0, mem=24000), _run(110.0, mem=25000)], 65536)
    assert both["ms"] == pytest.approx(108.0)
    assert both["tok_s"] == pytest.approx(65536 / 0.108)
    assert both["mem_mib"] == 25000
    assert both["note"] == "rounds: 106.0 / 110.0 ms"
    skipped = vs_llmc.combine_rounds([_run(106.0), _run(None, loss=None, note="(skipped: past --deadline)")], 65536)
    assert skipped["ms"] == 106.0
    assert skipped["note"] == "rounds: 106.0 / - ms (skipped: past --deadline)"
    differ = vs_llmc.combine_rounds([_run(106.0, loss=6.281613), _run(107.0, loss=6.281600)], 65536)
    assert "last losses differ between rounds: 6.281600, 6.281613" in differ["note"]


def test_loss_gap_is_over_the_steps_both_printed():
    llmc = vs_llmc.parse_steps(LLMC_LOG)  # steps 1..5
    ours = vs_llmc.parse_steps(NANOLLM_LOG)  # steps 1..4
    largest, at, mean = vs_llmc.loss_gap(llmc, ours)
    gaps = [abs(11.011234 - 11.009872), abs(10.211234 - 10.208179), abs(9.731234 - 9.739183),
            abs(9.461234 - 9.461111)]
    assert (at, largest) == (3, pytest.approx(max(gaps)))
    assert mean == pytest.approx(sum(gaps) / 4)
    assert vs_llmc.loss_gap(llmc, []) is None
    assert vs_llmc.loss_gap([], ours) is None


def test_with_model_file_replaces_only_the_descriptor():
    flags = vs_llmc.ROWS["d48"][1]
    assert vs_llmc.with_model_file(flags, "/w/init_d48.bin") == flags.replace("-e d48", "-e /w/init_d48.bin")
    assert vs_llmc.with_model_file("-b 16 -e d12 -t 1024", "x.bin") == "-b 16 -e x.bin -t 1024"
