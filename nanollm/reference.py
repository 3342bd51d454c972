"""GPT-2 in numpy: the layers, forward and backward, after llm.c's train_gpt2.c.

This is the oracle every GPU kernel is tested against and the CPU path when no GPU is present.
Plain float arithmetic in whatever dtype the caller passes (float32 for the CPU path, float64
for tight kernel checks). Shapes follow llm.c: B batch, T time, C channels, NH heads,
V vocabulary (Vp padded), OC output channels.
"""

import concurrent.futures
import math

import numpy as np

GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)


# ---- encoder ---------------------------------------------------------------------------------

def encoder_forward(tokens, wte, wpe):
    """tokens (B,T) int, wte (Vp,C), wpe (maxT,C) -> (B,T,C)."""
    T = tokens.shape[1]
    return wte[tokens] + wpe[:T][None, :, :]


def encoder_backward(dwte, dwpe, dout, tokens):
    """Accumulates into dwte (Vp,C) and dwpe (maxT,C) from dout (B,T,C)."""
    T = tokens.shape[1]
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    dwpe[:T] += dout.sum(axis=0)


# ---- layernorm -------------------------------------------------------------------------------

LAYERNORM_EPS = 1e-5


def layernorm_forward(x, weight, bias):
    """x (B,T,C) -> out (B,T,C), mean (B,T), rstd (B,T)."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    var = (xc * xc).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + LAYERNORM_EPS)
    out = xc * rstd[..., None] * weight + bias
    return out, mean, rstd


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd):
    """Accumulates into dx (B,T,C), dweight (C,), dbias (C,)."""
    norm = (x - mean[..., None]) * rstd[..., None]
    dnorm = dout * weight
    dbias += dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    dweight += (dout * norm).reshape(-1, dout.shape[-1]).sum(axis=0)
    dnorm_mean = dnorm.mean(axis=-1, keepdims=True)
    dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)
    dx += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd[..., None]


def residual_forward(a, b):
    return a + b


def fused_residual_layernorm_forward(a, b, weight, bias):
    """residual = a + b, then layernorm(residual): llm.c's fused_residual_forward5."""
    residual = a + b
    out, mean, rstd = layernorm_forward(residual, weight, bias)
    return residual, out, mean, rstd


# ---- matmul ----------------------------------------------------------------------------------

def matmul_forward(x, weight, bias=None):
    """x (B,T,C), weight (OC,C) as llm.c (PyTorch's Linear layout), bias (OC,) -> (B,T,OC)."""
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out


def matmul_backward(dx, dweight, dbias, dout, x, weight):
    """Accumulates into dx (B,T,C), dweight (OC,C) and dbias (OC,) (dbias may be None)."""
    OC = weight.shape[0]
    dout2 = dout.reshape(-1, OC)
    dx += (dout2 @ weight).reshape(dx.shape)
    dweight += dout2.T @ x.reshape(-1, x.shape[-1])
    if dbias is not None:
        dbias += dout2.sum(axis=0)


# ---- gelu ------------------------------------------------------------------------------------

def gelu_forward(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALING_FACTOR * (x + 0.044715 * x ** 3)))


def gelu_backward(dout, x):
    """dL/dx given dL/dout and the forward's input x."""
    cube = 0.044715 * x ** 3
    tanh_arg = GELU_SCALING_FACTOR * (x + cube)
    tanh_out = np.tanh(tanh_arg)
    sech2 = 1.0 - tanh_out ** 2
    local_grad = 0.5 * (1.0 + tanh_out) + x * 0.5 * sech2 * GELU_SCALING_FACTOR * (1.0 + 3.0 * 0.044715 * x * x)
    return local_grad * dout


# ---- attention -------------------------------------------------------------------------------

def attention_forward(qkv, NH):
    """qkv (B,T,3C) laid out as llm.c (q, k, v each (NH, HS) per position) -> out (B,T,C), att
    (B,NH,T,T) the post-softmax causal attention weights (saved for the backward)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3) for i in range(3))
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(HS)
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    att = np.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return out, att


def attention_backward(dout, qkv, att, NH):
    """dL/dqkv (B,T,3C) from dL/dout (B,T,C), the forward's qkv and att."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3) for i in range(3))
    dout_h = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    datt = dout_h @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dout_h
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) / math.sqrt(HS)
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    return np.concatenate([d.transpose(0, 2, 1, 3).reshape(B, T, C) for d in (dq, dk, dv)], axis=-1)


