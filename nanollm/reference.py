"""GPT-2 in numpy: the layers, forward and backward, after llm.c's train_gpt2.c.

This is the oracle every GPU kernel is tested against and the CPU path when no GPU is present.
Plain float arithmetic in whatever dtype the caller passes (float32 for the CPU path, float64
for tight kernel checks). Shapes follow llm.c: B batch, T time, C channels, NH heads,
V vocabulary (Vp padded), OC output channels.
"""

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
