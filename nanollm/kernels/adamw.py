"""AdamW with fp32 master weights and stochastic rounding to bf16. After llm.c's adamw.cuh
(adamw_kernel3).

Per parameter: g = grad_scale * grad (grad_scale < 1 clips by global norm); m and v are updated
as llm.c's lerp; the fp32 master weight takes the decoupled weight-decay step
    master -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * master)
with the bias corrections 1 - beta^t computed on the host; the bf16 parameter the next forward
reads is the master weight rounded stochastically (bf16.float_to_bf16_stochastic), keyed on the
element's index in the parameter array and the seed: the same bits whether the update runs per
tensor, per ZeRO shard or all at once.

Memory-bound: 28 bytes move per parameter (read grad 2, master, m, v 4 each; write them and the
bf16 parameter). Each thread takes four parameters: one uint64 word of bf16 for the gradient and
the parameter, two uint64 words (two fp32 each) for master, m and v. The caller gives a range
[offset, offset + count) of the parameter and gradient arrays (weight decay applies per tensor,
so one call per tensor, or per shard), and where the range starts in the optimizer-state arrays
(state_offset; ZeRO-1 keeps only a shard of master, m and v). As llm.c's num_slices, one launch may
cover `slices` such ranges, `stride` elements apart in params and `state_stride` apart in the state
(ZeRO-1's slice of each layer of a stacked tensor): the grid's second dimension is the slice. The
few elements before the first aligned word and after the last go through a one-element-per-thread
kernel, as does a range that cannot be aligned (offset and state_offset of different parity).

adamw_multi_tensor_kernel updates many such ranges in one launch (a table of ranges, each with its
weight decay on or off and its seed), reading the step's values (learning rate, bias corrections,
seed) and the clip scale from device memory: the launch never changes, so the whole update can be
captured once in a CUDA graph. Per element it runs the same device functions, so the same bits.
"""

import math

import numpy as np
from numba import cuda, float32, int32, uint32, uint64

from .bf16 import (bf16_to_float, bf16x2_high, bf16x2_low, float_to_bf16, float_to_bf16_stochastic, high_half,
                   join_halves, low_half)
from .cuda_common import SIMULATOR, WARP_SIZE, ceil_div, check_contiguous, device_address, device_function, kernel


@device_function
def adamw_step(grad, master, m, v, lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay,
               grad_scale):
    """One parameter's update: returns the new (master, m, v).

    Every multiply-add is an explicit fma: left to the compiler, contraction differed between the
    four-wide and the one-wide kernel on an H100 (1 ulp in a master weight), and the update must
    give the same bits whichever kernel handles an element."""
    g = grad_scale * grad
    m = cuda.fma(beta1, m, (float32(1.0) - beta1) * g)
    v = cuda.fma(beta2, v, (float32(1.0) - beta2) * (g * g))
    m_hat = m / beta1_correction
    v_hat = v / beta2_correction
    update = cuda.fma(weight_decay, master, m_hat / (math.sqrt(v_hat) + eps))
    master = cuda.fma(-lr, update, master)
    return master, m, v


@device_function
def f32_low(word64):
    """The fp32 at the lower address of a uint64 word."""
    return cuda.libdevice.int_as_float(int32(low_half(word64)))


@device_function
def f32_high(word64):
    return cuda.libdevice.int_as_float(int32(high_half(word64)))


@device_function
def join_f32(low, high):
    return join_halves(uint32(cuda.libdevice.float_as_int(low)), uint32(cuda.libdevice.float_as_int(high)))


