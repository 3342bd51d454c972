"""Global gradient norm (squared, deterministic) against the numpy reference."""

import numpy as np
import pytest
from numba import cuda

from nanollm import reference
from nanollm.kernels import global_norm

from .helpers import poisoned_f32, random_bf16


def gpt2_gradient_shapes(L=12, C=768, Vp=50304, maxT=1024):
    """llm.c's parameter tensors of GPT-2, in order."""
    return [(Vp, C), (maxT, C), (L, C), (L, C), (L, 3 * C, C), (L, 3 * C), (L, C, C), (L, C), (L, C), (L, C),
            (L, 4 * C, C), (L, 4 * C), (L, C, 4 * C), (L, C), (C,), (C,)]


CASES = [  # tensor shapes, scratch slots (blocks per tensor), block size
    pytest.param([(5, 7, 33)], 3, 64, id="single"),
    pytest.param([(37,), (3,), (4, 65), (1,), (2, 2, 128)], 4, 32, id="list-with-tails"),
    pytest.param([(32,)], 5, 32, id="fewer-words-than-threads"),
    # 1027 words over 128 threads: two rounds of four loads each, then 3 leftover words, 3 values
    pytest.param([(4111,)], 4, 32, id="four-load-rounds"),
    pytest.param(gpt2_gradient_shapes(), None, 512, id="gpt2-124M", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("shapes, slots, block_size", CASES)
def test_global_norm_squared(rng, shapes, slots, block_size):
    tensors = [random_bf16(rng, shape, scale=0.1 * (k + 1)) for k, shape in enumerate(shapes)]
    grads = [device for device, _ in tensors]
    scratch = poisoned_f32(slots or global_norm.global_norm_scratch_size(block_size))  # contents on entry don't matter
    out = poisoned_f32(1)
    global_norm.global_norm_squared(out, scratch, grads if len(grads) > 1 else grads[0], block_size=block_size)
    expected = reference.global_norm([values for _, values in tensors]) ** 2
    # fp32 partial sums of positive terms: relative error ~1e-7 * log2(terms per thread + partials)
    np.testing.assert_allclose(out.copy_to_host()[0], expected, rtol=1e-5)

    # deterministic: the same bits again, whatever the scratch held before
    first = out.copy_to_host()
    scratch.copy_to_device(np.full(scratch.shape, 1e30, np.float32))
    global_norm.global_norm_squared(out, scratch, grads if len(grads) > 1 else grads[0], block_size=block_size)
    np.testing.assert_array_equal(out.copy_to_host(), first)


def test_global_norm_rejects_bad_input(rng):
    grad, _ = random_bf16(rng, (64,))
    out, scratch = poisoned_f32(1), poisoned_f32(4)
    with pytest.raises(TypeError, match="grads"):
        global_norm.global_norm_squared(out, scratch, [grad, cuda.to_device(np.zeros(8, np.float32))])
    with pytest.raises(ValueError, match="out"):
        global_norm.global_norm_squared(poisoned_f32(2), scratch, grad)
    with pytest.raises(TypeError, match="scratch"):
        global_norm.global_norm_squared(out, cuda.to_device(np.zeros(4, np.float64)), grad)
    with pytest.raises(ValueError, match="aligned"):
        global_norm.global_norm_squared(out, scratch, grad[1:33])
    with pytest.raises(ValueError, match="block_size"):
        global_norm.global_norm_squared(out, scratch, grad, block_size=48)


def test_grad_clip_scale_matches_the_host_rule(rng):
    """The clip scale computed on the device has the bits of the training loop's host rule
    (np.float32 of grad_clip / math.sqrt(norm_squared) when the norm exceeds grad_clip, else 1), so
    moving it onto the GPU changes no update."""
    import math

    norms_squared = np.concatenate([rng.random(12) * 4.0, np.exp(rng.normal(0, 6, 12)),
                                    [0.0, 1.0, 0.25, np.nextafter(np.float32(1), np.float32(2)), np.inf, np.nan]])
    scale = poisoned_f32(1)
    for grad_clip in (1.0, 0.5, 0.0, -1.0, float(rng.random() * 3)):
        for norm_squared in norms_squared.astype(np.float32):
            global_norm.grad_clip_scale(scale, cuda.to_device(np.array([norm_squared], np.float32)), grad_clip)
            norm = math.sqrt(float(norm_squared))
            expected = np.float32(grad_clip / norm if grad_clip > 0 and norm > grad_clip else 1.0)
            got = scale.copy_to_host()[0]
            assert got.view(np.uint32) == expected.view(np.uint32), (grad_clip, norm_squared, got, expected)