# ---- classifier: softmax + cross-entropy -----------------------------------------------------

def softmax_cross_entropy_forward(logits, targets, V):
    """logits (B,T,Vp) of which the first V columns are real, targets (B,T) ->
    probs (B,T,V), losses (B,T)."""
    real = logits[..., :V]
    shifted = real - real.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    losses = -np.log(np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0])
    return probs, losses


def softmax_cross_entropy_backward(probs, targets, dloss):
    """dL/dlogits (B,T,V) for the mean loss scaled by dloss per position ((B,T) or a scalar)."""
    dlogits = probs.copy()
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0, axis=-1)
    return dlogits * np.broadcast_to(dloss, targets.shape)[..., None]


# ---- optimizer -------------------------------------------------------------------------------

def adamw_update(param, grad, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                 grad_scale=1.0):
    """One AdamW step as llm.c's adamw_kernel3, in place on param, m and v. step counts from 1.
    grad_scale multiplies the gradient first (clipping by global norm)."""
    g = grad * grad_scale
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    param -= lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * param)


def global_norm(grads):
    """sqrt of the sum of squares over every gradient array, in float64."""
    return math.sqrt(sum(float(np.sum(np.asarray(g, dtype=np.float64) ** 2)) for g in grads))


# ---- the whole model: llm.c's train_gpt2.c ---------------------------------------------------
# Parameters, gradients and AdamW moments are each ONE flat array carved into named views in
# llm.c's order (config.parameter_shapes), so a flat buffer here lines up element for element
# with llm.c's model files and with the GPU model's buffers.

from dataclasses import dataclass, field  # noqa: E402  (the model-level half of this module)

from .config import WEIGHT_DECAY_PARAMETERS, num_parameters, parameter_shapes  # noqa: E402


class ParameterTensors:
    """One flat array `memory` and a named view into it per tensor: params.wte, params["qkvw"]..."""

    def __init__(self, config, dtype=np.float32):
        self.config = config
        self.shapes = parameter_shapes(config)
        self.memory = np.zeros(num_parameters(config), dtype=dtype)
        offset = 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            setattr(self, name, self.memory[offset:offset + size].reshape(shape))
            offset += size

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(name)
        return getattr(self, name)

    def items(self):
        return [(name, getattr(self, name)) for name in self.shapes]

    def copy(self):
        other = ParameterTensors(self.config, self.memory.dtype)
        other.memory[:] = self.memory
        return other

    def zero(self):
        self.memory[:] = 0


INIT_BLOCK = 1 << 20  # elements one generator draws (init_parameters)


def init_parameters(config, seed=42, dtype=np.float32, threads=None):
    """GPT-2 initialisation as llm.c's gpt_build_from_descriptor: matmul weights and embeddings
    N(0, 0.02), the projections back into the residual stream (attprojw, fcprojw) N(0, 0.02/sqrt(2L)),
    layernorm weights 1, biases 0. Only the V real rows of wte are drawn; the padded rows stay 0.
    Each weight tensor is drawn in blocks of INIT_BLOCK elements, block k of the i-th tensor (in
    llm.c's order) from its own generator, numpy's default_rng([seed, i, k]), in float32 and scaled in
    float32: the blocks are drawn in parallel on `threads` threads (default: the usable cores; numpy's
    generators release the GIL), and one seed gives the same numbers for any thread count and dtype.
    (One generator drawing everything in order took 3.3 s at d12 on one core, most of the start-up.)"""
    params = ParameterTensors(config, dtype)
    std = np.float32(0.02)
    residual_std = np.float32(0.02 / math.sqrt(2 * config.num_layers))
    drawn = {"wte": std, "wpe": std, "qkvw": std, "attprojw": residual_std, "fcw": std, "fcprojw": residual_std}
    blocks = []  # (generator key, destination: a flat view, scale)
    for index, name in enumerate(params.shapes):
        if name not in drawn:
            continue
        flat = params[name].reshape(-1)
        if name == "wte":
            flat = flat[:config.vocab_size * config.channels]
        for k, start in enumerate(range(0, flat.size, INIT_BLOCK)):
            blocks.append(([seed, index, k], flat[start:start + INIT_BLOCK], drawn[name]))

    def draw(block):
        key, out, scale = block
        values = np.random.default_rng(key).standard_normal(out.size, dtype=np.float32)
        values *= scale
        out[:] = values

    if threads is None:
        from .tokenize_pool import available_cores

        threads = available_cores()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(blocks)))) as pool:
        list(pool.map(draw, blocks))
    params.ln1w[:] = 1.0
    params.ln2w[:] = 1.0
    params.lnfw[:] = 1.0
    return params


