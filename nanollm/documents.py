"""Documents for nanollm.prepare, read as a stream of small batches, never as a whole-corpus list.

Sources, in the order given:
- a text file: one document (UTF-8; CRLF read as LF);
- parquet (pyarrow): one document per row, the text column `--text-field` (the files that
  `huggingface-cli download HuggingFaceFW/fineweb-edu --include "sample/10BT/*"` leaves);
- JSON Lines (.jsonl, .jsonl.gz): one record per non-blank line;
- JSON (.json, .json.gz): a top-level array of records, or records one after another;
- a Hugging Face dataset through `datasets.load_dataset(..., streaming=True)`, as llm.c's
  dev/data/fineweb.py loads FineWeb-Edu (it also loads local dataset folders the same way).

A batch is what one tokenizer worker gets, often still raw: for parquet, only which rows of which
row groups (the worker reads and decompresses them itself), for JSON Lines the lines, so that the
worker processes, not the reading process, pay for decompression, UTF-8 decoding and JSON
parsing, and the reading process keeps up with many workers. A batch's `texts()` does that work
and names the file and row of anything wrong.

Resuming: `DocumentStream.batches(skip)` starts after the first `skip` documents, passing over
parquet row groups by their metadata and JSON Lines lines unparsed.
"""

import codecs
import gzip
import importlib
import json
import os
import re
import zlib

import numpy as np

BATCH_BYTES = 1 << 18  # text per batch: ~70K GPT-2 tokens, ~20 ms of one worker's time
PARQUET_READ_ROWS = 1024
READ_CHUNK = 1 << 20
DATA_EXTRA = "pip install 'nanollm[data]'"
RECORD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")


class DocumentError(Exception):
    """Unreadable or unusable input; the message names the file (and row)."""


