"""The GPU model (nanollm.model.GPT2) against the numpy reference: one training step's logits,
loss and every gradient, then a few AdamW steps. On the CUDA simulator at a tiny config in CI;
`pytest -m gpu` also runs GPT-2 d12 shapes on a real GPU (see test_model_gpu.py for PyTorch)."""

import math

import numpy as np
import pytest

from nanollm import reference
from nanollm.config import GPT2Config
from nanollm.kernels.bf16 import bf16_ulps_apart, to_bf16_bits
from nanollm.model import GPT2

TINY = GPT2Config(max_seq_len=16, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)


def _reference_step(config, flat_params, tokens, targets):
    params = reference.ParameterTensors(config, np.float64)
    params.memory[:] = flat_params
    logits, loss, acts = reference.gpt2_forward(params, config, tokens, targets)
    grads = reference.ParameterTensors(config, np.float64)
    reference.gpt2_backward(grads, params, config, acts)
    return logits, loss, grads


# gelu_fusion 2: the backward's GELU in fcproj's DGELU epilogue; 1: in the fc bias gradient's pass.
# lm_head (chunks, GELU layers kept): None the default (at this size the lm head whole, -r 1's one
# GELU buffer); (3, 2) the lm head and classifier over blocks of 6, 6 and 4 rows, each block's
# lm-head backward in the forward, and both layers' GELU kept (none recomputed)
@pytest.mark.parametrize("gelu_fusion, lm_head", [(2, None), (1, None), (2, (3, 2))],
                         ids=["ge2", "ge1", "ge2-lm-head-in-3-chunks"])
def test_one_step_matches_reference(rng, gelu_fusion, lm_head):
    B, T = 2, 8
    model = GPT2(TINY, B, T, seed=int(rng.integers(1000)), gelu_fusion=gelu_fusion, lm_head=lm_head)
    assert (model.lm_chunks, model.gelu_kept) == (lm_head or (1, 1))
    tokens, targets = rng.integers(0, TINY.vocab_size, (2, B, T))
    model.forward(tokens)  # no targets: up to lnf; logits_at runs the row's lm head
    logits = np.stack([model.logits_at(b, t) for b in range(B) for t in (0, T - 1)])
    # one row's product and all rows' may add in other orders (numpy's stand-in takes another
    # routine for one row, cuBLASLt another algorithm), so a sum near a rounding boundary lands one
    # bf16 ulp away: seen once in CI, 1 of 388 values; a wrong row or column would be far off
    whole = model.logits_host()[:, (0, T - 1)].reshape(2 * B, -1)
    assert bf16_ulps_apart(to_bf16_bits(whole), to_bf16_bits(logits)) <= 1
    model.zero_grad()
    model.forward(tokens, targets)
    loss = model.losses()
    model.backward()
    # the reference runs in float64 on the very bf16 parameters the GPU model holds
    ref_logits, ref_loss, ref_grads = _reference_step(TINY, model.parameters().astype(np.float64), tokens, targets)
    # bf16 activations: ~8 bits of mantissa per stored tensor, a few roundings deep
    assert abs(loss - ref_loss) < 2e-2, (loss, ref_loss)
    expected = np.stack([ref_logits[b, t, :TINY.vocab_size] for b in range(B) for t in (0, T - 1)])
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 2e-2
    grads = reference.ParameterTensors(TINY, np.float64)
    grads.memory[:] = model.gradients()
    for name, expected in ref_grads.items():
        error = np.linalg.norm(grads[name] - expected) / max(np.linalg.norm(expected), 1e-12)
        assert error < 3e-2, f"{name}: relative error {error:.2e}"


def test_lm_head_plan_keeps_gelus_within_the_memory_of_one():
    """-r 1's chunked lm head: the logits buffer shrinks to one block of rows, and the top layers'
    GELU outputs it keeps (and the fp32 wte gradient) fit in what that frees: no more activation
    memory than the whole lm head with llm.c's one GELU buffer."""
    from nanollm.config import from_descriptor

    def activation_bytes(c, B, T, recompute, lm_head=None):
        bf16, fp32 = GPT2.activation_shapes(c, B, T, recompute, "cudnn", 1, norm_scratch_size=1, lm_head=lm_head)
        return 2 * sum(math.prod(s) for s in bf16.values()) + 4 * sum(math.prod(s) for s in fp32.values())

    for descriptor, B, expected in [("d12", 64, (4, 12)), ("d12", 32, (4, 12)), ("d12", 8, (4, 10)),
                                    ("d24", 32, (4, 9)), ("d48", 16, (4, 5))]:
        c = from_descriptor(descriptor)
        plan = GPT2.lm_head_plan(c, B, 1024, recompute=1, chunks=4)
        assert plan == expected, (descriptor, B, plan)
        assert GPT2.lm_head_plan(c, B, 1024, recompute=0, chunks=4) == (1, c.num_layers)
        assert GPT2.lm_head_plan(c, B, 1024, recompute=1, chunks=1) == (1, 1)
        whole = activation_bytes(c, B, 1024, 1, lm_head=(1, 1))
        assert activation_bytes(c, B, 1024, 1, lm_head=plan) <= whole
        # one more kept layer would not fit
        if plan[1] < c.num_layers:
            assert activation_bytes(c, B, 1024, 1, lm_head=(plan[0], plan[1] + 1)) > whole
    assert GPT2.lm_head_plan(TINY, 2, 8, recompute=1, chunks=4) == (1, 1)  # the fp32 sums outweigh the logits


