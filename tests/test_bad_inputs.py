"""Every bad input a user can give `python -m nanollm.train`, one row each: exit code 2, a one-line
error on stderr that names the flag or the file, no traceback, nothing already saved damaged.
Add a row whenever a flag lands.

The rows run train.main() in this process (the same code `python -m nanollm.train` runs, minus
the interpreter start, which costs ~1-2 s a row); an exception escaping main() would fail the row
as a traceback would. Two rows also run as real processes. Rows that would need a GPU or a
machine's worth of memory inject what they need (a fake GPU with little free memory, a small
MemAvailable)."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import nanollm
from nanollm import checkpoint, memory_plan, reference
from nanollm.checkpoint import Checkpoint
from nanollm.config import GPT2Config, num_parameters
from nanollm.data import write_shard
from nanollm.interop import write_llmc_model

train_module = nanollm.train  # the module (callable as the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GPT2Config(max_seq_len=8, vocab_size=50257, padded_vocab_size=50304, num_layers=1, num_heads=2, channels=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad files, made once for the whole table."""
    d = tmp_path_factory.mktemp("bad_inputs")
    tokens = np.tile(np.arange(64, dtype=np.uint16), 4)
    write_shard(d / "good_train_000000.bin", tokens)
    write_shard(d / "good_val_000000.bin", tokens)
    (d / "empty_train_000000.bin").write_bytes(b"")
    raw = (d / "good_train_000000.bin").read_bytes()
    (d / "short_train_000000.bin").write_bytes(raw[:-10])
    (d / "magic_train_000000.bin").write_bytes(np.int32(7).tobytes() + raw[4:])
    write_shard(d / "few_train_000000.bin", tokens[:20])  # fewer than B*T+1 = 33
    write_shard(d / "big_train_000000.bin", np.zeros(64 * 1024 + 1, np.uint16))  # one batch of -b 64 -t 1024
    (d / "a_file").write_text("not a folder")
    (d / "garbage.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    write_llmc_model(d / "tiny.bin", TINY, np.zeros(num_parameters(TINY), np.float32))
    (d / "cut.bin").write_bytes((d / "tiny.bin").read_bytes()[:3000])
    # -y 1 folders: a checkpoint of another model, of two ranks, of another format version
    n = num_parameters(TINY)
    zeros = np.zeros(n, np.float32)
    ckpt = Checkpoint(step=1, model_config=TINY, params_bf16=np.zeros(n, np.uint16), master=zeros, m=zeros, v=zeros,
                      sampling_rng={}, loader_state={})
    for name, shards in (("other_model", 1), ("two_ranks", 2), ("future", 1)):
        checkpoint.save_checkpoint(d / name / "checkpoint_00000001.h5", ckpt, num_shards=shards)
    with h5py.File(d / "future" / "checkpoint_00000001.h5", "r+") as f:
        f.attrs["format_version"] = 99
    os.makedirs(d / "damaged")
    (d / "damaged" / "checkpoint_00000001.h5").write_bytes(b"\0" * 4000)
    return d


def _data(f, train="good", val="good"):
    return ["-i", str(f / f"{train}_train_*.bin"), "-j", str(f / f"{val}_val_*.bin")]


def _run(f, *args, train="good", val="good"):
    """A small CPU run with these flags last (a later flag overrides an earlier one)."""
    return [*_data(f, train, val), "-e", "d1", "-b", "2", "-t", "16", "-x", "1", "-v", "0", "-s", "0",
            "--device", "cpu", *args]


def _fake_gpu(monkeypatch, free):
    """A GPU with `free` bytes free, for the device-memory check (nothing is built: it refuses)."""
    monkeypatch.setattr(train_module, "gpu_available", lambda: True)
    monkeypatch.setattr(memory_plan, "gpu_free_bytes", lambda: free)
    monkeypatch.setattr(memory_plan, "resolve_attention", lambda requested: "cudnn" if requested == "auto" else requested)


def _small_host(monkeypatch, available):
    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: available)


def _allocation_fails(monkeypatch):
    """The plan fits, but the machine's memory runs out anyway (another process took it)."""
    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 13.2 MiB for an array")

    monkeypatch.setattr(reference, "init_parameters", no_memory)


