"""Token shards in llm.c's format, and the data loaders that serve (B, T) batches from them.

After llm.c's llmc/dataloader.h (DataLoader) and dev/data/data_common.py (write_datafile).

A shard is a 256 x int32 header ([0]=20240520 magic, [1]=1 version, [2]=ntok), then ntok uint16
tokens; the file is exactly 1024 + 2*ntok bytes. Each batch is B*T+1 contiguous tokens: inputs are
the first B*T, targets the last B*T (the same tokens shifted by one).

Sampling is llm.c's: a shard holds (ntok-1) // (world_size*B*T) samples; sample i of a shard starts
at token i*world_size*B*T, and rank r reads the B*T+1 tokens from r*B*T within it, so at every
step the ranks read adjacent, disjoint windows. With shuffle on, each epoch permutes the shard order
(in place, compounding, as llm.c does) and each shard's sample order, with llm.c's Mersenne Twister
and Fisher-Yates loop: on one process the batches are the same as llm.c's, batch for batch.
"""

import glob
import os

import numpy as np

from .atomic import atomic_write_with

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2  # uint16: GPT-2's 50,257 token ids fit
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 count


class ShardError(ValueError):
    """A token shard that is not in llm.c's format, or too small for the batch."""


# ----------------------------------------------------------------------------
# shards


def atomic_write(path, chunks):
    """Write `chunks` (bytes-like objects) to `path` atomically (nanollm.atomic)."""
    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    atomic_write_with(path, write)