@device_function
def adamw_word(params, grads, master, m, v, word, state, lr, beta1, beta2, beta1_correction, beta2_correction, eps,
               weight_decay, grad_scale, seed):
    """The four parameters of params/grads word `word` (uint64 words of four bf16), whose state is
    in words state and state + 1 of master, m, v (uint64 words of two fp32)."""
    grad_word = grads[word]
    master01, master23 = master[state], master[state + 1]
    m01, m23 = m[state], m[state + 1]
    v01, v23 = v[state], v[state + 1]
    p0, m0, v0 = adamw_step(bf16x2_low(low_half(grad_word)), f32_low(master01), f32_low(m01), f32_low(v01),
                            lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale)
    p1, m1, v1 = adamw_step(bf16x2_high(low_half(grad_word)), f32_high(master01), f32_high(m01), f32_high(v01),
                            lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale)
    p2, m2, v2 = adamw_step(bf16x2_low(high_half(grad_word)), f32_low(master23), f32_low(m23), f32_low(v23),
                            lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale)
    p3, m3, v3 = adamw_step(bf16x2_high(high_half(grad_word)), f32_high(master23), f32_high(m23), f32_high(v23),
                            lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale)
    master[state] = join_f32(p0, p1)
    master[state + 1] = join_f32(p2, p3)
    m[state] = join_f32(m0, m1)
    m[state + 1] = join_f32(m2, m3)
    v[state] = join_f32(v0, v1)
    v[state + 1] = join_f32(v2, v3)
    position = 4 * word  # the element's index in params: the rounding's randomness is keyed on it
    low = uint32(float_to_bf16_stochastic(p0, position, seed)) \
        | (uint32(float_to_bf16_stochastic(p1, position + 1, seed)) << uint32(16))
    high = uint32(float_to_bf16_stochastic(p2, position + 2, seed)) \
        | (uint32(float_to_bf16_stochastic(p3, position + 3, seed)) << uint32(16))
    params[word] = join_halves(low, high)


@device_function
def adamw_element(params, grads, master, m, v, element, state, lr, beta1, beta2, beta1_correction,
                  beta2_correction, eps, weight_decay, grad_scale, seed):
    """One parameter: element `element` of params/grads (bf16), `state` of master, m, v (fp32)."""
    new_master, new_m, new_v = adamw_step(bf16_to_float(grads[element]), master[state], m[state], v[state], lr,
                                          beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay,
                                          grad_scale)
    master[state] = new_master
    m[state] = new_m
    v[state] = new_v
    params[element] = float_to_bf16_stochastic(new_master, element, seed)


@kernel
def adamw_kernel(params, grads, master, m, v, first_word, first_state_word, n_words, slice_words, slice_state_words,
                 lr, beta1, beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale, seed):
    # params, grads: uint64 words of four bf16; master, m, v: uint64 words of two fp32.
    # Thread i of slice s (blockIdx.y) updates the four parameters in params/grads word
    # first_word + s * slice_words + i, whose state is in words first_state_word + s * slice_state_words
    # + 2i and + 2i + 1 of master, m, v.
    i = cuda.grid(1)
    if i < n_words:
        adamw_word(params, grads, master, m, v, first_word + cuda.blockIdx.y * slice_words + i,
                   first_state_word + cuda.blockIdx.y * slice_state_words + 2 * i, lr, beta1, beta2,
                   beta1_correction, beta2_correction, eps, weight_decay, grad_scale, seed)


@kernel
def adamw_scalar_kernel(params, grads, master, m, v, start, state_start, count, stride, state_stride, lr, beta1,
                        beta2, beta1_correction, beta2_correction, eps, weight_decay, grad_scale, seed):
    # params, grads: bf16 (uint16); master, m, v: fp32. One parameter per thread: element
    # start + s * stride + i of params/grads, state_start + s * state_stride + i of master, m, v
    # (s = blockIdx.y, the slice). For the unaligned ends of a range.
    i = cuda.grid(1)
    if i < count:
        adamw_element(params, grads, master, m, v, start + cuda.blockIdx.y * stride + i,
                      state_start + cuda.blockIdx.y * state_stride + i, lr, beta1, beta2, beta1_correction,
                      beta2_correction, eps, weight_decay, grad_scale, seed)


# The multi-tensor update's per-step values live in a device array of HYPER_WORDS uint32 words
# (filled by adamw_hyperparameters, uploaded before the launch), so the launch itself never
# changes and can be replayed from a CUDA graph; the clip scale is a device fp32 computed on the
# GPU (global_norm.grad_clip_scale). Words 0..6 are fp32 bits, word 7 the rounding seed's base.
HYPER_LR, HYPER_BETA1, HYPER_BETA2, HYPER_BETA1_CORRECTION, HYPER_BETA2_CORRECTION, HYPER_EPS, \
    HYPER_WEIGHT_DECAY, HYPER_SEED = range(8)
