"""Host-to-device uploads that never make the host wait for the GPU: pinned, double-buffered.

A copy from pageable host memory is synchronous (the driver stages it through its own pinned
buffer, so the host waits for the stream); a copy from pinned memory on a stream is queued like
a kernel and the host goes on. The host may refill a pinned slot only once the copy that last
read it has run, so each slot has an event recorded after its copy: with two slots the host
waits only when it is two uploads ahead of the GPU (llm.c's train_gpt2.cu gets the same effect
with cudaMemcpyAsync from its pinned cpu buffers).
"""

import numpy as np
from numba import cuda


class PinnedUploads:
    """Pinned staging slots of `size` elements for async copies into device arrays on `stream`.

    slot = uploads.next_slot()               # a pinned host array, safe to overwrite now
    slot[:n] = ...                           # fill it (or part of it)
    uploads.send(slot, device, 0, n)         # device[0:n] = slot[0:n], queued on the stream
    slot[n:m] = ...; uploads.send(slot, device, n, m)   # more of the same slot, later
    """

    def __init__(self, size, dtype, stream, slots=2):
        if slots < 1 or size < 1:
            raise ValueError(f"PinnedUploads needs size >= 1 and slots >= 1, got {size}, {slots}")
        self.size, self.dtype, self.stream = int(size), np.dtype(dtype), stream
        self._slots = [cuda.pinned_array(self.size, dtype=self.dtype) for _ in range(slots)]
        self._copied = [None] * slots  # an event after the last copy out of each slot
        self._next = 0

    def next_slot(self):
        """The next pinned slot, after waiting (rarely) for the copies that last read it."""
        index = self._next
        self._next = (index + 1) % len(self._slots)
        if self._copied[index] is not None:
            self._copied[index].synchronize()
        return self._slots[index]

    def send(self, slot, device, start, stop):
        """Queue device[start:stop] = slot[start:stop] on the stream. slot: one of next_slot()'s,
        not refilled before its next turn (the event recorded here guards it until then)."""
        index = next((i for i, s in enumerate(self._slots) if s is slot), None)
        if index is None:
            raise ValueError("send() takes a slot that next_slot() returned")
        if device.dtype != self.dtype or device.ndim != 1 or not 0 <= start <= stop <= min(device.size, self.size):
            raise ValueError(f"send: device must be a 1-D {self.dtype} array holding [{start}, {stop}) "
                             f"(staging holds {self.size}), got {device.dtype} {tuple(device.shape)}")
        if stop > start:
            device[start:stop].copy_to_device(slot[start:stop], stream=self.stream)
        # one event per slot: a later record also covers the earlier copies (same stream)
        event = self._copied[index] or cuda.event()
        event.record(self.stream)
        self._copied[index] = event
