"""What Numba's CUDA simulator lacks and nanollm's kernels use: warp shuffles and libdevice bit
casts. Installed on the simulator's fake `cuda` module by conftest.py.

Shuffles are exchanged through a per-block buffer between two block barriers, so they are
exact, but (unlike hardware) every live thread of the block must reach the shuffle. nanollm's
kernels call shuffles in block-uniform control flow, which is also what makes them safe with
FULL_MASK on a GPU.
"""

import math
import threading
import time

import numpy as np


def _as_int32(value):
    return np.array(int(value) & 0xFFFFFFFF, dtype=np.uint32).view(np.int32)[()]


class _Libdevice:
    @staticmethod
    def int_as_float(value):
        return np.array(_as_int32(value), dtype=np.int32).view(np.float32)[()]

    @staticmethod
    def float_as_int(value):
        return np.array(value, dtype=np.float32).view(np.int32)[()]

    @staticmethod
    def float_as_uint(value):
        return np.array(value, dtype=np.float32).view(np.uint32)[()]

    @staticmethod
    def uint_as_float(value):
        return np.array(int(value) & 0xFFFFFFFF, dtype=np.uint32).view(np.float32)[()]

    @staticmethod
    def fast_expf(x):
        return np.float32(math.exp(x))

    @staticmethod
    def rsqrtf(x):
        return np.float32(1.0 / math.sqrt(x))


def _exchange(value, partner_of):
    thread = threading.current_thread()
    manager = thread._manager
    buffer = manager.__dict__.setdefault("_nanollm_shuffle", {})
    me = thread.thread_id
    buffer[me] = value
    thread.syncthreads()
    partner = partner_of(me)
    result = buffer.get(partner, value) if partner is not None else value
    thread.syncthreads()
    return result


def _same_warp(me, other):
    return other if other >= 0 and other // 32 == me // 32 else None


def shfl_xor_sync(mask, value, lane_mask):
    return _exchange(value, lambda me: _same_warp(me, me ^ lane_mask))


def shfl_down_sync(mask, value, delta):
    return _exchange(value, lambda me: _same_warp(me, me + delta))


def shfl_up_sync(mask, value, delta):
    return _exchange(value, lambda me: _same_warp(me, me - delta))


def shfl_sync(mask, value, src_lane):
    return _exchange(value, lambda me: (me // 32) * 32 + src_lane)


def _locked_static_shared_array(original):
    """The simulator creates a static shared array on the first thread to reach it without a
    lock, so two threads can get different arrays (seen: ~2 in 30 layernorm runs returned
    garbage). Same lookup, under a lock; the caller's frame stays where the original looks."""
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0:
            return original(self, shape, dtype, alignment)
        import sys
        import traceback

        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with lock:
            existing = self._allocations.get(caller)
            if existing is None:
                from numba.np import numpy_support
                from numba.core import types

                np_dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                existing = self._allocations[caller] = np.empty(shape, np_dtype)
            return existing

    return array


def _yielding_is_alive(original):
    """The simulator's block loop polls its threads' is_alive() without pause, holding the GIL
    against the very threads it waits for: the same kernel took 2 s or 300 s from run to run
    (global_norm at the tests' tiny model). A sleep(0) before each poll hands the GIL over."""
    def is_alive(self):
        time.sleep(0)
        return original(self)

    return is_alive


def install():
    from numba.cuda.simulator import kernel, kernelapi

    if not getattr(kernel.BlockThread.is_alive, "_nanollm_yielding", False):
        kernel.BlockThread.is_alive = _yielding_is_alive(kernel.BlockThread.is_alive)
        kernel.BlockThread.is_alive._nanollm_yielding = True

    shared = kernelapi.FakeCUDAShared
    if not getattr(shared.array, "_nanollm_locked", False):
        shared.array = _locked_static_shared_array(shared.array)
        shared.array._nanollm_locked = True
    module = kernelapi.FakeCUDAModule
    module.libdevice = _Libdevice()
    for fn in (shfl_xor_sync, shfl_down_sync, shfl_up_sync, shfl_sync):
        setattr(module, fn.__name__, staticmethod(fn))
