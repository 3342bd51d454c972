"""The bf16 GPU model against PyTorch (fp32, CPU) at GPT-2 d12, B=4, T=64, with llm.c's
test_gpt2 bf16 tolerances: logits, loss, all 16 gradient tensors, then 10 AdamW steps whose
losses stay within 0.05. Runs only on a real GPU (`pytest -m gpu`)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

from nanollm import reference  # noqa: E402
from nanollm.config import from_descriptor, parameter_shapes  # noqa: E402
from nanollm.kernels.bf16 import to_bf16_bits  # noqa: E402
from nanollm.model import GPT2  # noqa: E402

from .test_reference import torch_model_from, torch_values  # noqa: E402

# llm.c test_gpt2.cu: |ours - torch| <= threshold + 0.079 |torch| per element (0.079: bf16's
# epsilon as llm.c counts it), thresholds per tensor in llm.c's order
GRAD_THRESHOLDS = dict(zip(parameter_shapes(from_descriptor("d12")),
                           [5e-1, 4e-3, 1e-1, 4e-2, 5e-2, 3.5e-2, 2e-2, 3e-2,
                            5e-2, 3e-2, 3e-2, 3e-2, 2e-2, 1e-2, 1e-1, 2e-2]))
LOGIT_THRESHOLD = 25.0   # llm.c's bf16 bound on any logit's absolute difference
LOSS_THRESHOLD = 0.05    # llm.c's bf16 bound on each step's loss


def _skip_without_cudnn(config, B, T):
    from nanollm.kernels import attention_cudnn

    ok, reason = attention_cudnn.is_available(B, T, config.num_heads, config.head_size)
    if not ok:
        pytest.skip(f"cuDNN attention unavailable: {reason}")


# lm_head (4, 12): the lm head and classifier in 4 blocks of rows with their backward in the
# forward, every layer's GELU kept at -r 1 (GPT2.lm_head_plan's choice at B*T = 65536; at this
# small B*T the plan runs the lm head whole)
@pytest.mark.parametrize("attention, lm_head", [("numba", None), ("cudnn", None), ("cudnn", (4, 12))],
                         ids=["numba", "cudnn", "cudnn-lm-head-in-4-chunks"])
def test_d12_matches_pytorch(attention, lm_head):
    config = from_descriptor("d12")
    B, T = 4, 64
    rng = np.random.default_rng(1234)
    tokens, targets = rng.integers(0, config.vocab_size, (2, B, T))
    if attention == "cudnn":
        _skip_without_cudnn(config, B, T)
    model = GPT2(config, B, T, seed=1234, attention=attention, lm_head=lm_head)
    params = reference.ParameterTensors(config, np.float32)
    params.memory[:] = model.parameters()  # PyTorch gets the very bf16 values the GPU model holds
    torch_model = torch_model_from(params, np.float32)

    model.forward(tokens)
    logits = model.logits_host()
    t_logits, t_loss = torch_model(torch.from_numpy(tokens), torch.from_numpy(targets))
    t_loss.backward()
    expected = t_logits.detach().numpy()[..., :config.vocab_size]
    assert np.abs(logits - expected).max() < LOGIT_THRESHOLD
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 2e-2

    model.zero_grad()
    model.forward(tokens, targets)
    model.backward()
    assert abs(model.losses() - t_loss.item()) < LOSS_THRESHOLD
    grads = reference.ParameterTensors(config, np.float32)
    grads.memory[:] = model.gradients()
    torch_grads = torch_values(torch_model, grad=True)
    failures = []
    for name, threshold in GRAD_THRESHOLDS.items():
        ours, theirs = grads[name], torch_grads[name]
        excess = np.abs(ours - theirs) / (threshold + 0.079 * np.abs(theirs))
        relative = np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30)
        print(f"{name:10s} max |diff|/tolerance {excess.max():.3f}  relative L2 error {relative:.2e}")
        if excess.max() > 1.0:
            failures.append(name)
    assert not failures, f"gradients beyond llm.c's tolerances: {failures}"

    # 10 steps as llm.c's test_gpt2: lr 1e-4, no weight decay, no clipping, the same batch
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ours, theirs = [], []
    for step in range(10):
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        model.update(1e-4)
        ours.append(model.losses())
        optimizer.zero_grad()
        _, loss = torch_model(torch.from_numpy(tokens), torch.from_numpy(targets))
        loss.backward()
        optimizer.step()
        theirs.append(loss.item())
    print("losses (nanollm, torch):", list(zip(np.round(ours, 4), np.round(theirs, 4))))
    np.testing.assert_allclose(ours, theirs, atol=LOSS_THRESHOLD)
    assert ours[-1] < ours[0]


@pytest.mark.parametrize("attention, lm_head", [("numba", None), ("cudnn", None), ("cudnn", (4, 12))],
                         ids=["numba", "cudnn", "cudnn-lm-head-in-4-chunks"])
def test_cuda_graphs_replay_the_eager_step_exactly(attention, lm_head):
    """The graphed step is the eager step's launches: after three steps of two micro-steps on
    fresh batches (step 1 eager, 2 captured, 3 replayed), parameters, optimizer state, losses
    and a validation loss agree bit for bit."""
    config = from_descriptor("d12")
    B, T = 4, 64
    if attention == "cudnn":
        _skip_without_cudnn(config, B, T)
    rng = np.random.default_rng()
    batches = rng.integers(0, config.vocab_size, (3, 2, 2, B, T))  # step, micro-step, tokens/targets
    results = []
    for graphs in (False, True):
        model = GPT2(config, B, T, seed=7, attention=attention, grad_accum_steps=2, cuda_graphs=graphs,
                     lm_head=lm_head)
        losses, evals = [], []
        for step in range(3):
            model.zero_grad()
            for micro_step in range(2):
                model.forward(*batches[step, micro_step], micro_step=micro_step)
                model.backward()
            norm = model.grad_norm()
            model.update(3e-4, weight_decay=0.1, grad_scale=min(1.0, 1.0 / norm))
            losses.append(model.losses())
            evals.append(model.evaluate(*batches[step, 0]))
        if graphs:
            assert {("forward", 0), ("forward", 1), "backward (overwrites)", "backward",
                    "evaluate"} <= set(model.graphs.captured)
        state = model.optimizer_state()
        results.append((losses, evals, state))
    (losses, evals, state), (g_losses, g_evals, g_state) = results
    assert losses == g_losses and evals == g_evals
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(state[name], g_state[name], err_msg=name)


@pytest.mark.parametrize("gelu_fusion, lm_head", [(2, None), (1, None), (2, (4, 12))],
                         ids=["ge2", "ge1", "ge2-lm-head-in-4-chunks"])
def test_zero_grad_then_backward_writes_what_zeroing_would(gelu_fusion, lm_head):
    """The first backward after zero_grad() writes the gradients (cuBLASLt with beta 0, the bias
    and layernorm kernels without accumulating): at d12 with cuDNN attention and CUDA graphs, over
    two steps of two micro-steps from non-zero gradients, every gradient has the values of the
    old way (zeroed, then added to; a zero's sign aside)."""
    config = from_descriptor("d12")
    B, T = 4, 64
    _skip_without_cudnn(config, B, T)
    rng = np.random.default_rng()
    batches = rng.integers(0, config.vocab_size, (2, 2, 2, B, T))  # step, micro-step, tokens/targets
    written, zeroed = (GPT2(config, B, T, seed=7, attention="cudnn", grad_accum_steps=2, gelu_fusion=gelu_fusion,
                            lm_head=lm_head) for _ in range(2))
    noise = rng.standard_normal(written.grads.memory.size).astype(np.float32)
    written.grads.memory.copy_to_device(to_bf16_bits(noise))
    for step in range(2):  # step 0 eager, step 1 replays the captured graphs
        for model in (written, zeroed):
            model.zero_grad()
            if model is zeroed:
                model._zero_grads_now()  # the memset zero_grad() did before
            for micro_step in range(2):
                model.forward(*batches[step, micro_step], micro_step=micro_step)
                model.backward()
        got, want = written.gradients(), zeroed.gradients()
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        for model in (written, zeroed):
            model.update(3e-4, weight_decay=0.1)
    assert {"backward (overwrites)", "backward"} <= set(written.graphs.captured)


@pytest.mark.parametrize("attention", ["cudnn"])
def test_update_clipped_in_a_graph_matches_host_clipping(attention):
    """The update on the device (norm, clip scale, one multi-tensor AdamW launch, replayed as a CUDA
    graph from the third step) against the host path it replaces (grad_norm read back, clip scale on
    the host, per-tensor AdamW launches): four steps of two micro-steps at d12, clipped at 1.0 (early
    norms exceed it) -- losses, norms, parameters, master weights, m and v equal bit for bit."""
    from nanollm.reference import grad_clip_scale as clip_scale

    config = from_descriptor("d12")
    B, T = 4, 64
    _skip_without_cudnn(config, B, T)
    rng = np.random.default_rng()
    batches = rng.integers(0, config.vocab_size, (4, 2, 2, B, T))  # step, micro-step, tokens/targets
    results = []
    for on_device in (False, True):
        model = GPT2(config, B, T, seed=11, attention=attention, grad_accum_steps=2)
        reported = []
        for step in range(4):
            model.zero_grad()
            for micro_step in range(2):
                model.forward(*batches[step, micro_step], micro_step=micro_step)
                model.backward()
            lr = 3e-4 * (step + 1)
            if on_device:
                model.update_clipped(lr, weight_decay=0.1, grad_clip=1.0)
                reported.append(model.step_results())
            else:
                norm = model.grad_norm()
                model.update(lr, weight_decay=0.1, grad_scale=clip_scale(norm, 1.0))
                reported.append((model.losses(), norm))
        if on_device and model.graphs is not None:
            assert ("update", 1.0) in model.graphs.captured
        results.append((reported, model.optimizer_state()))
    (host, host_state), (device, device_state) = results
    print("(loss, norm) per step:", host)
    assert host == device
    assert any(norm > 1.0 for _, norm in host), "no step was clipped: the test would not cover clipping"
    for name in ("params_bf16", "master", "m", "v"):
        np.testing.assert_array_equal(host_state[name], device_state[name], err_msg=name)


@pytest.mark.parametrize("attention", ["numba", "cudnn"])
def test_qkv_bias_gradient_from_the_softmax_invariances(attention):
    """At d12 with CUDA graphs, two passes of two micro-steps: the qkv bias gradient's key part is 0
    and its value part (attproj's bias gradient times its weight) llm.c's sums of dqkv up to
    rounding; its query part and every other gradient the bits of llm.c's way (kernels/qkv_bias.py)."""
    config = from_descriptor("d12")
    B, T, C, L = 4, 64, config.channels, config.num_layers
    if attention == "cudnn":
        _skip_without_cudnn(config, B, T)
    rng = np.random.default_rng()
    batches = rng.integers(0, config.vocab_size, (2, 2, 2, B, T))  # step, micro-step, tokens/targets
    models = {mode: GPT2(config, B, T, seed=3, attention=attention, grad_accum_steps=2, qkv_bias_grad=mode)
              for mode in ("softmax", "sums")}
    for step in range(2):  # step 0 eager, step 1 replays the captured graphs (new batches)
        grads = {}
        for mode, model in models.items():
            model.zero_grad()
            for micro_step in range(2):
                model.forward(*batches[step, micro_step], micro_step=micro_step)
                model.backward()
            grads[mode] = reference.ParameterTensors(config, np.float32)
            grads[mode].memory[:] = model.gradients()  # (no update: the parameters stay the same in both)
        ours, llmc = grads["softmax"], grads["sums"]
        for name in GRAD_THRESHOLDS:
            if name != "qkvb":
                np.testing.assert_array_equal(ours[name], llmc[name], err_msg=f"step {step}: {name}")
        (q, k, v), (q_llmc, k_llmc, v_llmc) = (g["qkvb"].reshape(L, 3, C).transpose(1, 0, 2) for g in (ours, llmc))
        np.testing.assert_array_equal(q, q_llmc, err_msg=f"step {step}")
        assert not k.any()
        relative = np.linalg.norm(v - v_llmc) / np.linalg.norm(v_llmc)
        print(f"step {step}: value part vs llm.c's sums, relative L2 {relative:.2e}; llm.c's key part "
              f"{np.linalg.norm(k_llmc):.2e} against its value part {np.linalg.norm(v_llmc):.2e}")
        assert relative < 1e-2
        assert np.linalg.norm(k_llmc) < 0.05 * np.linalg.norm(v_llmc)