def test_training_steps_follow_reference(rng):
    """Two AdamW steps on one batch (the simulator takes ~1 min a step): the losses and gradient
    norms track the float64 reference's, within llm.c's test_gpt2 bf16 bound of 0.05, and fall."""
    B, T = 2, 8
    model = GPT2(TINY, B, T, seed=int(rng.integers(1000)))
    tokens, targets = rng.integers(0, TINY.vocab_size, (2, B, T))
    params = reference.ParameterTensors(TINY, np.float64)
    params.memory[:] = model.parameters()
    m, v = reference.ParameterTensors(TINY, np.float64), reference.ParameterTensors(TINY, np.float64)
    losses, ref_losses = [], []
    for step in range(1, 3):
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        losses.append(model.losses())
        norm = model.grad_norm()
        model.update(1e-2, weight_decay=0.1, grad_scale=reference.grad_clip_scale(norm, 1.0))

        _, ref_loss, acts = reference.gpt2_forward(params, TINY, tokens, targets)
        grads = reference.ParameterTensors(TINY, np.float64)
        reference.gpt2_backward(grads, params, TINY, acts)
        ref_losses.append(ref_loss)
        ref_norm = reference.gpt2_grad_norm(grads)
        assert abs(norm - ref_norm) / ref_norm < 3e-2, (step, norm, ref_norm)
        reference.gpt2_update(params, grads, m, v, step, 1e-2, weight_decay=0.1,
                              grad_scale=reference.grad_clip_scale(ref_norm, 1.0))
    np.testing.assert_allclose(losses, ref_losses, atol=0.05)
    assert losses[-1] < losses[0]


def test_bad_inputs_are_clear_errors(rng):
    model = GPT2(TINY, 2, 8)
    with pytest.raises(ValueError, match="tokens must be"):
        model.forward(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="targets must lie"):
        model.forward(np.zeros((2, 8), np.int32), np.full((2, 8), TINY.vocab_size))
    with pytest.raises(ValueError, match="tokens must lie"):
        model.forward(np.full((2, 8), TINY.padded_vocab_size))
    with pytest.raises(ValueError, match="tokens must lie"):
        model.forward(np.full((2, 8), 2**32 + 1, dtype=np.int64))  # would wrap to 1 as int32
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()  # nothing to differentiate yet
    model.forward(np.zeros((1, 8), np.int32), B=1)  # sampling: no backward after it either
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward()
    with pytest.raises(ValueError, match="exceeds"):
        GPT2(TINY, 2, 32)


# one layer, eight channels: ~1K parameters, so an AdamW step takes about a second on the simulator
MICRO = GPT2Config(max_seq_len=4, vocab_size=13, padded_vocab_size=16, num_layers=1, num_heads=1, channels=8)


def test_update_clipped_is_grad_norm_then_update_bit_for_bit(rng):
    """update_clipped (global norm, clip scale and AdamW on the device in one launch, no host
    synchronisation) leaves the bits grad_norm() + update() with the host's clip scale leave, clipped
    or not, and step_results() returns what losses() and grad_norm() return."""
    from nanollm.kernels.bf16 import to_bf16_bits
    from nanollm.reference import grad_clip_scale as clip_scale

    seed = int(rng.integers(1000))
    host, device = GPT2(MICRO, 1, 4, seed=seed), GPT2(MICRO, 1, 4, seed=seed)
    n = host.grads.memory.size
    for step, (grad_size, grad_clip, clipped) in enumerate([(0.3, 1.0, True), (0.01, 1.0, False), (0.3, 0.0, False)]):
        grads = to_bf16_bits(rng.standard_normal(n).astype(np.float32) * np.float32(grad_size))
        losses = rng.random(host.acts32.losses.shape).astype(np.float32) * np.float32(10)
        for model in (host, device):
            model.grads.memory.copy_to_device(grads)
            model.acts32.losses.copy_to_device(losses)
        lr, weight_decay = 1e-2 * (step + 1), 0.1
        norm = host.grad_norm()
        assert (clip_scale(norm, grad_clip) < 1.0) == clipped, (norm, grad_clip)
        host.update(lr, weight_decay=weight_decay, grad_scale=clip_scale(norm, grad_clip))
        loss = host.losses()
        device.update_clipped(lr, weight_decay=weight_decay, grad_clip=grad_clip)
        assert device.step_results() == (loss, norm)
        expected, got = host.optimizer_state(), device.optimizer_state()
        for name in ("params_bf16", "master", "m", "v"):
            np.testing.assert_array_equal(expected[name].view(np.uint16 if name == "params_bf16" else np.uint32),
                                          got[name].view(np.uint16 if name == "params_bf16" else np.uint32),
                                          err_msg=f"step {step + 1}: {name}")