@dataclass
class ActivationTensors:
    """What gpt2_backward needs from the forward. Per-layer entries are lists over the L layers;
    residual[l] is layer l's input (residual[L] the last layer's output)."""
    tokens: np.ndarray
    targets: np.ndarray = None
    residual: list = field(default_factory=list)    # (B,T,C) x L+1
    ln1: list = field(default_factory=list)         # (B,T,C)
    ln1_mean: list = field(default_factory=list)    # (B,T)
    ln1_rstd: list = field(default_factory=list)    # (B,T)
    qkv: list = field(default_factory=list)         # (B,T,3C)
    atty: list = field(default_factory=list)        # (B,T,C) attention output before the projection
    att: list = field(default_factory=list)         # (B,NH,T,T) post-softmax attention weights
    residual2: list = field(default_factory=list)   # (B,T,C) after the attention block
    ln2: list = field(default_factory=list)
    ln2_mean: list = field(default_factory=list)
    ln2_rstd: list = field(default_factory=list)
    fch: list = field(default_factory=list)         # (B,T,4C) before GELU
    fch_gelu: list = field(default_factory=list)    # (B,T,4C)
    lnf: np.ndarray = None                          # (B,T,C)
    lnf_mean: np.ndarray = None
    lnf_rstd: np.ndarray = None
    probs: np.ndarray = None                        # (B,T,V)
    losses: np.ndarray = None                       # (B,T)


