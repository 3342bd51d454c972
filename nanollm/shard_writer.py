"""The token stream cut into shards as llm.c's dev/data/fineweb.py cuts it, and a progress line.

fineweb.py fills a buffer of shard_size tokens with <|endoftext|>-prefixed documents; a document
that does not fit is split, its head closing the shard and its tail opening the next one, so no
document is lost or repeated; the last shard holds what is left. Shard 0 is the val split, the
rest train: NAME_val_000000.bin, NAME_train_000001.bin, ... (one index across both splits).

Here each shard is written atomically (data.write_shard) by a background thread while the next one
fills, and each written shard is reported with the stream position where the next shard starts
(document index, tokens of that document already written), which is all a resumed run needs.
"""

import concurrent.futures
import os
import sys
import threading
import time

import numpy as np

from .data import write_shard


def shard_file_name(name, index):
    return f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


class ShardWriter:
    """add(tokens, lengths) chunks of the stream in order, then finish().

    start_shard, start_document, start_offset: where a resumed run picks up (the manifest's
    position after the last whole shard); the first chunk added must begin with document
    start_document, and its first start_offset tokens are already in earlier shards.
    on_written(record) runs on the writer thread after each shard is on disk, in shard order;
    record = {"file", "split", "tokens", "next_document", "next_offset"}.
    """

    def __init__(self, out_dir, name, shard_size, on_written, progress=None,
                 start_shard=0, start_document=0, start_offset=0):
        self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
        self.on_written, self.progress = on_written, progress
        self.index = start_shard
        self.document, self.offset = start_document, start_offset  # of the next token to come
        self.tokens_added = 0
        self._buffers = [np.empty(shard_size, dtype=np.uint16) for _ in range(2)]
        self._fill = 0
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending = None

    def add(self, tokens, lengths):
        if self.offset:  # a resumed run: the head of the first document is already written
            tokens, lengths = tokens[self.offset:], lengths.copy()
            lengths[0] -= self.offset
        doc0, off0 = self.document, self.offset
        ends = np.cumsum(lengths)
        buffer, taken = self._buffers[0], 0
        while taken < len(tokens):
            n = min(len(tokens) - taken, self.shard_size - self._fill)
            buffer[self._fill:self._fill + n] = tokens[taken:taken + n]
            self._fill += n
            taken += n
            if self._fill == self.shard_size:
                # position of the next token: documents wholly in, and tokens into the next one
                whole = int(np.searchsorted(ends, taken, side="right"))
                inside = taken - (int(ends[whole - 1]) if whole else 0)
                self.document = doc0 + whole
                self.offset = (off0 if whole == 0 else 0) + inside if whole < len(ends) else 0
                self._flush()
                buffer = self._buffers[0]
        self.document, self.offset = doc0 + len(lengths), 0
        self.tokens_added += len(tokens)
        if self.progress is not None:
            self.progress.update(self.index, self._fill, len(lengths), len(tokens))

    def _flush(self):
        """Hand the full buffer to the writer thread; fill the other one meanwhile."""
        self._wait()
        buffer, self._buffers = self._buffers[0], self._buffers[::-1]
        path = os.path.join(self.out_dir, shard_file_name(self.name, self.index))
        record = {"file": os.path.basename(path), "split": "val" if self.index == 0 else "train",
                  "tokens": self._fill, "next_document": self.document,
                  "next_offset": self.offset}
        self._pending = self._thread.submit(self._write, path, buffer[:self._fill], record)
        self.index += 1
        self._fill = 0

    def _write(self, path, tokens, record):
        write_shard(path, tokens)
        if self.progress is not None:
            self.progress.message(f"wrote {path}: {len(tokens):,} tokens "
                                  f"({os.path.getsize(path):,} bytes)")
        self.on_written(record)

    def _wait(self):
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # the write's exception, if any, surfaces here

    def finish(self):
        """Write the last, partial shard (if any tokens are left) and wait for every write."""
        try:
            if self._fill:
                self._flush()
            self._wait()
        finally:
            self._thread.shutdown(wait=True)

    def abort(self):
        """Stop after the shard being written, if any (it is whole); drop the partial one. A
        failed write is not reported here: the error that caused the abort is."""
        try:
            self._wait()
        except Exception:
            pass
        finally:
            self._thread.shutdown(wait=True)


def _si(x):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One status line: shard, its tokens, documents, tokens/s and the shard's ETA (plus the
    whole run's, when the number of documents is known). On a terminal it is redrawn in place
    twice a second; in a log, a line every `log_every` seconds."""

    def __init__(self, shard_size, total_documents=None, stream=None, log_every=30.0,
                 documents_done=0):
        self.shard_size, self.total_documents = shard_size, total_documents
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.5 if self.tty else log_every
        self.documents, self.tokens = documents_done, 0
        self.start = self._last = time.perf_counter()
        self._documents_at_start = documents_done
        self._lock = threading.Lock()
        self._line = ""

    def update(self, shard, shard_tokens, documents, tokens):
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._show(self.line(shard, shard_tokens, now))

    def line(self, shard, shard_tokens, now=None):
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.tokens / elapsed
        text = (f"shard {shard} ({'val' if shard == 0 else 'train'}) "
                f"{_si(shard_tokens)}/{_si(self.shard_size)} tokens | {self.documents:,} documents"
                f" | {_si(rate)} tokens/s")
        if rate > 0:
            text += f" | shard ETA {_clock((self.shard_size - shard_tokens) / rate)}"
        done = self.documents - self._documents_at_start
        if self.total_documents and done:
            left = self.total_documents - self.documents
            text += (f" | {self.documents / self.total_documents:.1%} of documents, "
                     f"ETA {_clock(left * elapsed / done)}")
        return text

    def _show(self, text):
        with self._lock:
            if self.tty:
                self.stream.write("\r" + text.ljust(len(self._line)))
                self._line = text
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text):
        """A line of its own (stdout), keeping the status line below it on a terminal."""
        with self._lock:
            if self.tty and self._line:
                self.stream.write("\r" + " " * len(self._line) + "\r")
                self.stream.flush()
            print(text, flush=True)
            if self.tty and self._line:
                self.stream.write(self._line)
                self.stream.flush()

    def close(self):
        with self._lock:
            if self.tty and self._line:
                self.stream.write("\n")
                self.stream.flush()
                self._line = ""