HYPER_WORDS = 8
# the multi-tensor table: one row per tensor
TENSOR_OFFSET, TENSOR_STATE_OFFSET, TENSOR_WORDS, TENSOR_TAIL, TENSOR_DECAY, TENSOR_SEED_INDEX = range(6)
TENSOR_COLUMNS = 6


@kernel
def adamw_multi_tensor_kernel(params, grads, master, m, v, params_words, grads_words, master_words, m_words,
                              v_words, tensors, block_starts, hyper, seeds, grad_scale, words_per_thread):
    # Every tensor of `tensors` in one launch. params, grads: bf16 (uint16) and the same memory as
    # uint64 words (four bf16); master, m, v: fp32 and as uint64 words (two fp32). tensors: int64
    # rows (offset in params, offset in the state, whole words, tail elements, weight decay 0/1,
    # seed index); block_starts: (n + 1,) the first block of each tensor (blocks of one tensor
    # all update it: no divergence). hyper/seeds: the HYPER_WORDS words as fp32 / uint32;
    # grad_scale: (1,) fp32. Block b of a tensor covers its words [b, b + 1) * blockDim *
    # words_per_thread, thread x its words x, x + blockDim, ...; the thread whose word would be
    # `words` updates the 0-3 tail elements one at a time; per element this is exactly
    # adamw_kernel's update. Several words per thread: the tensor lookup below (a chain of
    # dependent loads) and the block's start-up are paid once per words_per_thread words.
    block = cuda.blockIdx.x
    lo = 0
    hi = block_starts.shape[0] - 1
    while hi - lo > 1:  # the tensor t with block_starts[t] <= block < block_starts[t + 1]
        mid = (lo + hi) // 2
        if block_starts[mid] <= block:
            lo = mid
        else:
            hi = mid
    t = lo
    first = (block - block_starts[t]) * cuda.blockDim.x * words_per_thread + cuda.threadIdx.x
    n_words = tensors[t, TENSOR_WORDS]
    tail = tensors[t, TENSOR_TAIL]
    if first > n_words or (first == n_words and tail == 0):
        return
    lr = hyper[HYPER_LR]
    beta1 = hyper[HYPER_BETA1]
    beta2 = hyper[HYPER_BETA2]
    beta1_correction = hyper[HYPER_BETA1_CORRECTION]
    beta2_correction = hyper[HYPER_BETA2_CORRECTION]
    eps = hyper[HYPER_EPS]
    weight_decay = hyper[HYPER_WEIGHT_DECAY] if tensors[t, TENSOR_DECAY] else float32(0.0)
    scale = grad_scale[0]
    seed = uint32((uint64(seeds[HYPER_SEED]) + uint64(tensors[t, TENSOR_SEED_INDEX])) & uint64(0xFFFFFFFF))
    offset = tensors[t, TENSOR_OFFSET]
    state_offset = tensors[t, TENSOR_STATE_OFFSET]
    for k in range(words_per_thread):
        i = first + k * cuda.blockDim.x
        if i < n_words:
            adamw_word(params_words, grads_words, master_words, m_words, v_words, offset // 4 + i,
                       state_offset // 2 + 2 * i, lr, beta1, beta2, beta1_correction, beta2_correction, eps,
                       weight_decay, scale, seed)
        elif i == n_words:
            for j in range(4 * n_words, 4 * n_words + tail):
                adamw_element(params, grads, master, m, v, offset + j, state_offset + j, lr, beta1, beta2,
                              beta1_correction, beta2_correction, eps, weight_decay, scale, seed)


@kernel
def init_master_weights_kernel(master, params, start, state_start, count):
    # master[state_start + i] = float(params[start + i]); once per run, so plain scalar accesses
    i = cuda.grid(1)
    if i < count:
        master[state_start + i] = bf16_to_float(params[start + i])


@kernel
def round_master_weights_kernel(params, master, start, state_start, count):
    # params[start + i] = master[state_start + i] rounded to bf16 (nearest even), and the master
    # weight becomes that bf16 value (llm.c's master weights start as the bf16 parameters)
    i = cuda.grid(1)
    if i < count:
        bits = float_to_bf16(master[state_start + i])
        params[start + i] = bits
        master[state_start + i] = bf16_to_float(bits)