def write_shard(path, tokens):
    """Write tokens (any integer sequence, values in [0, 65535]) as an llm.c token shard.

    Atomic (see atomic_write): a crash leaves the old file or the whole new one, never a torn shard.
    """
    path = os.fspath(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError(f"{path}: no tokens to write (llm.c's loader rejects an empty shard)")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {tokens.size:,} tokens do not fit the int32 count in the header")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"{path}: tokens must be integers, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > 0xFFFF:
            raise ValueError(f"{path}: token ids must be in [0, 65535] for uint16, "
                             f"got [{lo}, {hi}]")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size

    atomic_write(path, [header.tobytes(), np.ascontiguousarray(tokens, dtype="<u2")])


def read_shard_header(path):
    """Validate a shard's header and size against each other; return its token count."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    if file_size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {file_size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header of a token shard")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {SHARD_MAGIC}): not an "
                         f"llm.c token shard, or from an older data preparation; re-run it")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: bad version {int(header[1])} (expected {SHARD_VERSION}, "
                         f"uint16 GPT-2 tokens)")
    ntok = int(header[2])
    if ntok <= 0:
        raise ShardError(f"{path}: header counts {ntok} tokens; a shard holds at least one")
    expected = HEADER_BYTES + TOKEN_BYTES * ntok
    if file_size != expected:
        kind = "truncated" if file_size < expected else "too long"
        raise ShardError(f"{path}: {kind}: {file_size:,} bytes, but the header's {ntok:,} tokens "
                         f"make {expected:,}")
    return ntok


def read_shard(path):
    """The tokens of a validated shard: a read-only (ntok,) uint16 memmap."""
    ntok = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


# ----------------------------------------------------------------------------
# llm.c's random numbers (llmc/rand.h): MT19937 seeded as manual_seed does, which is the
# standard init_genrand, so numpy's MT19937 bit generator gives the same 32-bit stream.


def _mt19937_key(seed):
    key = np.empty(624, dtype=np.uint32)
    key[0] = seed & 0xFFFFFFFF
    for j in range(1, 624):
        prev = int(key[j - 1])
        key[j] = (1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF
    return key


class ShuffleRNG:
    """llm.c's mt19937_state: randint32 stream, random_permutation, and a saveable state."""

    def __init__(self, seed):
        self.bitgen = np.random.MT19937()
        # pos 624: the first draw twists the state first, as llm.c's left_ = 1 does
        self.set_state(_mt19937_key(seed), 624)

    def get_state(self):
        s = self.bitgen.state["state"]
        return [int(k) for k in s["key"]], int(s["pos"])

    def set_state(self, key, pos):
        key = np.asarray(key, dtype=np.uint32)
        if key.shape != (624,) or not 0 <= int(pos) <= 624:
            raise ValueError("a Mersenne Twister state is 624 uint32 words and a position "
                             "in [0, 624]")
        self.bitgen.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": int(pos)}}

    def randint32(self, n):
        return self.bitgen.random_raw(n).astype(np.uint64)

    def permute(self, data):
        """llm.c's random_permutation, in place: for i = n-1 .. 1, swap data[i] and data[j],
        j = randint32 % (i+1). The swaps are sequential; only the j's are vectorised."""
        n = len(data)
        if n < 2:
            return data
        bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i+1 for i = n-1 .. 1
        js = (self.randint32(n - 1) % bounds).tolist()
        for i, j in zip(range(n - 1, 0, -1), js):
            data[i], data[j] = data[j], data[i]
        return data


# ----------------------------------------------------------------------------
# loaders


class DataLoader:
    """Serves (x, y) batches, each (B, T) int32, from the shards matching a glob pattern.

    As llm.c's DataLoader: shards are the sorted glob matches, all validated up front; rank r of
    world_size reads its B*T+1-token slice of each (world_size*B*T)-token sample; when a shard's
    samples are used up the next shard is loaded, and after the last shard a new epoch starts.

    One deliberate difference: llm.c seeds the shuffle with 42 + rank, so each rank walks the
    shards in its own order. Here every rank uses the same seed (default 42, llm.c's rank-0 seed),
    so all ranks are on the same shard and sample at every step (the global batch is one
    contiguous world_size*B*T+1 window, as in the unshuffled case) and one state() describes the
    whole job, which is what a checkpoint needs. A single process is batch-for-batch llm.c
    (checked against llm.c's dataloader.h compiled as C); seed=42+rank gives each rank
    llm.c's multi-process order exactly.
    """

    def __init__(self, pattern, B, T, rank=0, world_size=1, shuffle=True, seed=42):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.pattern = os.fspath(pattern)
        self.B, self.T = B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        # tokens between consecutive samples: every rank's B*T
        self.sample_stride = world_size * B * T

        self.files = sorted(glob.glob(self.pattern))
        if not self.files:
            raise FileNotFoundError(f"no file matches the pattern {self.pattern!r}")
        self.shard_num_tokens = []
        for path in self.files:
            ntok = read_shard_header(path)
            # llm.c asserts this: one sample per shard at least, with its one extra target token
            if ntok < self.sample_stride + 1:
                raise ShardError(
                    f"{path}: {ntok:,} tokens, fewer than B*T*world_size+1 = "
                    f"{B}*{T}*{world_size}+1 = {self.sample_stride + 1:,} needed for one batch")
            self.shard_num_tokens.append(ntok)
        self.num_tokens = sum(self.shard_num_tokens)
        # -1: a sample takes B*T+1 tokens but the next starts B*T (per rank) further on
        self.shard_num_samples = [(n - 1) // self.sample_stride for n in self.shard_num_tokens]

        self.rng = ShuffleRNG(self.seed)
        self.shard_order = list(range(len(self.files)))
        self.epoch = -1
        self.skipped_rest_of_shard = False  # set by load_state
        self.tokens = None
        self.reset()

    # llm.c: dataloader_reset. A new pass over the data: with shuffle on, the shard order is
    # permuted again from the generator's current state (reset does not re-seed, as in llm.c).
    def reset(self):
        self.epoch += 1
        self.shard_idx = 0
        self.sample_idx = 0
        if self.shuffle:
            self.rng.permute(self.shard_order)
        self._load_shard()

    def _load_shard(self):
        self.file_idx = self.shard_order[self.shard_idx]
        # the generator as it stands before this shard's sample order is drawn: state() saves it
        self._shard_rng_state = self.rng.get_state()
        self.tokens = read_shard(self.files[self.file_idx])
        self.num_samples = self.shard_num_samples[self.file_idx]
        self.sample_order = None
        if self.shuffle:
            self.sample_order = self.rng.permute(list(range(self.num_samples)))

    def _advance(self):
        if self.shard_idx == len(self.files) - 1:
            self.reset()
        else:
            self.shard_idx += 1
            self.sample_idx = 0
            self._load_shard()

    def next_batch(self):
        """The next (x, y): x (B,T) int32 inputs, y (B,T) int32 targets (x shifted by one)."""
        if self.sample_idx >= self.num_samples:
            self._advance()
        sample = self.sample_order[self.sample_idx] if self.shuffle else self.sample_idx
        start = sample * self.sample_stride + self.rank * self.B * self.T
        buf = np.asarray(self.tokens[start:start + self.B * self.T + 1], dtype=np.int32)
        self.sample_idx += 1
        self.inputs = buf[:-1].reshape(self.B, self.T)
        self.targets = buf[1:].reshape(self.B, self.T)
        return self.inputs, self.targets

    # ------------------------------------------------------------------------
    # checkpointing

    def state(self):
        """Where the loader stands, as plain ints and int lists (for HDF5 attributes or JSON).

        epoch, shard_idx (position in this epoch's shard order), sample_idx (next sample in that
        shard) and seed locate the next batch; shard_order and the generator's state as it was
        before this shard's sample order was drawn make the order itself exact, however many
        epochs or resets came before. The same on every rank.
        """
        key, pos = self._shard_rng_state
        return {
            "epoch": self.epoch,
            "shard_idx": self.shard_idx,
            "sample_idx": self.sample_idx,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "shard_order": list(self.shard_order),
            "rng_key": key,
            "rng_pos": pos,
            # to catch a resume with other data or another batch layout
            "num_shards": len(self.files),
            "num_tokens": self.num_tokens,
            "B": self.B,
            "T": self.T,
            "world_size": self.world_size,
        }

    def load_state(self, state):
        """Resume from state(): the next batch is the one the saved loader would have served.

        A state saved by another number of ranks (a job resumed on more or fewer GPUs) loads too.
        With the same B*T*world_size (e.g. 2 ranks at B=8 -> 1 rank at B=16) every sample is the
        same window, so the batches continue exactly. Otherwise the shard's samples are cut
        differently and the ones not yet served cannot be told apart, so the loader goes on with
        the next shard in the saved order (self.skipped_rest_of_shard says so): no token is
        served twice in an epoch, and the rest of that shard waits for the next epoch.
        Returns self.skipped_rest_of_shard."""
        expected = {"seed": self.seed, "shuffle": int(self.shuffle), "num_shards": len(self.files),
                    "num_tokens": self.num_tokens, "T": self.T}
        relayout = int(state["world_size"]) != self.world_size
        if not relayout:  # the same job shape: the batch must be the same too
            expected.update(B=self.B, world_size=self.world_size)
        for name, value in expected.items():
            if int(state[name]) != value:
                raise ValueError(f"loader state does not fit this loader ({self.pattern!r}): "
                                 f"{name} is {int(state[name])} in the state, {value} here")
        shard_order = [int(i) for i in state["shard_order"]]
        if sorted(shard_order) != list(range(len(self.files))):
            raise ValueError(f"loader state: shard_order {shard_order} is not a permutation")
        shard_idx, sample_idx = int(state["shard_idx"]), int(state["sample_idx"])
        if not 0 <= shard_idx < len(self.files):
            raise ValueError(f"loader state: shard_idx {shard_idx} out of range")
        self.epoch = int(state["epoch"])
        self.shard_order = shard_order
        self.shard_idx = shard_idx
        self.rng.set_state(state["rng_key"], int(state["rng_pos"]))
        self._load_shard()  # redraws this shard's sample order, leaving the generator as it was
        same_windows = int(state["B"]) * int(state["world_size"]) == self.B * self.world_size
        self.skipped_rest_of_shard = relayout and not same_windows
        if self.skipped_rest_of_shard:
            sample_idx = self.num_samples  # used up: the next batch starts the next shard
        if not 0 <= sample_idx <= self.num_samples:
            raise ValueError(f"loader state: sample_idx {sample_idx} is not in "
                             f"[0, {self.num_samples}] for {self.files[self.file_idx]}")
        self.sample_idx = sample_idx
        return self.skipped_rest_of_shard


class EvalLoader:
    """Validation batches as llm.c's train_gpt2.cu takes them: an unshuffled DataLoader, reset
    before each evaluation, the same first num_batches batches every time.

    max_batches=-1 means every batch the shards hold (llm.c: val_max_steps -1). Unlike llm.c,
    a larger max_batches is capped at that count, so no validation token is counted twice.
    (llm.c's own EvalLoader is the HellaSwag multiple-choice reader; that is not this.)
    """

    def __init__(self, pattern, B, T, rank=0, world_size=1, max_batches=-1):
        self.loader = DataLoader(pattern, B, T, rank, world_size, shuffle=False)
        available = sum(self.loader.shard_num_samples)
        self.num_batches = available if max_batches < 0 else min(max_batches, available)

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        self.loader.reset()
        for _ in range(self.num_batches):
            yield self.loader.next_batch()