def import_optional(module, purpose):
    """pyarrow / datasets are the optional extra nanollm[data]: say so when missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DocumentError(f"{purpose} needs the package {package}: {DATA_EXTRA} "
                            f"(pyarrow and datasets)") from None


def is_record_file(path):
    return os.fspath(path).lower().endswith(RECORD_SUFFIXES)


def record_text(record, field, where):
    """record[field] as the document's text, or an error naming where the record is."""
    if not isinstance(record, dict):
        raise DocumentError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise DocumentError(f"{where}: no field {field!r} (fields: {fields}); "
                            f"choose the text field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        what = "null" if text is None else f"a {type(text).__name__}, not a string"
        raise DocumentError(f"{where}: field {field!r} is {what}")
    return text


def read_text_file(path):
    """(text, raw bytes) of a text file as one document: UTF-8, universal newlines (CRLF files
    tokenize as LF ones), not blank."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text ({e})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError(f"{path}: empty text")
    return text, raw


# ----------------------------------------------------------------------------
# batches: what a worker decodes and tokenizes


class TextBatch:
    """Documents already decoded (text files, JSON arrays, Hugging Face rows)."""

    def __init__(self, texts):
        self._texts = texts

    def __len__(self):
        return len(self._texts)

    def texts(self):
        return self._texts


class Utf8Batch:
    """Rows of a parquet string column, read by the main process (a row group too big for one
    worker): the UTF-8 bytes and the n+1 offsets between rows."""

    def __init__(self, where, first_row, data, offsets):
        self.where, self.first_row, self.data, self.offsets = where, first_row, data, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def texts(self):
        data, bounds = self.data, self.offsets.tolist()
        try:
            return [str(data[a:b], "utf-8") for a, b in zip(bounds, bounds[1:])]
        except UnicodeDecodeError:
            for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
                try:
                    str(data[a:b], "utf-8")
                except UnicodeDecodeError as e:
                    raise DocumentError(f"{self.where}: row {self.first_row + i}: not UTF-8 text "
                                        f"({e.reason} at byte {e.start})") from None
            raise


class JsonLinesBatch:
    """Raw lines of a JSON Lines file with their line numbers (1-based)."""

    def __init__(self, where, field, line_numbers, lines):
        self.where, self.field, self.line_numbers, self.lines = where, field, line_numbers, lines

    def __len__(self):
        return len(self.lines)

    def texts(self):
        texts = []
        for number, raw in zip(self.line_numbers, self.lines):
            where = f"{self.where}: line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DocumentError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DocumentError(f"{where}: not valid JSON ({e})") from None
            texts.append(record_text(record, self.field, where))
        return texts


# ----------------------------------------------------------------------------
# sources. Each has label, identity() (what the manifest records to tell a changed input),
# count() (documents, when known without reading), check() (cheap up-front validation: the
# footer and schema, or the first record) and batches(skip), a generator that returns the
# number of documents it skipped.


class _File:
    def __init__(self, path):
        self.path = os.fspath(path)
        self.label = self.path

    def identity(self):
        st = os.stat(self.path)
        return {"file": os.path.basename(self.path), "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns}

    def count(self):
        return None


class TextFile(_File):
    def count(self):
        return 1

    def check(self):
        pass

    def batches(self, skip=0):
        if skip:
            return 1
        yield TextBatch([read_text_file(self.path)[0]])
        return 0


def _string_column(arr, where):
    """(UTF-8 bytes, int64 offsets from 0) of an arrow string column chunk."""
    pa = import_optional("pyarrow", "reading parquet files")
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())  # string_view, dictionary-encoded strings
    if arr.null_count:
        row = arr.is_null().to_numpy(zero_copy_only=False).argmax()
        raise DocumentError(f"{where(int(row))}: the text is null")
    _, offsets_buf, data_buf = arr.buffers()
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[arr.offset:arr.offset + len(arr) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    data = memoryview(data_buf)[start:end] if data_buf is not None else memoryview(b"")
    return data, offsets.astype(np.int64) - start


def _split_by_bytes(offsets):
    """Cut points (row indices) so that each piece holds about BATCH_BYTES of text."""
    cuts = [0]
    while cuts[-1] < len(offsets) - 1:
        target = offsets[cuts[-1]] + BATCH_BYTES
        nxt = int(np.searchsorted(offsets, target, side="right")) - 1
        cuts.append(min(max(nxt, cuts[-1] + 1), len(offsets) - 1))
    return cuts


def _open_parquet(path):
    pq = import_optional("pyarrow.parquet", "reading parquet files")
    pa = import_optional("pyarrow", "reading parquet files")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DocumentError(f"{path}: not a readable parquet file ({e})") from None


_worker_parquet = {}  # a worker's open file: consecutive tasks read the same one


class ParquetRows:
    """A task: rows of whole or partial row groups of one parquet file, which the worker reads
    and decompresses itself, so the reading process only hands out row numbers.
    ranges: [(row group, first row in it, end row in it)], first_row: the first one's row in
    the file."""

    def __init__(self, path, field, first_row, ranges):
        self.path, self.field, self.first_row, self.ranges = path, field, first_row, ranges

    def __len__(self):
        return sum(stop - start for _, start, stop in self.ranges)

    def texts(self):
        pa = import_optional("pyarrow", "reading parquet files")
        if self.path not in _worker_parquet:
            _worker_parquet.clear()
            _worker_parquet[self.path] = _open_parquet(self.path)
        f = _worker_parquet[self.path]
        texts, row = [], self.first_row
        for group, start, stop in self.ranges:
            try:
                column = f.read_row_group(group, columns=[self.field]).column(0)
                column = column.slice(start, stop - start).combine_chunks()
            except (pa.ArrowException, OSError) as e:
                raise DocumentError(f"{self.path}: unreadable in rows {row}..."
                                    f"{row + stop - start - 1} (row group {group}: {e})") from None
            data, offsets = _string_column(column, lambda i: f"{self.path}: row {row + i}")
            texts += Utf8Batch(self.path, row, data, offsets).texts()
            row += stop - start
        return texts


class ParquetFile(_File):
    """Rows go to the workers by row group (FineWeb's hold 1000 rows, a few MB); small groups
    are put together, and a group too big to hand to one worker is read here in batches."""

    TASK_BYTES = 1 << 21  # put small row groups together up to this much (uncompressed)
    WORKER_GROUP_BYTES = 1 << 26  # a larger group is read here, in batches

    def __init__(self, path, field):
        super().__init__(path)
        self.field = field
        self._rows = None

    def check(self):
        pa = import_optional("pyarrow", "reading parquet files")
        f = _open_parquet(self.path)
        schema = f.schema_arrow
        if self.field not in schema.names:
            raise DocumentError(f"{self.path}: no column {self.field!r} (columns: "
                                f"{', '.join(schema.names[:12])}); choose it with --text-field")
        kind = schema.field(self.field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind)):
            raise DocumentError(f"{self.path}: column {self.field!r} holds {kind}, not text")
        self._rows = f.metadata.num_rows
        if self._rows == 0:
            raise DocumentError(f"{self.path}: no rows (empty input)")

    def count(self):
        return self._rows

    def batches(self, skip=0):
        f = _open_parquet(self.path)
        row, ranges, first, size = 0, [], 0, 0  # row: the file's row at the current group
        for group in range(f.num_row_groups):
            meta = f.metadata.row_group(group)
            n = meta.num_rows
            if row + n <= skip:  # before a resumed run's start: passed over unread
                row += n
                continue
            start = max(0, skip - row)
            if meta.total_byte_size > self.WORKER_GROUP_BYTES:
                if ranges:
                    yield ParquetRows(self.path, self.field, first, ranges)
                    ranges, size = [], 0
                yield from self._read_here(f, group, start, row + start)
            else:
                if not ranges:
                    first = row + start
                ranges.append((group, start, n))
                size += meta.total_byte_size
                if size >= self.TASK_BYTES:
                    yield ParquetRows(self.path, self.field, first, ranges)
                    ranges, size = [], 0
            row += n
        if ranges:
            yield ParquetRows(self.path, self.field, first, ranges)
        return skip

    def _read_here(self, f, group, start, row):
        """Utf8Batches of a big row group, from row `start` in it (the file's row `row`)."""
        pa = import_optional("pyarrow", "reading parquet files")
        reader = f.iter_batches(batch_size=PARQUET_READ_ROWS, columns=[self.field],
                                row_groups=[group])
        drop = start
        while True:
            try:
                batch = next(reader, None)
            except (pa.ArrowException, OSError) as e:
                raise DocumentError(f"{self.path}: unreadable in rows {row}..."
                                    f"{row + PARQUET_READ_ROWS - 1} ({e})") from None
            if batch is None:
                break
            column = batch.column(0)
            if drop:
                n = min(drop, len(column))
                column, drop = column.slice(n), drop - n
            data, offsets = _string_column(column, lambda i: f"{self.path}: row {row + i}")
            cuts = _split_by_bytes(offsets)
            for a, b in zip(cuts, cuts[1:]):
                yield Utf8Batch(self.path, row + a, bytes(data[offsets[a]:offsets[b]]),
                                offsets[a:b + 1] - offsets[a])
            row += len(column)


def _open_binary(path):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


class JsonLinesFile(_File):
    def __init__(self, path, field):
        super().__init__(path)
        self.field = field

    def _lines(self):
        """(line number, raw line) of the non-blank lines."""
        number = 0
        try:
            with _open_binary(self.path) as f:
                for number, raw in enumerate(f, 1):
                    if not raw.isspace():
                        yield number, raw
        except _READ_ERRORS as e:
            raise DocumentError(f"{self.path}: unreadable at line {number + 1} ({e})") from None

    def check(self):
        for number, raw in self._lines():
            JsonLinesBatch(self.path, self.field, [number], [raw]).texts()
            return
        raise DocumentError(f"{self.path}: no records (empty input)")

    def batches(self, skip=0):
        skipped, numbers, lines, size = 0, [], [], 0
        for number, raw in self._lines():
            if skipped < skip:
                skipped += 1
                continue
            numbers.append(number)
            lines.append(raw)
            size += len(raw)
            if size >= BATCH_BYTES:
                yield JsonLinesBatch(self.path, self.field, numbers, lines)
                numbers, lines, size = [], [], 0
        if lines:
            yield JsonLinesBatch(self.path, self.field, numbers, lines)
        return skipped


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_values(path, f):
    """The records of a JSON file, streamed: the elements of a top-level array, or the top-level
    values one after another (which covers JSON Lines)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, read_bytes, index = "", 0, False, 0, 0

    def fill():
        nonlocal buf, pos, eof, read_bytes
        try:
            chunk = f.read(READ_CHUNK)
        except _READ_ERRORS as e:
            raise DocumentError(f"{path}: unreadable after byte {read_bytes} ({e})") from None
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise DocumentError(f"{path}: record {index}: not UTF-8 (byte "
                                f"{max(0, read_bytes + e.start - 3)}: {e.reason})") from None
        read_bytes += len(chunk)
        buf, pos, eof = buf[pos:] + text, 0, not chunk

    def skip_space():
        nonlocal pos
        while True:
            pos = _WHITESPACE.match(buf, pos).end()
            if pos < len(buf) or eof:
                return
            fill()

    def value():
        nonlocal pos
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # a value at the buffer's end may go on past it
                    pos = end
                    return obj
            except json.JSONDecodeError as e:
                if eof:
                    raise DocumentError(f"{path}: record {index}: not valid JSON "
                                        f"({e.msg})") from None
            fill()

    skip_space()
    in_array = buf.startswith("[", pos)
    if in_array:
        pos += 1
        skip_space()
        if buf.startswith("]", pos):
            pos += 1
            in_array = False
    while pos < len(buf):
        yield index, value()
        index += 1
        skip_space()
        if in_array:
            if buf.startswith(",", pos):
                pos += 1
                skip_space()
            elif buf.startswith("]", pos):
                pos += 1
                in_array = False
                skip_space()
                if pos < len(buf):
                    raise DocumentError(f"{path}: data after the closing ']'")
            else:
                raise DocumentError(f"{path}: record {index}: expected ',' or ']' after "
                                    f"record {index - 1}")
    if in_array:
        raise DocumentError(f"{path}: the array is not closed (truncated file?)")


class JsonFile(_File):
    def __init__(self, path, field):
        super().__init__(path)
        self.field = field

    def _texts(self):
        with _open_binary(self.path) as f:
            for index, record in _json_values(self.path, f):
                yield record_text(record, self.field, f"{self.path}: record {index}")

    def check(self):
        for _ in self._texts():
            return
        raise DocumentError(f"{self.path}: no records (empty input)")

    def batches(self, skip=0):
        return (yield from _batched_texts(self._texts(), skip))


def _batched_texts(texts, skip=0):
    """TextBatches of about BATCH_BYTES from a stream of strings, after the first `skip`;
    returns how many it skipped."""
    batch, size, skipped = [], 0, 0
    for text in texts:
        if skipped < skip:
            skipped += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield TextBatch(batch)
            batch, size = [], 0
    if batch:
        yield TextBatch(batch)
    return skipped


class HubDataset:
    """A Hugging Face dataset, streamed: `--hf-dataset NAME --hf-name CONFIG` (a hub name, or a
    local dataset folder, which `datasets` reads the same way)."""

    def __init__(self, name, config, split, field):
        self.name, self.config, self.split, self.field = name, config, split, field
        self.label = f"--hf-dataset {name}" + (f" --hf-name {config}" if config else "")
        self._dataset = None

    def identity(self):
        return {"hf_dataset": self.name, "hf_name": self.config, "split": self.split}

    def count(self):
        return None

    def check(self):
        datasets = import_optional("datasets", "--hf-dataset")
        try:
            self._dataset = datasets.load_dataset(self.name, name=self.config, split=self.split,
                                                  streaming=True)
        except Exception as e:  # the hub, the network, a bad name or config: all end here
            raise DocumentError(f"{self.label}: cannot load the dataset "
                                f"({type(e).__name__}: {e})") from None
        features = self._dataset.features
        if features is not None and self.field not in features:
            raise DocumentError(f"{self.label}: no column {self.field!r} (columns: "
                                f"{', '.join(list(features)[:12])}); choose it with --text-field")

    def _texts(self, skip):
        dataset = self._dataset.skip(skip) if skip else self._dataset
        row = skip
        rows = iter(dataset)
        while True:
            try:
                record = next(rows, None)
            except Exception as e:
                raise DocumentError(f"{self.label}: reading row {row} failed "
                                    f"({type(e).__name__}: {e})") from None
            if record is None:
                break
            yield record_text(record, self.field, f"{self.label}: row {row}")
            row += 1
        if row == 0:
            raise DocumentError(f"{self.label}: no rows in split {self.split!r} (empty input)")

    def batches(self, skip=0):
        if self._dataset is None:
            self.check()
        yield from _batched_texts(self._texts(skip))
        return skip


def open_sources(paths, text_field):
    """One source per input file, by its name: parquet, JSON Lines, JSON, else text."""
    sources = []
    for path in paths:
        low = os.fspath(path).lower()
        if low.endswith(".parquet"):
            sources.append(ParquetFile(path, text_field))
        elif low.endswith((".jsonl", ".jsonl.gz")):
            sources.append(JsonLinesFile(path, text_field))
        elif low.endswith((".json", ".json.gz")):
            sources.append(JsonFile(path, text_field))
        else:
            sources.append(TextFile(path))
    return sources


class DocumentStream:
    """The documents of several sources in order, as batches."""

    def __init__(self, sources):
        self.sources = sources

    def check(self):
        for source in self.sources:
            source.check()

    def count(self):
        """Documents in all, when every source knows its count without reading; else None."""
        counts = [s.count() for s in self.sources]
        return None if None in counts else sum(counts)

    def batches(self, skip=0):
        for source in self.sources:
            n = source.count()
            if n is not None and skip >= n:
                skip -= n
                continue
            skip -= yield from source.batches(skip)
