"""HellaSwag: the jsonl, llm.c's tokenized eval file, and completion-style scoring as llm.c does it.

After llm.c's dev/data/hellaswag.py (render_example, evaluate), dev/data/data_common.py
(write_evalfile) and llmc/dataloader.h (EvalLoader, evalloader_stat_losses).

    python -m nanollm.prepare hellaswag hellaswag_val.jsonl      # -> data/hellaswag_val.bin

jsonl (rowanz/hellaswag): one example per line with "ctx" (or "ctx_a" and "ctx_b"), "endings" (4
strings) and "label" (0-3). As hellaswag.py: the context tokens are GPT-2's encoding of ctx, each
ending's the encoding of " " + ending.

Eval file (llm.c's `hellaswag_val.bin`): 256 x int32 header, [0]=20240522, [1]=1, [2]=number of
examples, [3]=the longest example in bytes; then per example a run of uint16: 65535 (start), the
run's size in bytes, the example's index (0, 1, ...), its label, the number of endings (4), the
context length and tokens, then per ending its length and tokens.

Scoring ("completion style", llm.c and Karpathy's hellaswag.py): row i of an example is context +
ending i; the model's cross-entropy at the positions that predict the ending's tokens (the last
context token predicts the first ending token) is averaged over the ending; the prediction is the
row with the lowest mean, the first of equal ones: acc_norm, the number llm.c prints and logs.
hellaswag.py's "acc" (lowest sum) is counted beside it.

Packing (llm.c's EvalLoader): B // 4 examples per (B, T) batch, four rows each; so B >= 4 (a
multiple of 4 wastes no rows) and every context + ending shorter than T (llm.c's check:
ctx + ending < T). Unused positions and rows hold token 0; the model is causal, so they do not
change the scored positions. Under several ranks, rank r scores the r-th of world_size contiguous
slices of ceil(N / world_size) examples (llm.c's split) and the counts are summed across ranks.
"""

import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .data import atomic_write

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
START_EXAMPLE = 0xFFFF
NUM_ENDINGS = 4  # llm.c's ASSUMED_NUM_COMPLETIONS
TOKEN_SHARD_MAGIC = 20240520


class HellaSwagError(ValueError):
    """A HellaSwag file or setting that cannot be used; the message names the file and example."""


@dataclass
class Example:
    index: int       # position in the file (llm.c's <EXAMPLE_INDEX>)
    label: int       # the correct ending, 0-3
    context: list    # token ids
    endings: list    # NUM_ENDINGS lists of token ids

    def longest_row(self):
        """Tokens in the longest context + ending row."""
        return len(self.context) + max(len(e) for e in self.endings)


# ---- the jsonl --------------------------------------------------------------------------------

def _context_text(item):
    if isinstance(item.get("ctx"), str):
        return item["ctx"]
    # HellaSwag's README: when ctx_b is non-empty, ctx is ctx_a, a space, then ctx_b
    ctx_a, ctx_b = item.get("ctx_a"), item.get("ctx_b", "")
    if not isinstance(ctx_a, str) or not isinstance(ctx_b, str):
        raise ValueError('no "ctx" string (nor "ctx_a"/"ctx_b")')
    return f"{ctx_a} {ctx_b}" if ctx_b else ctx_a


