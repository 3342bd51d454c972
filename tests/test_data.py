"""Token shards and the data loaders (nanollm/data.py) against llm.c's dataloader.h semantics."""

import json
import os
import re

import numpy as np
import pytest

from nanollm.data import (HEADER_BYTES, SHARD_MAGIC, DataLoader, EvalLoader, ShardError,
                          ShuffleRNG, read_shard, read_shard_header, write_shard)


def make_shards(folder, sizes, offsets=None):
    """Shards whose token at position p of shard k is offsets[k] + p: a window's first input token
    tells which shard and position it came from."""
    offsets = offsets or [10000 * k for k in range(len(sizes))]
    paths = []
    for k, (offset, n) in enumerate(zip(offsets, sizes)):
        path = folder / f"toy_train_{k:06d}.bin"
        write_shard(path, np.arange(offset, offset + n))
        paths.append(path)
    return str(folder / "toy_train_*.bin"), paths


def batch_starts(loader, n):
    """First input token of each of the next n batches, after checking the batch's shape."""
    starts = []
    for _ in range(n):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.B, loader.T)
        assert x.dtype == y.dtype == np.int32
        # inputs and targets are one contiguous B*T+1 window, shifted by one
        np.testing.assert_array_equal(x.ravel()[1:], y.ravel()[:-1])
        np.testing.assert_array_equal(y.ravel() - x.ravel(), 1)
        starts.append(int(x[0, 0]))
    return starts


# ----------------------------------------------------------------------------
# shards


def test_shard_round_trip(tmp_path, rng):
    tokens = rng.integers(0, 50257, size=1234)
    tokens[:3] = [0, 50256, 65535]
    path = tmp_path / "a_train_000000.bin"
    write_shard(path, tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [SHARD_MAGIC, 1, tokens.size] and not header[3:].any()
    read = read_shard(path)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, tokens)
    assert read_shard_header(path) == tokens.size
    assert os.listdir(tmp_path) == ["a_train_000000.bin"]  # no temporary file left behind
    write_shard(path, tokens[:10])  # overwriting replaces the file whole
    np.testing.assert_array_equal(read_shard(path), tokens[:10])


@pytest.mark.parametrize("tokens, error", [([], ValueError), ([1, 70000], ValueError),
                                           ([-1, 3], ValueError), ([[1, 2]], ValueError),
                                           ([1.5], TypeError)])
def test_write_shard_rejects_bad_tokens(tmp_path, tokens, error):
    path = tmp_path / "bad.bin"
    with pytest.raises(error, match=re.escape(str(path))):
        write_shard(path, np.array(tokens))
    assert os.listdir(tmp_path) == []


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = np.int32(20240326).tobytes()  # llm.c's model-file magic
    elif how == "version":
        data[4:8] = np.int32(7).tobytes()  # llm.c's llama-3 (uint32) version
    elif how == "truncated":
        data = data[:-1]
    elif how == "too long":
        data += b"\0\0"
    elif how == "no header":
        data = data[:100]
    elif how == "zero tokens":
        data = data[:HEADER_BYTES]
        data[8:12] = np.int32(0).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("magic", "bad magic"), ("version", "bad version"),
                                          ("truncated", "truncated"), ("too long", "too long"),
                                          ("no header", "truncated"),
                                          ("zero tokens", "0 tokens")])
def test_bad_shard_errors_name_the_file(tmp_path, how, message):
    pattern, paths = make_shards(tmp_path, [500, 500])
    corrupt(paths[1], how)
    for call in (lambda: read_shard(paths[1]), lambda: DataLoader(pattern, 2, 4)):
        with pytest.raises(ShardError, match=re.escape(str(paths[1]))) as info:
            call()
        assert message in str(info.value)


