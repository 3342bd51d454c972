"""HellaSwag: llm.c's eval file (built byte by byte from data_common.py's write_evalfile spec), the
jsonl reader, packing, and scoring checked against an independent implementation: transformers'
GPT2LMHeadModel on the same weights, scored as Karpathy's hellaswag.py does (written out here in
PyTorch). Also the standalone `python -m nanollm.eval hellaswag` on the CPU path.
(Side check, not in CI: llm.c's own hellaswag.py + write_evalfile on a 57-example synthetic jsonl
wrote a file byte-identical to ours, and its evaluate() on a tiny random HF model gave the same
per-example results as python -m nanollm.eval.)"""

import json
import subprocess
import sys

import numpy as np
import pytest

from nanollm import eval as nanollm_eval
from nanollm import hellaswag, prepare
from nanollm.config import GPT2Config
from nanollm.hellaswag import Example, HellaSwagError
from nanollm.reference import ParameterTensors

from .conftest import SESSION_SEED
from .test_train import shards  # noqa: F401  (the tiny token shards fixture)

TINY = GPT2Config(max_seq_len=32, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)


def random_examples(rng, count, vocab=TINY.vocab_size, max_context=10, max_ending=8):
    return [Example(i, int(rng.integers(4)), rng.integers(0, vocab, rng.integers(1, max_context + 1)).tolist(),
                    [rng.integers(0, vocab, rng.integers(1, max_ending + 1)).tolist() for _ in range(4)])
            for i in range(count)]


def random_params(config, seed, scale=0.3):
    params = ParameterTensors(config)
    params.memory[:] = np.random.default_rng(seed).normal(0.0, scale, params.memory.size)
    params.wte[config.vocab_size:] = 0.0
    return params


def spec_bytes(examples):
    """The eval file as data_common.py's docstring specifies it, written independently of hellaswag.py."""
    body = b""
    longest = 0
    for i, ex in enumerate(examples):
        words = [i, ex.label, 4, len(ex.context), *ex.context]
        for ending in ex.endings:
            words += [len(ending), *ending]
        nbytes = 4 + 2 * len(words)
        longest = max(longest, nbytes)
        body += np.array([65535, nbytes, *words], dtype="<u2").tobytes()
    header = np.zeros(256, dtype="<i4")
    header[:4] = [20240522, 1, len(examples), longest]
    return header.tobytes() + body


# ---- the files --------------------------------------------------------------------------------

def test_evalfile_matches_the_spec_and_reads_back(tmp_path, rng):
    examples = random_examples(rng, 9, vocab=65535)
    path = tmp_path / "hs.bin"
    hellaswag.write_evalfile(path, examples)
    assert path.read_bytes() == spec_bytes(examples)
    assert hellaswag.read_evalfile(path) == examples
    assert [p.name for p in tmp_path.iterdir()] == ["hs.bin"]  # atomic: no temp file left


def _jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


ITEMS = [  # the fields of rowanz/hellaswag's jsonl; ctx is ctx_a + " " + ctx_b when ctx_b is not empty
    {"ind": 24, "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
     "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "ctx_a": "Café naïve — 1234 émoji \U0001F600 it's", "ctx_b": "", "ctx": "Café naïve — 1234 émoji \U0001F600 it's",
     "label": 0, "endings": ["don't", "  two  spaces", "tab\there", "new\nline"]},
]


def test_jsonl_is_tokenized_as_hellaswag_py(tmp_path):
    from nanollm.tokenizer import get_tokenizer

    tok = get_tokenizer()
    examples = hellaswag.load_examples(_jsonl(tmp_path / "val.jsonl", ITEMS))
    for i, (item, ex) in enumerate(zip(ITEMS, examples)):
        assert (ex.index, ex.label) == (i, item["label"])
        assert ex.context == tok.encode(item["ctx"])
        assert ex.endings == [tok.encode(" " + e) for e in item["endings"]]
    # ctx missing: built from ctx_a and ctx_b, giving the same tokens
    no_ctx = [{k: v for k, v in item.items() if k != "ctx"} for item in ITEMS]
    assert hellaswag.load_examples(_jsonl(tmp_path / "no_ctx.jsonl", no_ctx)) == examples
    # the command line writes llm.c's file from it
    out = tmp_path / "data" / "val.bin"
    assert prepare.main(["hellaswag", str(tmp_path / "val.jsonl"), "-o", str(out)]) == 0
    assert out.read_bytes() == spec_bytes(examples)