def test_given_parameters_or_the_seeds_initialisation(rng):
    """GPT2(parameters=...) starts from those values (rounded to bf16, master weights equal to
    them); without them, from reference.init_parameters(seed) (drawn on a second thread: same values)."""
    from nanollm.kernels.bf16 import round_to_bf16

    flat = rng.standard_normal(reference.ParameterTensors(MICRO).memory.size).astype(np.float32)
    model = GPT2(MICRO, 1, 4, parameters=flat)
    np.testing.assert_array_equal(model.parameters(), round_to_bf16(flat))
    np.testing.assert_array_equal(model.master_weights(), round_to_bf16(flat))
    seeded = GPT2(MICRO, 1, 4, seed=5)
    np.testing.assert_array_equal(seeded.parameters(), round_to_bf16(reference.init_parameters(MICRO, 5).memory))


def test_zero_grad_then_backward_writes_what_zeroing_would(rng):
    """zero_grad() no longer passes over the gradients: the first backward after it writes them.
    From non-zero gradients (as an earlier step leaves them), that backward gives every gradient
    the old way's values (zeroed, then added to; a zero's sign aside), and gradients() right after
    zero_grad() reads zeros. (Later micro-steps add, as before; test_model_gpu.py runs two.)"""
    from nanollm.kernels.bf16 import to_bf16_bits

    seed = int(rng.integers(1000))
    tokens, targets = rng.integers(0, MICRO.vocab_size, (2, 1, 4))
    written, zeroed = GPT2(MICRO, 1, 4, seed=seed), GPT2(MICRO, 1, 4, seed=seed)
    n = written.grads.memory.size
    written.grads.memory.copy_to_device(to_bf16_bits(rng.standard_normal(n).astype(np.float32)))
    written.zero_grad()
    assert not written.gradients().any()
    written.grads.memory.copy_to_device(to_bf16_bits(rng.standard_normal(n).astype(np.float32)))
    written.zero_grad()
    zeroed.zero_grad()
    zeroed._zero_grads_now()  # the memset zero_grad() did before
    for model in (written, zeroed):
        model.forward(tokens, targets)
        model.backward()
    got, want = written.gradients(), zeroed.gradients()
    assert np.count_nonzero(want) > want.size // 2
    np.testing.assert_array_equal(got, want)


def test_qkv_bias_gradient_from_the_softmax_invariances(rng):
    """The qkv bias gradient's key part is 0 and its value part attproj's bias gradient times its
    weight (kernels/qkv_bias.py), over two micro-steps (written, then added to): the value part as
    llm.c's sums of dqkv give it up to rounding, and the float64 reference's; the query part and
    every other gradient the bits of llm.c's way. Two heads, so each head's channels are its own."""
    config = GPT2Config(max_seq_len=4, vocab_size=13, padded_vocab_size=16, num_layers=1, num_heads=2, channels=8)
    seed, (B, T), C = int(rng.integers(1000)), (2, 4), 8
    tokens, targets = rng.integers(0, config.vocab_size, (2, B, T))
    grads = {}
    for mode in ("softmax", "sums"):
        model = GPT2(config, B, T, seed=seed, qkv_bias_grad=mode)
        model.grads.memory.copy_to_device(to_bf16_bits(rng.standard_normal(model.grads.memory.size).astype(np.float32)))
        model.zero_grad()  # the poison above must not survive in any part
        for _ in range(2):
            model.forward(tokens, targets)
            model.backward()
        grads[mode] = reference.ParameterTensors(config, np.float32)
        grads[mode].memory[:] = model.gradients()
    _, _, ref = _reference_step(config, model.parameters().astype(np.float64), tokens, targets)
    ours, llmc = grads["softmax"], grads["sums"]
    for name, _ in ref.items():
        if name != "qkvb":
            np.testing.assert_array_equal(ours[name], llmc[name], err_msg=name)
    (q, k, v), (q_llmc, k_llmc, v_llmc), (_, _, v_ref) = (g["qkvb"].reshape(3, C) for g in (ours, llmc, ref))
    np.testing.assert_array_equal(q, q_llmc)
    assert not k.any()  # exactly; llm.c's sums leave rounding noise there
    assert np.linalg.norm(k_llmc) < 0.05 * np.linalg.norm(v_llmc), (k_llmc, v_llmc)
    assert np.linalg.norm(v - v_llmc) / np.linalg.norm(v_llmc) < 2e-2, (v, v_llmc)
    assert np.linalg.norm(v - 2 * v_ref) / np.linalg.norm(2 * v_ref) < 3e-2, (v, 2 * v_ref)
