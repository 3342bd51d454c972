"""GPT-2 tokenization of a document stream by worker processes, in order, in bounded memory.

As llm.c's dev/data/fineweb.py: a pool of processes, tiktoken's encode_ordinary per document,
<|endoftext|> before every document. Unlike it, a task is a batch (documents.py: parquet row
groups the worker reads itself, raw JSON lines, or a few hundred KB of text), a worker answers
with one uint16 array for the whole batch plus the documents' lengths, and at most 4 tasks per
worker are in flight (the executor's queue has no bound of its own), so memory stays bounded
however fast the input reads.
"""

import collections
import concurrent.futures
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .tokenizer import EOT_TOKEN, get_tokenizer

TASKS_IN_FLIGHT_PER_WORKER = 4

_encoding = None  # the worker's tiktoken Encoding


def encode_ordinary(text):
    """tiktoken's encode_ordinary as a uint32 array. encode_to_numpy with no special tokens
    allowed and none refused gives the same tokens (the tests compare with encode_ordinary) without
    building a Python list (~13% faster); text with lone surrogates (possible from JSON escapes),
    which it refuses, goes through encode_ordinary's repair."""
    try:
        return _encoding.encode_to_numpy(text, disallowed_special=())
    except (AttributeError, UnicodeEncodeError):  # AttributeError: a tiktoken older than 0.7
        return np.array(_encoding.encode_ordinary(text), dtype=np.uint32)


def encode_batch(batch):
    """(tokens, lengths) of a documents.py batch: tokens is uint16, <|endoftext|> then the
    document's tokens for each document; lengths[i] counts document i's tokens with its EOT."""
    encoded = [encode_ordinary(text) for text in batch.texts()]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for ids in encoded:
        tokens[pos] = EOT_TOKEN
        tokens[pos + 1:pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return tokens, lengths


def _init_worker(vocab_dir):
    global _encoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _encoding = get_tokenizer(vocab_dir).encoding


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class WorkerDied(RuntimeError):
    """A worker process ended mid-task (killed: out of memory, a signal)."""


class TokenizerPool:
    """`with TokenizerPool(workers) as pool: for tokens, lengths in pool.tokenize(batches): ...`

    workers=1 tokenizes in this process (no copies between processes). The tokenizer is built here
    first, so a missing vocabulary is one error here, not one per worker. A process pool from
    concurrent.futures, not multiprocessing.Pool: when a worker dies, the waiting task fails
    (BrokenProcessPool) instead of waiting forever."""

    def __init__(self, workers, vocab_dir=None):
        global _encoding
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        _encoding = get_tokenizer(vocab_dir).encoding
        self._executor = None
        if workers > 1:
            # fork where there is one: workers start at once and inherit the built tokenizer.
            # With fork the executor starts every worker at the first task, before its own
            # thread: that task is sent now, before this process reads input or starts threads
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._executor = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(vocab_dir,))
            self._executor.submit(int).result()

    def tokenize(self, batches):
        """(tokens, lengths) per batch, in the batches' order."""
        if self._executor is None:
            for batch in batches:
                yield encode_batch(batch)
            return
        pending = collections.deque()
        limit = TASKS_IN_FLIGHT_PER_WORKER * self.workers
        try:
            for batch in batches:
                pending.append(self._executor.submit(encode_batch, batch))
                if len(pending) >= limit:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerDied("a tokenizer worker process died (killed: out of memory, or a "
                             "signal?)") from None

    def close(self, wait=True):
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=not wait)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(wait=exc_type is None)