@pytest.mark.parametrize("item, message", [
    ({"ctx": "a", "endings": ["x"] * 4}, 'no "label"'),
    ({"ctx": "a", "label": 4, "endings": ["x"] * 4}, '"label" must be 0-3'),
    ({"ctx": "a", "label": 1, "endings": ["x"] * 3}, '"endings" must be a list of 4'),
    ({"label": 1, "endings": ["x"] * 4}, 'no "ctx"'),
    ({"ctx": "", "label": 1, "endings": ["x"] * 4}, "empty context"),
    ("not json {", "Expecting value"),
])
def test_bad_jsonl_names_the_line(tmp_path, item, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n\n" + (item if isinstance(item, str) else json.dumps(item)) + "\n")
    with pytest.raises(HellaSwagError, match=rf"bad\.jsonl:3: .*{message}"):
        hellaswag.load_examples(path)


def _patched(data, word_index, value):
    """data with the uint16 at word_index (counted after the header) set to value."""
    data = bytearray(data)
    data[1024 + 2 * word_index:1024 + 2 * word_index + 2] = np.uint16(value).tobytes()
    return bytes(data)


def test_bad_evalfiles_are_clear_errors(tmp_path, rng):
    good = spec_bytes(random_examples(rng, 3))
    cases = [
        (good[:100], "shorter than the 1024-byte header"),
        (np.int32(20240520).tobytes() + good[4:], "bad magic 20240520.*token shard"),
        (good[:4] + np.int32(2).tobytes() + good[8:], "version 2"),
        (good[:-2], "example 2.*ends inside it"),
        (good + b"\0\0", "2 bytes after the last of 3 examples"),
        (good + b"\0", "odd number of bytes"),
        (_patched(good, 0, 65534), "example 0.*no start delimiter"),
        (_patched(good, 2, 1), "example 0.*index 1, expected 0"),
        (_patched(good, 3, 4), "example 0.*label 4"),
        (_patched(good, 4, 3), "example 0.*3 endings"),
        (_patched(good, 5, 0), "example 0.*empty context"),
        (_patched(good, 1, int(np.frombuffer(good[1026:1028], "<u2")[0]) + 2), "example 0"),
    ]
    for i, (data, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.bin"
        path.write_bytes(data)
        with pytest.raises(HellaSwagError, match=rf"bad{i}\.bin.*{message}"):
            hellaswag.read_evalfile(path)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        hellaswag.load_examples(tmp_path / "nope.bin")


def test_check_fits_follows_llmc_limits(rng):
    examples = random_examples(rng, 5)
    longest = max(ex.longest_row() for ex in examples)
    hellaswag.check_fits(examples, 4, longest + 1, TINY.vocab_size)
    assert hellaswag.required_seq_len(examples) == longest + 1
    with pytest.raises(HellaSwagError, match=rf"needs T > {longest}, T is {longest}"):
        hellaswag.check_fits(examples, 4, longest, TINY.vocab_size)
    with pytest.raises(HellaSwagError, match="batch size 3 < 4"):
        hellaswag.check_fits(examples, 3, 64, TINY.vocab_size)
    with pytest.raises(HellaSwagError, match="outside the model's vocabulary of 10"):
        hellaswag.check_fits(examples, 4, 64, 10)


# ---- packing and scoring ----------------------------------------------------------------------

def test_pack_puts_rows_and_mask_where_llmc_does():
    ex = Example(0, 2, [5, 6, 7], [[8], [9, 10], [11, 12, 13], [14]])
    inputs, targets, mask = hellaswag.pack([ex], 8, 8)
    assert inputs[1].tolist() == [5, 6, 7, 9, 10, 0, 0, 0]
    # the last context token predicts the first ending token
    assert targets[2].tolist() == [0, 0, 11, 12, 13, 0, 0, 0]
    assert mask[2].tolist() == [False, False, True, True, True, False, False, False]
    assert not mask[4:].any() and not inputs[4:].any()  # an unused example slot


def torch_mean_ending_losses(model, ex):
    """Karpathy's hellaswag.py, in PyTorch: rows context + ending padded with 0, the cross-entropy
    of the shifted logits, averaged over the (shifted) ending mask."""
    import torch
    from torch.nn import functional as F

    rows = [ex.context + e for e in ex.endings]
    width = max(len(r) for r in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (row, ending) in enumerate(zip(rows, ex.endings)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ex.context):len(row)] = 1
    with torch.no_grad():
        logits = model(tokens).logits
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                             reduction="none").view(4, -1)
    shift_mask = mask[:, 1:]
    return ((losses * shift_mask).sum(1) / shift_mask.sum(1)).numpy()


def test_scores_match_transformers_on_the_same_weights(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    from nanollm.interop import export_hf_gpt2

    params = random_params(TINY, SESSION_SEED)
    export_hf_gpt2(tmp_path / "hf", TINY, params.memory)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    examples = random_examples(rng, 23)
    B, T = 12, 24  # 3 examples per batch; the last batch holds 2
    backend = nanollm_eval.make_backend(TINY, params.memory, B, T, "cpu")
    result = hellaswag.evaluate(backend.position_losses, examples, B, T)
    assert result.total == 23 and result.batches == 8
    expected = np.array([torch_mean_ending_losses(model, ex) for ex in examples])
    got = np.array([p["losses"] for p in result.predictions])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
    decided = [np.sort(e)[1] - np.sort(e)[0] > 1e-4 for e in expected]  # exact ties may go either way
    assert sum(decided) >= 20
    for p, e, ok in zip(result.predictions, expected, decided):
        if ok:
            assert p["pred"] == int(np.argmin(e)), p
    assert result.correct == sum(p["pred"] == p["label"] for p in result.predictions)


def test_ranks_split_as_llmc_and_counts_add_up(rng):
    """Three ranks, run one after the other here: each scores its slice, the summed counts and the
    predictions equal one process's. sum_counts stands in for an all-reduce."""
    examples = random_examples(rng, 10)
    backend = nanollm_eval.make_backend(TINY, random_params(TINY, SESSION_SEED + 1).memory, 4, 24, "cpu")
    whole = hellaswag.evaluate(backend.position_losses, examples, 4, 24)
    assert [hellaswag.rank_slice(10, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]
    per_rank = [hellaswag.evaluate(backend.position_losses, examples, 4, 24, rank=r, world_size=3) for r in range(3)]
    assert [p["index"] for r in per_rank for p in r.predictions] == list(range(10))
    assert [r.predictions for r in per_rank] == [whole.predictions[0:4], whole.predictions[4:8], whole.predictions[8:]]
    all_counts = sum(np.array([r.correct, r.correct_sum, r.total]) for r in per_rank)
    summed = hellaswag.evaluate(backend.position_losses, examples, 4, 24, rank=1, world_size=3,
                                sum_counts=lambda counts: all_counts)
    assert (summed.correct, summed.correct_sum, summed.total) == (whole.correct, whole.correct_sum, 10)


def test_gpu_back_end_position_losses_on_the_simulator(rng, monkeypatch):
    """The GPU back end (bf16, on the simulator here: one forward, ~15 s) scores like the float32 CPU path."""
    from numba import cuda

    monkeypatch.setattr(type(cuda.get_current_device()), "name", b"CUDA simulator", raising=False)
    params = random_params(TINY, SESSION_SEED + 2, scale=0.1).memory
    examples = random_examples(rng, 1, max_context=4, max_ending=3)
    gpu = nanollm_eval.make_backend(TINY, params, 4, 8, "cuda", attention="numba", cuda_graphs=0)
    assert gpu.pci_bus_id is None  # the simulator has no PCI address: -lg would ask NVML for device 0
    got = hellaswag.evaluate(gpu.position_losses, examples, 4, 8)
    expected = hellaswag.evaluate(nanollm_eval.make_backend(TINY, params, 4, 8, "cpu").position_losses, examples, 4, 8)
    np.testing.assert_allclose(got.predictions[0]["losses"], expected.predictions[0]["losses"], atol=3e-2)


# ---- python -m nanollm.eval hellaswag -------------------------------------------------------------

def test_eval_command_on_each_model_kind(tmp_path, rng, capsys):
    from nanollm import checkpoint
    from nanollm.interop import export_hf_gpt2, write_llmc_model
    from nanollm.kernels.bf16 import round_to_bf16, to_bf16_bits

    params = random_params(TINY, SESSION_SEED + 3)
    examples = random_examples(rng, 7)
    hellaswag.write_evalfile(tmp_path / "hs.bin", examples)
    write_llmc_model(tmp_path / "m.bin", TINY, params.memory, version=5)
    export_hf_gpt2(tmp_path / "hf", TINY, round_to_bf16(params.memory))
    n = params.memory.size
    checkpoint.save_checkpoint(tmp_path / "c.h5", checkpoint.Checkpoint(
        step=1, model_config=TINY, params_bf16=to_bf16_bits(params.memory), master=params.memory.copy(),
        m=np.zeros(n, np.float32), v=np.zeros(n, np.float32), sampling_rng={}, loader_state={}))
    predictions = []
    for model in ("m.bin", "hf", "c.h5"):
        out = tmp_path / f"{model}.preds.jsonl"
        assert nanollm_eval.main(["hellaswag", "--model", str(tmp_path / model), "--data", str(tmp_path / "hs.bin"),
                                  "--device", "cpu", "-b", "8", "--predictions", str(out)]) == 0
        predictions.append([json.loads(line) for line in out.read_text().splitlines()])
    assert predictions[0] == predictions[1] == predictions[2]  # the same bf16 weights three ways
    text = capsys.readouterr().out
    correct = sum(p["pred"] == p["label"] for p in predictions[0])
    assert f"HellaSwag: {correct}/7 = {correct / 7:.4f} acc_norm" in text and "examples/s" in text
    # --weights master: the checkpoint's fp32 weights, scored as the CPU path would
    backend = nanollm_eval.make_backend(TINY, params.memory, 8, 32, "cpu")
    expected = hellaswag.evaluate(backend.position_losses, examples, 8, 32).predictions
    result = nanollm_eval.run_hellaswag(str(tmp_path / "c.h5"), str(tmp_path / "hs.bin"), "cpu", 8, 32, "master",
                                        log=lambda text: None)
    assert result.predictions == expected


def test_eval_command_bad_inputs_exit_2(tmp_path, rng):
    from nanollm.interop import write_llmc_model

    write_llmc_model(tmp_path / "m.bin", TINY, random_params(TINY, 1).memory, version=3)
    hellaswag.write_evalfile(tmp_path / "hs.bin", random_examples(rng, 3))
    hellaswag.write_evalfile(tmp_path / "big_vocab.bin", random_examples(rng, 3, vocab=50257))
    long = [Example(0, 0, list(range(40)), [[1]] * 4)]
    hellaswag.write_evalfile(tmp_path / "long.bin", long)
    base = ["hellaswag", "--model", str(tmp_path / "m.bin"), "--device", "cpu"]
    cases = [
        (base + ["--data", str(tmp_path / "missing.bin")], "missing.bin: no such HellaSwag file"),
        (base + ["--data", str(tmp_path / "m.bin")], "m.bin: bad magic 20240326"),
        (base + ["--data", str(tmp_path / "big_vocab.bin")], "outside the model's vocabulary of 97"),
        (base + ["--data", str(tmp_path / "long.bin")], "long.bin: example 0 is 41 tokens (context + ending); "
                                                        "needs T > 41, T is 32"),
        (base + ["--data", str(tmp_path / "hs.bin"), "-b", "2"], "batch size 2 < 4"),
        (base + ["--data", str(tmp_path / "hs.bin"), "-t", "64"], "-t 64 exceeds the model's context of 32"),
        (base + ["--data", str(tmp_path / "hs.bin"), "-b", "0"], "-b must be >= 1"),
        (base + ["--data", str(tmp_path / "hs.bin"), "--weights", "master"], "--weights master is for nanollm checkpoints"),
        (["hellaswag", "--model", str(tmp_path / "none.bin"), "--data", str(tmp_path / "hs.bin")], "none.bin"),
        (base + ["--data", str(tmp_path / "hs.bin"), "--predictions", str(tmp_path)], "is a directory"),
        (base[:-1] + ["cuda", "--data", str(tmp_path / "hs.bin")], "--device cuda: no CUDA GPU is available"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "nanollm.eval", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (message, proc.stderr)


def test_prepare_hellaswag_bad_inputs_exit_2(tmp_path, capsys):
    assert prepare.main(["hellaswag", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such HellaSwag file" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    assert prepare.main(["hellaswag", str(tmp_path / "t.txt")]) == 2
    assert "expected HellaSwag's .jsonl" in capsys.readouterr().err
    _jsonl(tmp_path / "bad.jsonl", [{"ctx": "a", "endings": ["b"] * 4}])
    assert prepare.main(["hellaswag", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o.bin")]) == 2
    assert 'bad.jsonl:1: no "label"' in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()


# ---- -h 1 in training -------------------------------------------------------------------------------

def _train_cfg(shards, **overrides):
    import nanollm

    return nanollm.TrainConfig(**{**dict(input_bin=str(shards / "tiny_train_*.bin"),
                                         input_val_bin=str(shards / "tiny_val_*.bin"), model="d1", batch_size=4,
                                         seq_len=16, max_steps=2, val_loss_every=1, val_max_steps=1, sample_every=0,
                                         learning_rate=3e-3, device="cpu", hellaswag=1), **overrides})


def test_training_h1_logs_llmc_eval_lines_and_agrees_with_the_eval_command(shards, rng):
    import nanollm

    examples = random_examples(rng, 6, vocab=500, max_context=8, max_ending=6)
    hellaswag.write_evalfile(shards / "hs.bin", examples)
    out = shards / "out"
    result = nanollm.train(_train_cfg(shards, hellaswag_data=str(shards / "hs.bin"), output_dir=str(out),
                                      checkpoint_every=2))
    assert sorted(result.hellaswag) == [1, 2]  # with the val loss, but not at step 0 (llm.c)
    log = (out / "main.log").read_text().splitlines()
    for step in (1, 2):
        assert f"s:{step} eval:{result.hellaswag[step]:.4f}" in log
    assert not any(line.startswith("s:0 eval") for line in log)
    # the standalone command on the checkpoint's weights (the CPU path trains its fp32 master weights)
    again = nanollm_eval.run_hellaswag(str(out / "checkpoint_00000002.h5"), str(shards / "hs.bin"), "cpu", 4, 16,
                                       "master", log=lambda text: None)
    assert again.accuracy == result.hellaswag[2]


def test_training_h1_bad_settings(shards, tmp_path, monkeypatch):
    import nanollm
    from nanollm.train_config import UsageError

    long = [Example(0, 0, list(range(40)), [[1]] * 4)]
    hellaswag.write_evalfile(shards / "long.bin", long)
    monkeypatch.chdir(tmp_path)  # no data/hellaswag_val.bin here
    cases = [
        (dict(), "-h 1: no HellaSwag file at data/hellaswag_val.bin or dev/data/hellaswag/hellaswag_val.bin"),
        (dict(hellaswag_data=str(shards / "long.bin")), "long.bin: example 0 is 41 tokens (context + ending); "
                                                        "needs T > 41, T is 16 (-b 4 -t 16)"),
        (dict(hellaswag_data=str(shards / "tiny_val_000000.bin")), "bad magic 20240520"),
        (dict(batch_size=2, total_batch_size=32), "-h 1 needs -b >= 4"),
        (dict(hellaswag=2), "-h must be 0 or 1"),
        (dict(skip_update_lossz=-1.0), "-sl must be >= 0"),
        (dict(skip_update_gradz=float("nan")), "-sg must be >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(UsageError) as error:
            nanollm.train(_train_cfg(shards, **overrides))
        assert message in str(error.value), (message, str(error.value))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        nanollm.train(_train_cfg(shards, hellaswag_data=str(shards / "missing.bin")))
    proc = subprocess.run([sys.executable, "-m", "nanollm.train", "-i", str(shards / "tiny_train_*.bin"),
                           "-j", str(shards / "tiny_val_*.bin"), "-e", "d1",
                           "-b", "4", "-t", "16", "-h", "1", "--hellaswag-data", str(shards / "long.bin"),
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs T > 41" in proc.stderr and "Traceback" not in proc.stderr
