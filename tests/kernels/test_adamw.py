"""AdamW (fp32 master weights, stochastic rounding to bf16) against the numpy reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import adamw
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

from .helpers import poisoned_f32

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def squirrel_noise5(position, seed):
    """Host twin of bf16.squirrel_noise5 (uint32 arithmetic wraps in numpy arrays as on the GPU)."""
    bits = np.asarray(position, dtype=np.uint64).astype(np.uint32)
    bits = bits * np.uint32(0xD2A80A3F)
    bits = bits + np.uint32(seed)
    bits ^= bits >> np.uint32(9)
    bits = bits + np.uint32(0xA884F197)
    bits ^= bits >> np.uint32(11)
    bits = bits * np.uint32(0x6C736F4B)
    bits ^= bits >> np.uint32(13)
    bits = bits + np.uint32(0xB79F3ABB)
    bits ^= bits >> np.uint32(15)
    bits = bits * np.uint32(0x1B56C4F5)
    bits ^= bits >> np.uint32(17)
    return bits


def stochastic_round_host(master, positions, seed):
    """The bf16 bits float_to_bf16_stochastic gives for fp32 values at the given element indices."""
    u = master.astype(np.float32).view(np.uint32)
    up = (u & np.uint32(0xFFFF)) > (squirrel_noise5(positions, seed) & np.uint32(0xFFFF))
    return np.where(up, to_bf16_bits((u | np.uint32(0xFFFF)).view(np.float32)), (u >> np.uint32(16)).astype(np.uint16))


class State:
    """Random parameters, gradients and optimizer state (as a few steps in would have), on the
    host in float64 (exact fp32 / bf16 values) and on the device."""

    def __init__(self, rng, n, n_state=None):
        n_state = n if n_state is None else n_state
        self.params_bits = to_bf16_bits(rng.standard_normal(n).astype(np.float32))
        self.grads_bits = to_bf16_bits(rng.standard_normal(n).astype(np.float32) * np.float32(0.1))
        self.master = rng.standard_normal(n_state).astype(np.float32)
        self.m = (rng.standard_normal(n_state) * 0.01).astype(np.float32)
        self.v = (rng.random(n_state) * 1e-3).astype(np.float32)
        self.device = [cuda.to_device(a) for a in (self.params_bits, self.grads_bits, self.master, self.m, self.v)]

    def download(self):
        params, _, master, m, v = self.device
        return params.copy_to_host(), master.copy_to_host(), m.copy_to_host(), v.copy_to_host()


def check_update(state, offset, count, state_offset, step, weight_decay, grad_scale, seed):
    """Compare the range's fp32 state with the float64 reference and the bf16 params bit for bit
    with the host twin of stochastic rounding; everything outside the range unchanged."""
    params, master, m, v = state.download()
    rng_p = slice(offset, offset + count)
    rng_s = slice(state_offset, state_offset + count)
    ref_master, ref_m, ref_v = (a[rng_s].astype(np.float64) for a in (state.master, state.m, state.v))
    grad = from_bf16_bits(state.grads_bits[rng_p]).astype(np.float64)
    reference.adamw_update(ref_master, grad, ref_m, ref_v, step, weight_decay=weight_decay, grad_scale=grad_scale,
                           **HYPER)
    # fp32 arithmetic against float64: a few fp32 ulps of each value (updates are ~lr-sized, 1e-3);
    # m = 0.9 m + 0.1 g can cancel, so its error is ulps of the ~0.03-sized terms (~2e-9 each)
    np.testing.assert_allclose(m[rng_s], ref_m, rtol=1e-5, atol=2e-8)
    np.testing.assert_allclose(v[rng_s], ref_v, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(master[rng_s], ref_master, rtol=1e-6, atol=1e-7)
    # bf16 params: the master weight rounded down or up (within one bf16 ulp), exactly as the
    # stochastic rounding keyed on the element's index in params decides
    truncated = (master[rng_s].view(np.uint32) >> np.uint32(16)).astype(np.int64)
    assert np.all(np.isin(params[rng_p].astype(np.int64) - truncated, (0, 1)))
    expected = stochastic_round_host(master[rng_s], np.arange(offset, offset + count), seed)
    np.testing.assert_array_equal(params[rng_p], expected)
    # outside the range nothing moved
    outside_p = np.ones(params.size, bool)
    outside_p[rng_p] = False
    outside_s = np.ones(master.size, bool)
    outside_s[rng_s] = False
    np.testing.assert_array_equal(params[outside_p], state.params_bits[outside_p])
    for after, before in ((master, state.master), (m, state.m), (v, state.v)):
        np.testing.assert_array_equal(after[outside_s], before[outside_s])


CASES = [  # n, n_state, offset, count, state_offset, block_size
    pytest.param(1000, None, 0, None, None, 64, id="whole"),
    pytest.param(1031, None, 5, 1021, None, 64, id="unaligned-head-and-tail"),
    pytest.param(1030, 300, 518, 300, 0, 32, id="zero1-shard"),  # state holds only the shard
    pytest.param(1030, 301, 517, 300, 0, 32, id="parity-mismatch"),  # cannot align: scalar path
    pytest.param(3, None, 0, None, None, 32, id="three-elements"),
    pytest.param(2**24 + 7, None, 0, None, None, 512, id="gpt2-chunk", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("n, n_state, offset, count, state_offset, block_size", CASES)
def test_adamw_update(rng, n, n_state, offset, count, state_offset, block_size):
    state = State(rng, n, n_state)
    count = n - offset if count is None else count
    state_offset = offset if state_offset is None else state_offset
    step, weight_decay, grad_scale, seed = int(rng.integers(1, 100)), 0.1, 0.7, int(rng.integers(2**32))
    adamw.adamw_update(*state.device, step, weight_decay=weight_decay, grad_scale=grad_scale, seed=seed,
                       offset=offset, count=count, state_offset=state_offset, block_size=block_size, **HYPER)
    check_update(state, offset, count, state_offset, step, weight_decay, grad_scale, seed)


def test_adamw_same_bits_whole_or_in_pieces(rng):
    # per tensor, per shard or all at once: the same numbers (rounding keyed on the element index)
    n, seed = 1032, int(rng.integers(2**32))
    whole, pieces = State(rng, n), State(rng, n)
    for source, target in zip(whole.device, pieces.device):
        target.copy_to_device(source)
    adamw.adamw_update(*whole.device, 3, seed=seed, block_size=64, **HYPER)
    for start, stop in ((0, 517), (517, 520), (520, n)):
        adamw.adamw_update(*pieces.device, 3, seed=seed, offset=start, count=stop - start, block_size=64, **HYPER)
    for a, b in zip(whole.download(), pieces.download()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("offset, count, stride", [(8, 52, 200), (9, 50, 201)], ids=["words", "scalar"])
def test_adamw_slices_in_one_launch_match_one_launch_each(rng, offset, count, stride):
    # ZeRO-1's shard of a stacked tensor: one run per layer, `stride` apart; the state packed
    n, slices, seed = 1000, 3, int(rng.integers(2**32))
    sliced, each = State(rng, n, slices * count), State(rng, n, slices * count)
    for source, target in zip(sliced.device, each.device):
        target.copy_to_device(source)
    adamw.adamw_update(*sliced.device, 3, seed=seed, offset=offset, count=count, state_offset=0, slices=slices,
                       stride=stride, state_stride=count, block_size=32, weight_decay=0.1, **HYPER)
    for s in range(slices):
        adamw.adamw_update(*each.device, 3, seed=seed, offset=offset + s * stride, count=count,
                           state_offset=s * count, block_size=32, weight_decay=0.1, **HYPER)
    for a, b in zip(sliced.download(), each.download()):
        np.testing.assert_array_equal(a, b)
    params = sliced.download()[0]
    changed = np.flatnonzero(params != sliced.params_bits)
    assert changed.size > 0.9 * slices * count and all((changed - offset) % stride < count)


def test_init_master_weights(rng):
    bits = to_bf16_bits(rng.standard_normal(1030).astype(np.float32))
    master = poisoned_f32(1030)
    adamw.init_master_weights(master, cuda.to_device(bits), block_size=64)
    np.testing.assert_array_equal(master.copy_to_host(), from_bf16_bits(bits))
    shard = poisoned_f32(100)
    adamw.init_master_weights(shard, cuda.to_device(bits), offset=501, count=100, state_offset=0, block_size=64)
    np.testing.assert_array_equal(shard.copy_to_host(), from_bf16_bits(bits[501:601]))


def test_adamw_rejects_bad_input(rng):
    state = State(rng, 64)
    params, grads, master, m, v = state.device
    with pytest.raises(TypeError, match="grads"):
        adamw.adamw_update(params, master, master, m, v, 1, 1e-3)
    with pytest.raises(TypeError, match="master"):
        adamw.adamw_update(params, grads, grads, m, v, 1, 1e-3)
    with pytest.raises(ValueError, match="state sizes differ"):
        adamw.adamw_update(params, grads, master, cuda.to_device(np.zeros(63, np.float32)), v, 1, 1e-3)
    with pytest.raises(ValueError, match="outside"):
        adamw.adamw_update(params, grads, master, m, v, 1, 1e-3, offset=60, count=8)
    with pytest.raises(ValueError, match="step"):
        adamw.adamw_update(params, grads, master, m, v, 0, 1e-3)


@pytest.mark.parametrize("words_per_thread", [1, 3, adamw.MULTI_TENSOR_WORDS_PER_THREAD])
def test_multi_tensor_update_is_the_per_tensor_update_bit_for_bit(rng, words_per_thread):
    """One launch over several ranges, its step values read from device memory, gives the bits of
    one adamw_update call per range (weight decay on some, seed base + index, the clip scale),
    ranges with tails and the gaps between ranges (left alone) included, however many words each
    thread takes (3: a range of 100 words is one whole block and part of another)."""
    n = 1100
    ranges = [(0, 256, 0, True, 0), (256, 37, 256, False, 1), (296, 400, 296, True, 2), (700, 3, 700, False, 3),
              (712, 385, 712, True, 5)]  # (offset, count, state_offset, decay, seed index); 293-295, 703-711 untouched
    per_tensor, multi = State(rng, n), State(rng, n)
    for source, target in zip(per_tensor.device, multi.device):
        target.copy_to_device(source)
    step, lr, weight_decay, grad_scale = int(rng.integers(1, 50)), 3e-3, 0.1, np.float32(rng.random())
    base = int(rng.integers(2**32 - 3, 2**32))  # base + index wraps past 2^32 as the host's & 0xFFFFFFFF does
    for offset, count, state_offset, decay, index in ranges:
        adamw.adamw_update(*per_tensor.device, step, lr, weight_decay=weight_decay if decay else 0.0,
                           grad_scale=grad_scale, seed=(base + index) & 0xFFFFFFFF, offset=offset, count=count,
                           state_offset=state_offset, block_size=32)
    launch = adamw.prepare_adamw_multi_tensor(*multi.device, ranges, block_size=32, words_per_thread=words_per_thread)
    hyper = cuda.to_device(adamw.adamw_hyperparameters(step, lr, weight_decay=weight_decay, seed=base))
    launch(hyper, cuda.to_device(np.array([grad_scale], np.float32)))
    for name, a, b in zip(("params", "master", "m", "v"), per_tensor.download(), multi.download()):
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b, err_msg=name)
    # and against the float64 reference (not only self-consistency): one decayed range with a tail
    fresh = State(rng, n)
    offset, count, state_offset, _, index = ranges[4]
    launch = adamw.prepare_adamw_multi_tensor(*fresh.device, [ranges[4]], block_size=32,
                                              words_per_thread=words_per_thread)
    launch(cuda.to_device(adamw.adamw_hyperparameters(step, weight_decay=weight_decay, seed=base, **HYPER)),
           cuda.to_device(np.array([0.7], np.float32)))
    check_update(fresh, offset, count, state_offset, step, weight_decay, 0.7, (base + index) & 0xFFFFFFFF)


def test_multi_tensor_rejects_unaligned_ranges(rng):
    state = State(rng, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        adamw.prepare_adamw_multi_tensor(*state.device, [(2, 8, 2, True, 0)])
    with pytest.raises(ValueError, match="outside"):
        adamw.prepare_adamw_multi_tensor(*state.device, [(60, 8, 60, True, 0)])
    with pytest.raises(ValueError, match="no ranges"):
        adamw.prepare_adamw_multi_tensor(*state.device, [])


def test_round_master_weights_is_host_rounding_then_init_master_weights(rng):
    """Loading fp32 weights through the master copy gives the bf16 bits of the host's to_bf16_bits
    (nearest even; inf and NaN included) and master weights equal to those bf16 values, only in range."""
    values = rng.standard_normal(1030).astype(np.float32) * np.float32(3)
    values[[3, 500, 700]] = np.inf, -np.inf, np.nan
    values[[4, 5]] = np.float32(3.4e38), np.float32(-1e-40)  # rounds up to inf; a denormal
    params = cuda.to_device(np.full(1030, 0xFFFF, np.uint16))
    master = cuda.to_device(values)
    adamw.round_master_weights(params, master, offset=2, count=1020, state_offset=2, block_size=64)
    expected = to_bf16_bits(values[2:1022])
    got_params, got_master = params.copy_to_host(), master.copy_to_host()
    np.testing.assert_array_equal(got_params[2:1022], expected)
    np.testing.assert_array_equal(got_master[2:1022].view(np.uint32), from_bf16_bits(expected).view(np.uint32))
    assert (got_params[[0, 1, 1022, 1029]] == 0xFFFF).all()  # outside the range: untouched
    np.testing.assert_array_equal(got_master[[0, 1, 1022]], values[[0, 1, 1022]])