def gpt2_forward(params, config, tokens, targets=None):
    """tokens (B,T) and optional targets (B,T), ints in [0, V) ->
    (logits (B,T,Vp), mean loss as a float or None without targets, ActivationTensors).
    Computes in params' dtype; the padded logits columns are x . 0 = 0 and never enter the loss."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    if T > config.max_seq_len:
        raise ValueError(f"sequence length {T} > max_seq_len {config.max_seq_len}")
    for name, ids in (("tokens", tokens), ("targets", targets)):
        if ids is not None and (np.shape(ids) != (B, T) or np.min(ids) < 0 or np.max(ids) >= config.vocab_size):
            raise ValueError(f"{name} must be (B,T)={B, T} ints in [0, {config.vocab_size})")
    NH = config.num_heads
    acts = ActivationTensors(tokens=tokens, targets=None if targets is None else np.asarray(targets))
    residual = encoder_forward(tokens, params.wte, params.wpe)
    for l in range(config.num_layers):
        acts.residual.append(residual)
        ln1, ln1_mean, ln1_rstd = layernorm_forward(residual, params.ln1w[l], params.ln1b[l])
        qkv = matmul_forward(ln1, params.qkvw[l], params.qkvb[l])
        atty, att = attention_forward(qkv, NH)
        attproj = matmul_forward(atty, params.attprojw[l], params.attprojb[l])
        residual2 = residual_forward(residual, attproj)
        ln2, ln2_mean, ln2_rstd = layernorm_forward(residual2, params.ln2w[l], params.ln2b[l])
        fch = matmul_forward(ln2, params.fcw[l], params.fcb[l])
        fch_gelu = gelu_forward(fch)
        fcproj = matmul_forward(fch_gelu, params.fcprojw[l], params.fcprojb[l])
        residual = residual_forward(residual2, fcproj)
        acts.ln1.append(ln1)
        acts.ln1_mean.append(ln1_mean)
        acts.ln1_rstd.append(ln1_rstd)
        acts.qkv.append(qkv)
        acts.atty.append(atty)
        acts.att.append(att)
        acts.residual2.append(residual2)
        acts.ln2.append(ln2)
        acts.ln2_mean.append(ln2_mean)
        acts.ln2_rstd.append(ln2_rstd)
        acts.fch.append(fch)
        acts.fch_gelu.append(fch_gelu)
    acts.residual.append(residual)
    acts.lnf, acts.lnf_mean, acts.lnf_rstd = layernorm_forward(residual, params.lnfw, params.lnfb)
    logits = matmul_forward(acts.lnf, params.wte)  # weight tying: the lm head is wte
    loss = None
    if targets is not None:
        acts.probs, acts.losses = softmax_cross_entropy_forward(logits, acts.targets, config.vocab_size)
        loss = float(acts.losses.mean())
    return logits, loss, acts


def gpt2_backward(grads, params, config, acts, dloss=1.0):
    """Accumulates (+=) the gradient of dloss * mean loss into grads (ParameterTensors), so
    micro-steps add up: pass dloss = 1/grad_accum_steps. The forward must have had targets."""
    if acts.probs is None:
        raise ValueError("gpt2_backward needs a forward with targets")
    B, T = acts.tokens.shape
    V, NH = config.vocab_size, config.num_heads
    dtype = acts.lnf.dtype
    # the loss is the mean over B*T positions; a same-dtype scalar keeps float32 in float32
    dlogits = softmax_cross_entropy_backward(acts.probs, acts.targets, np.asarray(dloss / (B * T), dtype=dtype))
    # only the V real rows of wte meet real logits: the padded rows get no gradient (as llm.c)
    dresidual = np.zeros_like(acts.lnf)
    dlnf = np.zeros_like(acts.lnf)
    matmul_backward(dlnf, grads.wte[:V], None, dlogits, acts.lnf, params.wte[:V])
    layernorm_backward(dresidual, grads.lnfw, grads.lnfb, dlnf, acts.residual[-1], params.lnfw,
                       acts.lnf_mean, acts.lnf_rstd)
    for l in reversed(range(config.num_layers)):
        # residual = residual2 + fcproj: dresidual flows to both
        dfch_gelu = np.zeros_like(acts.fch_gelu[l])
        matmul_backward(dfch_gelu, grads.fcprojw[l], grads.fcprojb[l], dresidual, acts.fch_gelu[l], params.fcprojw[l])
        dfch = gelu_backward(dfch_gelu, acts.fch[l])
        dln2 = np.zeros_like(acts.ln2[l])
        matmul_backward(dln2, grads.fcw[l], grads.fcb[l], dfch, acts.ln2[l], params.fcw[l])
        layernorm_backward(dresidual, grads.ln2w[l], grads.ln2b[l], dln2, acts.residual2[l], params.ln2w[l],
                           acts.ln2_mean[l], acts.ln2_rstd[l])
        # residual2 = residual + attproj: dresidual now holds d residual2
        datty = np.zeros_like(acts.atty[l])
        matmul_backward(datty, grads.attprojw[l], grads.attprojb[l], dresidual, acts.atty[l], params.attprojw[l])
        dqkv = attention_backward(datty, acts.qkv[l], acts.att[l], NH)
        dln1 = np.zeros_like(acts.ln1[l])
        matmul_backward(dln1, grads.qkvw[l], grads.qkvb[l], dqkv, acts.ln1[l], params.qkvw[l])
        layernorm_backward(dresidual, grads.ln1w[l], grads.ln1b[l], dln1, acts.residual[l], params.ln1w[l],
                           acts.ln1_mean[l], acts.ln1_rstd[l])
    encoder_backward(grads.wte, grads.wpe, dresidual, acts.tokens)


def gpt2_grad_norm(grads):
    """Global L2 norm of every gradient, in float64 (tensor by tensor, to bound the temporaries)."""
    return global_norm([g for _, g in grads.items()])


def grad_clip_scale(grad_norm, grad_clip=1.0):
    """llm.c's clipping rule: scale the gradient by grad_clip / norm when the norm exceeds it
    (grad_clip <= 0: never, nanollm's --grad-clip 0). The GPU computes the same in
    kernels.global_norm.grad_clip_scale."""
    return grad_clip / grad_norm if grad_clip > 0 and grad_norm > grad_clip else 1.0


def gpt2_update(params, grads, m, v, t, learning_rate, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.0, grad_scale=1.0):
    """One AdamW step over every tensor, in place on params, m and v (ParameterTensors, m and v
    zero before step 1), as llm.c's gpt2_update: t counts from 1, the gradient is multiplied by
    grad_scale (grad_clip_scale) first, and weight decay applies only to WEIGHT_DECAY_PARAMETERS,
    inside the step as p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""
    for name, param in params.items():
        wd = weight_decay if name in WEIGHT_DECAY_PARAMETERS else 0.0
        adamw_update(param, grads[name], m[name], v[name], t, learning_rate, beta1, beta2, eps, wd, grad_scale)