_HYPER = "float32, float32, float32, float32, float32, float32, float32, float32, uint32"
PTX_SIGNATURES = {
    adamw_kernel: f"void(uint64[::1], uint64[::1], uint64[::1], uint64[::1], uint64[::1], int64, int64, int64, int64, "
                  f"int64, {_HYPER})",
    adamw_scalar_kernel: f"void(uint16[::1], uint16[::1], float32[::1], float32[::1], float32[::1], int64, int64, int64, "
                         f"int64, int64, {_HYPER})",
    init_master_weights_kernel: "void(float32[::1], uint16[::1], int64, int64, int64)",
    round_master_weights_kernel: "void(uint16[::1], float32[::1], int64, int64, int64)",
    adamw_multi_tensor_kernel: "void(uint16[::1], uint16[::1], float32[::1], float32[::1], float32[::1], "
                               "uint64[::1], uint64[::1], uint64[::1], uint64[::1], uint64[::1], int64[:, ::1], "
                               "int64[::1], float32[::1], uint32[::1], float32[::1], int64)",
}

# words (four parameters each) per thread of the multi-tensor update: its blocks find their tensor
# by a binary search over the table, a chain of dependent loads that one word per thread paid for
# every 2048 parameters
MULTI_TENSOR_WORDS_PER_THREAD = 4
BLOCK_SIZE = 32 if SIMULATOR else 512  # the simulator runs a Python thread per GPU thread: small blocks are far quicker there


def _flat(name, array, dtype):
    check_contiguous(name, array, dtype)
    return array.reshape(array.size)


def _range(params, master, offset, count, state_offset, slices=1, stride=0, state_stride=0):
    if count is None:
        count = params.size - offset
    if state_offset is None:
        state_offset = offset
    if slices < 1 or stride < 0 or state_stride < 0:
        raise ValueError(f"slices must be >= 1 and strides >= 0, got {slices}, {stride}, {state_stride}")
    end, state_end = offset + (slices - 1) * stride + count, state_offset + (slices - 1) * state_stride + count
    if offset < 0 or count < 0 or end > params.size:
        raise ValueError(f"range [{offset}, {end}) lies outside the {params.size} parameters")
    if state_offset < 0 or state_end > master.size:
        raise ValueError(f"state range [{state_offset}, {state_end}) lies outside the "
                         f"{master.size}-element master weights / m / v")
    return int(offset), int(count), int(state_offset)


def _check_arrays(params, grads, master, m, v, block_size):
    """The five arrays flat, after the checks every launcher needs."""
    params, grads = _flat("params", params, np.uint16), _flat("grads", grads, np.uint16)
    master, m, v = (_flat(name, a, np.float32) for name, a in (("master", master), ("m", m), ("v", v)))
    if grads.size != params.size:
        raise ValueError(f"grads has {grads.size} elements, params {params.size}")
    if not master.size == m.size == v.size:
        raise ValueError(f"master {master.size}, m {m.size}, v {v.size}: optimizer state sizes differ")
    if block_size % WARP_SIZE or not WARP_SIZE <= block_size <= 1024:
        raise ValueError(f"block_size must be a multiple of 32 in [32, 1024], got {block_size}")
    return params, grads, master, m, v


