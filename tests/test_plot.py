"""python -m nanollm.plot: main.log parsing (nanollm's and llm.c's lines, restarts), reference lines,
a rendered figure, and clear errors."""

import struct
import sys

import numpy as np
import pytest

from nanollm import plot

LLMC_LOG = """s:0 tel:10.9876
s:0 trl:10.9500 lr:0.000000 norm:15.23
s:1 trl:10.1000 lr:0.000060 norm:9.87
s:2 trl:9.5000 lr:0.000120 norm:4.10
s:2 tel:9.4000
s:2 eval:0.2512
s:1 trl:10.2000 lr:0.000060 norm:9.80
"""


def _log(tmp_path, name, text):
    path = tmp_path / name / "main.log"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_parse_llmc_and_nanollm_logs_later_lines_win(tmp_path):
    streams = plot.parse_log(_log(tmp_path, "a", LLMC_LOG + "\n"))
    steps, values = streams["trl"]
    assert steps.tolist() == [0, 1, 2] and values.tolist() == [10.95, 10.2, 9.5]  # step 1 logged again after a resume
    assert streams["tel"][0].tolist() == [0, 2] and streams["eval"][1].tolist() == [0.2512]
    assert streams["norm"][1].tolist() == [15.23, 9.8, 4.10]
    nano = plot.parse_log(_log(tmp_path, "b", "s:0 tel:10.870661\ns:0 trl:10.870661\ns:3 eval:0.2000\n"))
    assert nano["tel"][1].tolist() == [10.870661] and nano["eval"][0].tolist() == [3]


@pytest.mark.parametrize("text, line", [("s:0 trl:1.0\nstep 1/10 | loss\n", 2), ("s:x trl:1\n", 1),
                                        ("s:0 trl:abc\n", 1), ("q:0 trl:1\n", 1)])
def test_bad_log_lines_name_the_line(tmp_path, text, line):
    path = _log(tmp_path, "bad", text)
    with pytest.raises(plot.PlotError, match=rf"main\.log:{line}: not a main\.log line"):
        plot.parse_log(path)


def test_refs():
    assert plot.parse_ref("GPT-2 124M val=3.28") == ("GPT-2 124M", "loss", 3.28)
    assert plot.parse_ref("GPT-2 1.5B hellaswag=48.93%") == ("GPT-2 1.5B", "eval", pytest.approx(0.4893))
    assert plot.parse_ref("eval=0.3") == ("eval", "eval", 0.3)
    for bad, message in (("GPT-2 124M", "expected 'LABEL KEY=VALUE'"), ("x speed=3", "KEY one of"),
                         ("x val=fast", "'fast' is not a number")):
        with pytest.raises(plot.PlotError, match=message):
            plot.parse_ref(bad)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_renders_runs_overlaid_with_refs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _log(tmp_path, "runA", LLMC_LOG)
    rng = np.random.default_rng(0)
    b = _log(tmp_path, "runB", "".join(f"s:{s} trl:{10 - s / 10 + rng.normal(0, 0.05):.4f}\n" for s in range(40))
             + "s:0 tel:10.0\ns:20 tel:8.1\ns:20 eval:0.26\n")
    out = tmp_path / "run.png"
    assert plot.main([str(a), f"wide={b}", "-o", str(out), "--ref", "GPT-2 124M val=3.28", "--ref",
                      "GPT-2 124M hellaswag=29.55%", "--tokens-per-step", "65536"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    width, height = _png_size(out)
    assert (width, height) == (1760, 660)  # two panels at 110 dpi
    # no eval anywhere and no eval ref: one panel; tokens on the x axis, one N per log
    c = _log(tmp_path, "runC", "s:0 trl:5\ns:1 trl:4\n")
    out2 = tmp_path / "one.svg"
    assert plot.main([str(c), str(b), "-o", str(out2), "--x", "tokens", "--tokens-per-step", "8", "16"]) == 0
    assert out2.read_text().startswith("<?xml")


def test_bad_inputs_exit_2(tmp_path, capsys, monkeypatch):
    log = _log(tmp_path, "r", "s:0 trl:5\n")
    cases = [
        ([str(tmp_path / "missing.log")], "missing.log: no such log file"),
        ([str(log), "--ref", "nope"], "expected 'LABEL KEY=VALUE'"),
        ([str(log), "--x", "tokens"], "--x tokens needs --tokens-per-step"),
        ([str(log), str(log), "--tokens-per-step", "1", "2", "3"], "one per log (2), not 3"),
        ([str(log), "--tokens-per-step", "0"], "--tokens-per-step must be positive"),
        ([str(_log(tmp_path, "empty", ""))], "the log is empty"),
        ([str(log), "-o", str(tmp_path / "no" / "dir.png")], "-o"),
    ]
    pytest.importorskip("matplotlib")
    for argv, message in cases:
        assert plot.main(argv + (["-o", str(tmp_path / "x.png")] if "-o" not in argv else [])) == 2, argv
        assert message in capsys.readouterr().err, message
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert plot.main([str(log), "-o", str(tmp_path / "y.png")]) == 2
    assert "needs matplotlib: pip install 'nanollm[plot]'" in capsys.readouterr().err