def test_no_file_matches(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        DataLoader(pattern, 2, 4)


def test_shard_too_small_for_batch(tmp_path):
    # B*T*world_size+1 = 2*4*2+1 = 17 tokens needed; the second shard has 16
    pattern, paths = make_shards(tmp_path, [17, 16])
    DataLoader(pattern, 2, 4, rank=0, world_size=1)
    with pytest.raises(ShardError, match=re.escape(f"{paths[1]}: 16 tokens, fewer than B*T*")):
        DataLoader(pattern, 2, 4, rank=1, world_size=2)


# ----------------------------------------------------------------------------
# loader


def test_unshuffled_batches_are_consecutive_windows(tmp_path):
    B, T = 2, 3
    # (ntok-1)//(B*T) samples: 50 -> 8, 20 -> 3
    pattern, _ = make_shards(tmp_path, [50, 20])
    loader = DataLoader(pattern, B, T, shuffle=False)
    assert loader.num_tokens == 70 and loader.shard_num_samples == [8, 3]
    shard0 = [6 * i for i in range(8)]
    shard1 = [10000 + 6 * i for i in range(3)]
    assert batch_starts(loader, 2 * 11 + 3) == shard0 + shard1 + shard0 + shard1 + shard0[:3]
    assert loader.epoch == 2
    loader.reset()
    assert batch_starts(loader, 2) == shard0[:2]


def test_ranks_read_disjoint_adjacent_windows(tmp_path):
    B, T, W = 2, 4, 3
    pattern, _ = make_shards(tmp_path, [200, 130])  # 8 and 5 samples of W*B*T = 24 tokens
    for shuffle in (False, True):
        loaders = [DataLoader(pattern, B, T, rank=r, world_size=W, shuffle=shuffle, seed=7)
                   for r in range(W)]
        steps = [batch_starts(loader, 13) for loader in loaders]  # one epoch
        for step in zip(*steps):  # the ranks together read one contiguous W*B*T+1 window
            assert [s - step[0] for s in step] == [r * B * T for r in range(W)]
        windows = sorted(s for rank_starts in steps for s in rank_starts)
        expected = sorted([24 * i + 8 * r for i in range(8) for r in range(W)]
                          + [10000 + 24 * i + 8 * r for i in range(5) for r in range(W)])
        assert windows == expected  # every window once, none shared by two ranks


def test_shuffle_is_a_reproducible_permutation_per_epoch(tmp_path):
    B, T = 2, 4
    pattern, _ = make_shards(tmp_path, [161, 81, 121])  # 20 + 10 + 15 samples
    everything = sorted([8 * i for i in range(20)] + [10000 + 8 * i for i in range(10)]
                        + [20000 + 8 * i for i in range(15)])
    loader = DataLoader(pattern, B, T, seed=1337)
    epochs = [batch_starts(loader, 45) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == everything
        # each shard is read whole before the next one starts
        shards = [s // 10000 for s in epoch]
        assert sorted(set(shards)) == [0, 1, 2]
        assert sum(a != b for a, b in zip(shards, shards[1:])) == 2
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != everything
    again = DataLoader(pattern, B, T, seed=1337)
    assert [batch_starts(again, 45) for _ in range(3)] == epochs
    other = DataLoader(pattern, B, T, seed=1338)
    assert batch_starts(other, 45) != epochs[0]


# llm.c's dataloader.h compiled as a C program (train_gpt2.cu's rank-0 train loader: shuffle on,
# seed 42) over these three shards, B=4, T=8: first input token of batches 0..29 and 128..139
# (epoch 0 holds 24 + 73 + 31 = 128 samples).
LLMC_FIRST = [20320, 20416, 20480, 20256, 20288, 20032, 20384, 20224, 20448, 20160, 20608, 20096,
              20352, 20576, 20512, 20704, 20640, 20736, 20192, 20000, 20544, 20064, 20672, 20128,
              10896, 10320, 10480, 11024, 11280, 11760]
LLMC_EPOCH1 = [20320, 20736, 20032, 20480, 20096, 20512, 20384, 20416, 20640, 20288, 20160, 20672]


def test_shuffle_matches_llmc(tmp_path):
    pattern, _ = make_shards(tmp_path, [1000, 2345, 777])
    starts = batch_starts(DataLoader(pattern, 4, 8, seed=42), 140)
    assert starts[:30] == LLMC_FIRST
    assert starts[128:] == LLMC_EPOCH1


def test_mersenne_twister_matches_llmc():
    # the sequence in llm.c's llmc/rand.h header comment for manual_seed(137)
    rng = ShuffleRNG(137)
    assert rng.randint32(5).tolist() == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("skip", [0, 7, 20, 29, 30, 31, 64, 95])
def test_state_resumes_to_the_same_next_batch(tmp_path, shuffle, skip):
    # 20 + 10 samples an epoch: skips land mid-shard, at shard ends, on and past epoch ends
    B, T = 2, 4
    pattern, _ = make_shards(tmp_path, [161, 81])
    loader = DataLoader(pattern, B, T, shuffle=shuffle, seed=3)
    batch_starts(loader, skip)
    state = json.loads(json.dumps(loader.state()))  # as a checkpoint would store it
    expected = batch_starts(loader, 70)
    resumed = DataLoader(pattern, B, T, shuffle=shuffle, seed=3)
    batch_starts(resumed, 5)  # wherever it stands, load_state moves it
    resumed.load_state(state)
    assert resumed.epoch == state["epoch"]
    assert batch_starts(resumed, 70) == expected


def test_state_survives_explicit_resets(tmp_path):
    pattern, _ = make_shards(tmp_path, [161, 81])
    loader = DataLoader(pattern, 2, 4, seed=5)
    batch_starts(loader, 12)
    loader.reset()  # a mid-epoch reset draws a new shard order from the running generator
    batch_starts(loader, 3)
    state = loader.state()
    expected = batch_starts(loader, 40)
    resumed = DataLoader(pattern, 2, 4, seed=5)
    resumed.load_state(state)
    assert batch_starts(resumed, 40) == expected


def test_state_must_fit_the_loader(tmp_path):
    pattern, _ = make_shards(tmp_path, [161, 81])
    state = DataLoader(pattern, 2, 4, seed=5).state()
    with pytest.raises(ValueError, match="B is 2 in the state, 4 here"):
        DataLoader(pattern, 4, 4, seed=5).load_state(state)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(pattern, 2, 4, seed=6).load_state(state)


def test_state_of_another_rank_count(tmp_path):
    """A job resumed on other ranks: with B*world_size unchanged the global batches continue
    exactly; otherwise the loader goes on from the next shard of the saved order."""
    pattern, _ = make_shards(tmp_path, [161, 97, 81])
    ranks = [DataLoader(pattern, 2, 4, rank=r, world_size=2, seed=5) for r in range(2)]
    for loader in ranks:
        batch_starts(loader, 4)  # mid-shard
    state = json.loads(json.dumps(ranks[0].state()))
    two_ranks = [batch_starts(loader, 12) for loader in ranks]
    one = DataLoader(pattern, 4, 4, rank=0, world_size=1, seed=5)
    assert one.load_state(state) is False
    assert batch_starts(one, 12) == two_ranks[0]  # rank 0's window starts each global batch
    smaller = DataLoader(pattern, 2, 4, rank=0, world_size=1, seed=5)
    assert smaller.load_state(state) is True and smaller.skipped_rest_of_shard
    assert (smaller.shard_idx, smaller.sample_idx) == (state["shard_idx"], smaller.num_samples)
    next_shard = state["shard_order"][state["shard_idx"] + 1]
    assert {start // 10000 for start in batch_starts(smaller, 5)} == {next_shard}
    with pytest.raises(ValueError, match="T is 4 in the state, 8 here"):
        DataLoader(pattern, 1, 8, world_size=1, seed=5).load_state(state)


def test_eval_loader(tmp_path):
    B, T = 2, 4
    pattern, _ = make_shards(tmp_path, [41, 17])  # 5 + 2 batches
    assert len(EvalLoader(pattern, B, T)) == 7
    assert len(EvalLoader(pattern, B, T, max_batches=100)) == 7
    val = EvalLoader(pattern, B, T, max_batches=6)
    first = [int(x[0, 0]) for x, _ in val]
    assert first == [0, 8, 16, 24, 32, 10000]
    assert [int(x[0, 0]) for x, _ in val] == first  # every evaluation sees the same batches
    rank1 = EvalLoader(pattern, 1, 4, rank=1, world_size=2, max_batches=2)
    assert [int(x[0, 0]) for x, _ in rank1] == [4, 12]