def render_example(item, index, tokenizer):
    """One parsed jsonl object -> Example, tokenized as hellaswag.py's render_example."""
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    if "label" not in item:
        raise ValueError('no "label" (HellaSwag\'s test split has no labels: use the val split)')
    label, endings = item["label"], item.get("endings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f'"label" must be 0-{NUM_ENDINGS - 1}, got {label!r}')
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise ValueError(f'"endings" must be a list of {NUM_ENDINGS} strings, got {endings!r:.80}')
    context = tokenizer.encode(_context_text(item))
    if not context:
        raise ValueError("empty context")
    return Example(index, label, context, [tokenizer.encode(" " + ending) for ending in endings])


def read_jsonl(path, tokenizer=None):
    """HellaSwag's jsonl -> [Example], GPT-2 tokens (nanollm.tokenizer unless one is given)."""
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    examples = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                examples.append(render_example(json.loads(line.decode("utf-8")), len(examples), tokenizer))
            except ValueError as error:
                raise HellaSwagError(f"{path}:{number}: {error}") from None
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


# ---- llm.c's eval file ------------------------------------------------------------------------

def write_evalfile(path, examples):
    """Write examples in llm.c's eval format (data_common.write_evalfile), atomically. Returns the
    longest example in bytes (header[3])."""
    path = os.fspath(path)
    if not 0 < len(examples) < 2**16:
        raise HellaSwagError(f"{path}: {len(examples)} examples; the format holds 1 to 65,535 "
                             "(indices are uint16)")
    stream, longest = [], 0
    for i, ex in enumerate(examples):
        if len(ex.endings) != NUM_ENDINGS:
            raise HellaSwagError(f"{path}: example {i} has {len(ex.endings)} endings, expected {NUM_ENDINGS}")
        run = [START_EXAMPLE, 0, i, ex.label, len(ex.endings), len(ex.context), *ex.context]
        for ending in ex.endings:
            run += [len(ending), *ending]
        nbytes = 2 * len(run)
        if nbytes >= 2**16:
            raise HellaSwagError(f"{path}: example {i} takes {nbytes} bytes; the format allows < 65,536")
        tokens = ex.context + [t for e in ex.endings for t in e]
        if min(tokens) < 0 or max(tokens) >= START_EXAMPLE:
            raise HellaSwagError(f"{path}: example {i} has token ids outside [0, 65535)")
        run[1] = nbytes
        longest = max(longest, nbytes)
        stream += run
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (EVAL_MAGIC, EVAL_VERSION, len(examples), longest)
    atomic_write(path, [header.tobytes(), np.asarray(stream, dtype="<u2").tobytes()])
    return longest


def read_evalfile(path):
    """llm.c's eval file -> [Example], checking everything llm.c's EvalLoader asserts and that the
    file ends where its last example does."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER_BYTES:
        raise HellaSwagError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if header[0] != EVAL_MAGIC:
        hint = " (that is a token shard's magic: -i/-j data, not an eval file)" if header[0] == TOKEN_SHARD_MAGIC else ""
        raise HellaSwagError(f"{path}: bad magic {int(header[0])}, expected {EVAL_MAGIC}: not an llm.c eval file{hint}")
    if header[1] != EVAL_VERSION:
        raise HellaSwagError(f"{path}: eval file version {int(header[1])}, expected {EVAL_VERSION}")
    count, longest = int(header[2]), int(header[3])
    if count < 1:
        raise HellaSwagError(f"{path}: header says {count} examples")
    if (len(raw) - HEADER_BYTES) % 2:
        raise HellaSwagError(f"{path}: an odd number of bytes after the header (the examples are uint16)")
    words = np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").astype(np.int64)
    examples, pos = [], 0
    for i in range(count):
        where = f"{path}: example {i} (byte {HEADER_BYTES + 2 * pos})"
        if pos + 6 > len(words):
            raise HellaSwagError(f"{where}: the file ends early (header says {count} examples)")
        start, nbytes, index, label, n_endings, n_context = words[pos:pos + 6]
        end = pos + nbytes // 2
        problems = [
            (start != START_EXAMPLE, f"no start delimiter 65535 (found {start})"),
            (nbytes % 2 or nbytes < 14, f"bad size {nbytes} bytes"),
            (nbytes > longest, f"{nbytes} bytes, longer than the header's longest example ({longest})"),
            (end > len(words), "the file ends inside it"),
            (index != i, f"index {index}, expected {i}"),
            (n_endings != NUM_ENDINGS, f"{n_endings} endings, expected {NUM_ENDINGS}"),
            (not 0 <= label < NUM_ENDINGS, f"label {label} not in 0-{NUM_ENDINGS - 1}"),
            (n_context < 1, "empty context"),
        ]
        bad = [text for failed, text in problems if failed]
        if bad:
            raise HellaSwagError(f"{where}: {bad[0]}")
        cursor = pos + 6
        context = words[cursor:cursor + n_context].tolist()
        cursor += n_context
        endings = []
        for _ in range(NUM_ENDINGS):
            length = int(words[cursor]) if cursor < end else 0
            if length < 1 or cursor + 1 + length > end:
                raise HellaSwagError(f"{where}: its lengths do not add up to its size of {nbytes} bytes")
            endings.append(words[cursor + 1:cursor + 1 + length].tolist())
            cursor += 1 + length
        if cursor != end:
            raise HellaSwagError(f"{where}: its lengths do not add up to its size of {nbytes} bytes")
        examples.append(Example(i, int(label), context, endings))
        pos = end
    if pos != len(words):
        raise HellaSwagError(f"{path}: {2 * (len(words) - pos)} bytes after the last of {count} examples")
    return examples


def load_examples(path, tokenizer=None):
    """Examples from llm.c's eval file (.bin) or HellaSwag's .jsonl (tokenized here)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such HellaSwag file (a .jsonl, or llm.c's .bin from "
                                f"python -m nanollm.prepare hellaswag FILE.jsonl)")
    if path.endswith((".jsonl", ".json")):
        return read_jsonl(path, tokenizer)
    return read_evalfile(path)


def check_fits(examples, B, T, vocab_size):
    """The batch and model can take these examples (llm.c's EvalLoader asserts): B >= 4, every
    context + ending < T, every token < vocab_size. Raises HellaSwagError saying what to change."""
    if B < NUM_ENDINGS:
        raise HellaSwagError(f"batch size {B} < {NUM_ENDINGS}: each example takes {NUM_ENDINGS} rows")
    longest = max(examples, key=Example.longest_row)
    if longest.longest_row() >= T:
        raise HellaSwagError(f"example {longest.index} is {longest.longest_row()} tokens (context + ending); "
                             f"needs T > {longest.longest_row()}, T is {T}")
    top = max(max(ex.context + [t for e in ex.endings for t in e]) for ex in examples)
    if top >= vocab_size:
        raise HellaSwagError(f"token id {top} is outside the model's vocabulary of {vocab_size}")


def required_seq_len(examples):
    """The smallest T that check_fits accepts."""
    return max(ex.longest_row() for ex in examples) + 1


# ---- scoring ------------------------------------------------------------------------------------

def rank_slice(num_examples, rank, world_size):
    """[start, end) of the examples rank scores: llm.c's evalloader_reset split."""
    per_rank = -(-num_examples // world_size)
    return min(per_rank * rank, num_examples), min(per_rank * (rank + 1), num_examples)


def pack(examples, B, T):
    """(inputs, targets, mask) (B, T) for up to B // 4 examples, as evalloader_next_example_: row
    4*i + j holds example i's context then ending j; mask marks the positions predicting the ending."""
    inputs = np.zeros((B, T), dtype=np.int32)
    targets = np.zeros((B, T), dtype=np.int32)
    mask = np.zeros((B, T), dtype=bool)
    for i, ex in enumerate(examples):
        n = len(ex.context)
        for j, ending in enumerate(ex.endings):
            row = NUM_ENDINGS * i + j
            inputs[row, :n] = ex.context
            inputs[row, n:n + len(ending)] = ending
            targets[row, n - 1:n - 1 + len(ending)] = ending
            mask[row, n - 1:n - 1 + len(ending)] = True
    return inputs, targets, mask


def score(losses, mask, count):
    """Per example of the batch: (mean loss per ending (4,), sum per ending (4,)), from the
    per-position losses (B, T) of a packed batch. argmin of the means is the prediction."""
    losses = np.asarray(losses, dtype=np.float64)
    out = []
    for i in range(count):
        rows = slice(NUM_ENDINGS * i, NUM_ENDINGS * (i + 1))
        sums = np.where(mask[rows], losses[rows], 0.0).sum(axis=1)
        out.append((sums / mask[rows].sum(axis=1), sums))
    return out


def local_sum(counts):
    """sum_counts for one process: the counts are already the total."""
    return counts


@dataclass
class Result:
    correct: int                 # acc_norm hits, all ranks
    total: int                   # examples scored, all ranks
    correct_sum: int = 0         # hellaswag.py's "acc" (lowest summed loss), all ranks
    predictions: list = field(default_factory=list)  # this rank's, one dict per example
    batches: int = 0             # forward passes this rank ran

    @property
    def accuracy(self):
        return self.correct / self.total if self.total else math.nan

    @property
    def accuracy_sum(self):
        return self.correct_sum / self.total if self.total else math.nan


def evaluate(position_losses, examples, B, T, rank=0, world_size=1, sum_counts=local_sum, on_batch=None):
    """Score examples. position_losses(inputs, targets) -> (B, T) per-position losses of one batch
    (GpuBackend/CpuBackend.position_losses). This rank scores its slice; sum_counts(array) must
    return the array summed over all ranks (local_sum for one process; an all-reduce under MPI);
    every rank must call it. on_batch(done, total) reports progress."""
    start, end = rank_slice(len(examples), rank, world_size)
    mine = examples[start:end]
    per_batch = B // NUM_ENDINGS
    if per_batch < 1:
        raise HellaSwagError(f"batch size {B} < {NUM_ENDINGS}: each example takes {NUM_ENDINGS} rows")
    result = Result(0, 0)
    num_batches = -(-len(mine) // per_batch)
    for b in range(num_batches):
        chunk = mine[b * per_batch:(b + 1) * per_batch]
        inputs, targets, mask = pack(chunk, B, T)
        losses = position_losses(inputs, targets)
        for ex, (means, sums) in zip(chunk, score(losses, mask, len(chunk))):
            pred, pred_sum = int(np.argmin(means)), int(np.argmin(sums))
            result.correct += pred == ex.label
            result.correct_sum += pred_sum == ex.label
            result.predictions.append({"index": ex.index, "label": ex.label, "pred": pred, "pred_sum": pred_sum,
                                       "losses": [float(x) for x in means]})
        result.batches += 1
        if on_batch:
            on_batch(b + 1, num_batches)
    totals = sum_counts(np.array([result.correct, result.correct_sum, len(mine)], dtype=np.int64))
    result.correct, result.correct_sum, result.total = (int(x) for x in totals)
    return result


# ---- python -m nanollm.prepare hellaswag FILE.jsonl ----------------------------------------------

def prepare_main(argv):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nanollm.prepare hellaswag",
        description="Tokenize HellaSwag's jsonl (e.g. hellaswag_val.jsonl from rowanz/hellaswag) into llm.c's "
                    "eval file (dev/data/hellaswag.py's hellaswag_val.bin), for -h 1 and python -m nanollm.eval.")
    parser.add_argument("jsonl", help="HellaSwag jsonl: ctx (or ctx_a, ctx_b), endings, label per line")
    parser.add_argument("-o", "--out", default=None, help="output .bin (default: data/NAME.bin for NAME.jsonl)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("data", os.path.splitext(os.path.basename(args.jsonl))[0] + ".bin")
    if os.path.abspath(out) == os.path.abspath(args.jsonl):
        print(f"error: -o {out} is the input file", file=sys.stderr)
        return 2
    try:
        if not args.jsonl.endswith((".jsonl", ".json")):
            raise HellaSwagError(f"{args.jsonl}: expected HellaSwag's .jsonl")
        examples = load_examples(args.jsonl)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        longest = write_evalfile(out, examples)
    except (HellaSwagError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(examples):,} examples ({os.path.getsize(out):,} bytes, longest {longest} bytes); "
          f"-h 1 needs -b >= {NUM_ENDINGS} and -t > {required_seq_len(examples) - 1}")
    return 0