def _hyper_values(step, lr, beta1, beta2, eps, weight_decay):
    """lr, beta1, beta2, the bias corrections 1 - beta^step (computed in float64 as llm.c's host
    code does), eps and weight_decay, as the fp32 values the kernels get."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return (np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(1.0 - beta1 ** step),
            np.float32(1.0 - beta2 ** step), np.float32(eps), np.float32(weight_decay))


def _words(array, per_word):
    """The array's first size // per_word * per_word elements as uint64 words."""
    return array[: array.size // per_word * per_word].view(np.uint64)


def adamw_update(params, grads, master, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                 grad_scale=1.0, seed=0, offset=0, count=None, state_offset=None, block_size=BLOCK_SIZE, stream=0,
                 slices=1, stride=0, state_stride=0):
    """One AdamW step (step counts from 1) on parameters [offset, offset + count).

    params, grads: bf16 (uint16) arrays of N elements (any shape, read flat); master, m, v: fp32
    arrays holding the optimizer state of elements offset.. at state_offset.. (default: offset,
    i.e. full-size state arrays). count defaults to the rest of params. Updates master, m, v and
    params in place; params gets master rounded stochastically with `seed` (uint32).
    grad_scale multiplies the gradient first (clipping). weight_decay is for the whole range: the
    caller decays 2-D weights only, one call per tensor. slices > 1: also the ranges starting
    s * stride further in params (s * state_stride in the state), s < slices, in the same launch.
    """
    launch = prepare_adamw_update(params, grads, master, m, v, offset, count, state_offset, block_size, slices,
                                  stride, state_stride)
    launch(step, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, stream)


def prepare_adamw_update(params, grads, master, m, v, offset=0, count=None, state_offset=None, block_size=BLOCK_SIZE,
                         slices=1, stride=0, state_stride=0):
    """adamw_update's checks and array views, done once: returns
    launch(step, lr, beta1, beta2, eps, weight_decay, grad_scale, seed, stream), which only
    launches. (Building the views costs ~0.5 ms of host time per call; a training step updates
    16 tensors.)"""
    params, grads, master, m, v = _check_arrays(params, grads, master, m, v, block_size)
    offset, count, state_offset = _range(params, master, offset, count, state_offset, slices, stride, state_stride)
    launches = []  # (kernel, grid, leading arguments)

    def scalar(start, state_start, n):
        if n > 0:
            launches.append((adamw_scalar_kernel, (ceil_div(n, block_size), slices),
                             (params, grads, master, m, v, np.int64(start), np.int64(state_start), np.int64(n),
                              np.int64(stride), np.int64(state_stride))))

    head = min(count, -offset % 4)  # elements before the first whole uint64 word of params
    n_words = (count - head) // 4
    aligned = ((state_offset + head) % 2 == 0
               and (slices == 1 or (stride % 4 == 0 and state_stride % 2 == 0))  # every slice aligned alike
               and all(device_address(a) % 8 == 0 for a in (params, grads, master, m, v)))
    if not aligned or n_words == 0:
        scalar(offset, state_offset, count)
    else:
        scalar(offset, state_offset, head)
        launches.append((adamw_kernel, (ceil_div(n_words, block_size), slices),
                         (_words(params, 4), _words(grads, 4), _words(master, 2), _words(m, 2), _words(v, 2),
                          np.int64((offset + head) // 4), np.int64((state_offset + head) // 2), np.int64(n_words),
                          np.int64(stride // 4), np.int64(state_stride // 2))))
        done = head + 4 * n_words
        scalar(offset + done, state_offset + done, count - done)

    def launch(step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_scale=1.0, seed=0, stream=0):
        if step < 1:
            raise ValueError(f"step counts from 1, got {step}")
        hyper = (*_hyper_values(step, lr, beta1, beta2, eps, weight_decay), np.float32(grad_scale), np.uint32(seed))
        for adamw_kernel_variant, grid, arguments in launches:
            adamw_kernel_variant[grid, block_size, stream](*arguments, *hyper)

    return launch


def init_master_weights(master, params, offset=0, count=None, state_offset=None, block_size=BLOCK_SIZE, stream=0):
    """master[state_offset : state_offset + count] = float(params[offset : offset + count]).
    params: bf16 (uint16), master: fp32; ranges as adamw_update's."""
    params, master = _flat("params", params, np.uint16), _flat("master", master, np.float32)
    offset, count, state_offset = _range(params, master, offset, count, state_offset)
    if count > 0:
        init_master_weights_kernel[ceil_div(count, block_size), block_size, stream](
            master, params, np.int64(offset), np.int64(state_offset), np.int64(count))


def round_master_weights(params, master, offset=0, count=None, state_offset=None, block_size=BLOCK_SIZE, stream=0):
    """Load fp32 weights through the master copy: params[offset : offset + count] = the master
    weights at state_offset.. rounded to bf16 (nearest even, as bf16.to_bf16_bits on the host), and
    those master weights set to the rounded values (what init_master_weights would give from the
    params). Ranges as adamw_update's."""
    params, master = _flat("params", params, np.uint16), _flat("master", master, np.float32)
    offset, count, state_offset = _range(params, master, offset, count, state_offset)
    if count > 0:
        round_master_weights_kernel[ceil_div(count, block_size), block_size, stream](
            params, master, np.int64(offset), np.int64(state_offset), np.int64(count))


# ---- every tensor in one launch, with the step's values on the device ----------------------------

def adamw_hyperparameters(step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, seed=0, out=None):
    """The HYPER_WORDS uint32 words adamw_multi_tensor reads (fp32 bits of the same values
    adamw_update passes, and the rounding seed's base), into `out` if given (e.g. a pinned slot)."""
    words = np.zeros(HYPER_WORDS, dtype=np.uint32) if out is None else out
    values = np.array(_hyper_values(step, lr, beta1, beta2, eps, weight_decay), dtype=np.float32)
    words[:HYPER_SEED] = values.view(np.uint32)
    words[HYPER_SEED] = np.uint32(int(seed) & 0xFFFFFFFF)
    return words


def prepare_adamw_multi_tensor(params, grads, master, m, v, tensors, block_size=BLOCK_SIZE,
                              words_per_thread=MULTI_TENSOR_WORDS_PER_THREAD):
    """One launch updating many ranges of the parameters, each as adamw_update would with the
    same values (bit for bit), whose per-step values come from device memory: returns
    launch(hyper, grad_scale, stream) with hyper a device uint32 array of HYPER_WORDS
    (adamw_hyperparameters' words) and grad_scale a device (1,) fp32 array. Nothing about the launch
    changes from step to step, so it can be captured in a CUDA graph and replayed.

    tensors: [(offset, count, state_offset, weight_decay_on, seed_index)]: the range's
    elements in params/grads, where its state starts in master/m/v, whether the step's weight
    decay applies (else 0), and what adamw_update's seed would be relative to the base (the seed is
    base + seed_index, mod 2^32). Every range must start on a whole uint64 word of both
    (offset % 4 == 0, state_offset % 2 == 0, 8-byte aligned arrays); a range's last count % 4
    elements are updated one by one, as adamw_update's tail. words_per_thread: uint64 words (four
    parameters each) a thread updates; the same bits whatever it is."""
    params, grads, master, m, v = _check_arrays(params, grads, master, m, v, block_size)
    if not tensors:
        raise ValueError("tensors: no ranges given")
    if not all(device_address(a) % 8 == 0 for a in (params, grads, master, m, v)):
        raise ValueError("params, grads, master, m, v must start 8-byte aligned (uint64 words)")
    table = np.zeros((len(tensors), TENSOR_COLUMNS), dtype=np.int64)
    block_starts = np.zeros(len(tensors) + 1, dtype=np.int64)
    for k, (offset, count, state_offset, decay, seed_index) in enumerate(tensors):
        offset, count, state_offset = _range(params, master, offset, count, state_offset)
        if offset % 4 or state_offset % 2:
            raise ValueError(f"tensors[{k}]: offset {offset} must be a multiple of 4 and state_offset "
                             f"{state_offset} even (whole uint64 words of params and of the state)")
        n_words, tail = divmod(count, 4)
        table[k] = (offset, state_offset, n_words, tail, bool(decay), seed_index)
        block_starts[k + 1] = block_starts[k] + ceil_div(n_words + (tail > 0), block_size * words_per_thread)
    grid = int(block_starts[-1])
    arguments = (params, grads, master, m, v, _words(params, 4), _words(grads, 4), _words(master, 2), _words(m, 2),
                 _words(v, 2), cuda.to_device(table), cuda.to_device(block_starts))

    def launch(hyper, grad_scale, stream=0):
        check_contiguous("hyper", hyper, np.uint32, (HYPER_WORDS,))
        check_contiguous("grad_scale", grad_scale, np.float32, (1,))
        if grid:
            adamw_multi_tensor_kernel[grid, block_size, stream](*arguments, hyper.view(np.float32), hyper, grad_scale,
                                                                words_per_thread)

    return launch