# (id, argv from the files folder, what the message must name, optional set-up(monkeypatch))
ROWS = [
    # the command line
    ("unknown flag", lambda f: ["--bogus", "1"], "'--bogus'"),
    ("flag without value", lambda f: ["-b"], "-b needs a value"),
    ("not an integer", lambda f: ["-b", "x"], "-b expects an integer"),
    ("not a number", lambda f: ["-l", "fast"], "-l expects a number"),
    ("-b 0", lambda f: ["-b", "0"], "-b must be"),
    ("-t beyond GPT-2", lambda f: ["-t", "2048"], "-t must be"),
    ("-t 0", lambda f: ["-t", "0"], "-t must be"),
    ("-d 0", lambda f: ["-d", "0"], "-d must be"),
    ("-x 0", lambda f: ["-x", "0"], "-x must be"),
    ("unknown schedule", lambda f: ["-k", "step"], "-k must be"),
    ("negative lr", lambda f: ["-l", "-1"], "-l must be"),
    ("negative warmup", lambda f: ["-u", "-1"], "-u must be"),
    ("-q beyond 1", lambda f: ["-q", "2"], "-q must be"),
    ("negative weight decay", lambda f: ["-c", "-0.1"], "-c must be"),
    ("negative -v", lambda f: ["-v", "-1"], "-v and -s must be"),
    ("-m 0", lambda f: ["-m", "0"], "-m must be"),
    ("-g 0", lambda f: ["-g", "0"], "-g must be"),
    ("-a 2", lambda f: ["-a", "2"], "-a must be"),
    ("-ge 3", lambda f: ["-ge", "3"], "-ge must be"),
    ("-r 2", lambda f: ["-r", "2"], "-r must be"),
    ("-w 0", lambda f: ["-w", "0"], "-w 0 is not supported"),
    ("unknown device", lambda f: ["--device", "tpu"], "--device must be"),
    ("negative clip", lambda f: ["--grad-clip", "-1"], "--grad-clip must be"),
    ("-n negative", lambda f: ["-n", "-1", "-o", str(f / "out_n")], "-n must be"),
    ("-nk negative", lambda f: ["-nk", "-1"], "-nk must be"),
    ("-nm negative", lambda f: ["-nm", "-1"], "-nm must be"),
    ("-y 2", lambda f: ["-y", "2"], "-y must be"),
    ("-y 1 without -o", lambda f: ["-y", "1"], "need an output directory -o"),
    ("-n without -o", lambda f: ["-n", "5"], "need an output directory -o"),
    ("unknown attention", lambda f: ["--attention", "flash"], "--attention must be"),
    ("--cuda-graphs 2", lambda f: ["--cuda-graphs", "2"], "--cuda-graphs must be"),
    ("unknown storage policy", lambda f: ["--storage-errors", "ignore"], "--storage-errors must be"),
    # the model
    ("-e d0", lambda f: _run(f, "-e", "d0"), "-e d0: unsupported model descriptor 'd0'"),
    ("-e not a descriptor", lambda f: _run(f, "-e", "gpt3"), "-e gpt3: unsupported model descriptor"),
    ("-e missing model file", lambda f: _run(f, "-e", str(f / "missing.bin")), "missing.bin: no such model file"),
    ("-e garbage model file", lambda f: _run(f, "-e", str(f / "garbage.bin")), "garbage.bin: bad magic"),
    ("-e truncated model file", lambda f: _run(f, "-e", str(f / "cut.bin")), "cut.bin: truncated"),
    ("-t beyond the model file's context", lambda f: _run(f, "-e", str(f / "tiny.bin")),
     "-t 16 exceeds the model's context of 8"),
    # the data
    ("-i matches nothing", lambda f: _run(f, train="nothing"), "nothing_train_*.bin"),
    ("-j matches nothing", lambda f: _run(f, "-v", "1", val="nothing"), "nothing_val_*.bin"),
    ("empty shard", lambda f: _run(f, train="empty"), "empty_train_000000.bin: truncated"),
    ("truncated shard", lambda f: _run(f, train="short"), "short_train_000000.bin: truncated"),
    ("wrong magic", lambda f: _run(f, train="magic"), "magic_train_000000.bin: bad magic"),
    ("shard shorter than a batch", lambda f: _run(f, train="few"), "few_train_000000.bin: 20 tokens"),
    ("bad val shard", lambda f: _run(f, "-v", "1", "-j", str(f / "short_train_*.bin")),
     "short_train_000000.bin: truncated"),
    ("-d not a multiple of B*T", lambda f: _run(f, "-d", "50"), "-d 50 must be a multiple"),
    # the output folder
    ("-o names a file", lambda f: _run(f, "-o", str(f / "a_file")), "a_file: exists and is not a directory"),
    ("-o cannot be created", lambda f: _run(f, "-o", "/dev/null/out"), "-o /dev/null/out"),
    # resuming
    ("-y 1: checkpoint of another model", lambda f: _run(f, "-o", str(f / "other_model"), "-y", "1"),
     "other_model/checkpoint_00000001.h5: /model/@config"),
    # (a checkpoint of two ranks resumes in one process: test_distributed re-slices it)
    ("-y 1: checkpoint of two ranks and another model", lambda f: _run(f, "-o", str(f / "two_ranks"), "-y", "1"),
     "two_ranks/checkpoint_00000001.h5: /model/@config"),
    # several processes
    ("-z 2", lambda f: _run(f, "-z", "2"), "-z 2: ZeRO stages 2 and 3"),
    ("--comm bogus", lambda f: _run(f, "--comm", "bogus"), "--comm must be auto, nccl or mpi"),
    ("--plan-ranks without --plan", lambda f: _run(f, "--plan-ranks", "8"), "--plan-ranks sizes a job for --plan"),
    ("--plan-ranks not dividing a tensor at -z 1", lambda f: _run(f, "--plan", "--plan-ranks", "7", "-z", "1"),
     "-z 1"),
    ("-y 1: checkpoint of a newer format", lambda f: _run(f, "-o", str(f / "future"), "-y", "1"),
     "future/checkpoint_00000001.h5: /@format_version"),
    ("-y 1: only a damaged checkpoint", lambda f: _run(f, "-o", str(f / "damaged"), "-y", "1"),
     "damaged/checkpoint_00000001.h5"),
    # the device and its memory
    ("--device cuda without a GPU", lambda f: _run(f, "--device", "cuda"), "--device cuda: no CUDA GPU"),
    ("CPU path out of memory (d2 -b 64 -t 1024)", lambda f: _run(f, "-e", "d2", "-b", "64", "-t", "1024",
                                                                 train="big"),
     "-b 64: the run needs", lambda mp: _small_host(mp, 16 * 2**30)),
    ("GPU out of memory", lambda f: _run(f, "-e", "d12", "-b", "64", "-t", "1024", "-r", "0", "--device", "cuda",
                                         train="big"),
     "-b 64: the run needs", lambda mp: _fake_gpu(mp, 10 * 2**30)),
    ("out of memory although the plan fitted", lambda f: _run(f), "-b 2: out of memory", _allocation_fails),
]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input(row, files, capsys, monkeypatch):
    _, argv, needle, *setup = row
    for prepare in setup:
        prepare(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        train_module.main(argv(files))
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert needle in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and needle in error_lines[0]
    assert "Traceback" not in err + out


def test_out_of_memory_says_what_fits(files, capsys, monkeypatch):
    """The memory rows' messages in full: needed vs free, the largest -b, the flags that help."""
    _fake_gpu(monkeypatch, 10 * 2**30)
    with pytest.raises(SystemExit):
        train_module.main(_run(files, "-e", "d12", "-b", "64", "-t", "1024", "-r", "0", "--device", "cuda",
                               train="big"))
    out, err = capsys.readouterr()
    assert "memory plan (GPU memory)" in out and "does NOT fit" in out
    assert "beyond the CUDA context, but 10.00 GiB is free" in err
    assert "the largest -b that fits is" in err and "-d 65536 keeps the total batch" in err
    assert "-r 1 needs" in err and "-z 1 over N GPUs" in err


def test_damaged_checkpoint_is_left_alone(files, capsys):
    path = files / "damaged" / "checkpoint_00000001.h5"
    with pytest.raises(SystemExit):
        train_module.main(_run(files, "-o", str(files / "damaged"), "-y", "1"))
    assert path.read_bytes() == b"\0" * 4000


@pytest.mark.parametrize("argv, needle", [
    (["-e", "d0"], "-e d0"),
    (["-o", "{a_file}"], "a_file: exists and is not a directory"),
])
def test_bad_input_as_a_process(files, argv, needle):
    argv = [a.format(a_file=files / "a_file") for a in argv]
    proc = subprocess.run([sys.executable, "-m", "nanollm.train", *_data(files), "-e", "d1", "-b", "2", "-t", "16",
                           "--device", "cpu", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
