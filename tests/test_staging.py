"""staging.PinnedUploads: async copies out of pinned, double-buffered slots (simulator in CI)."""

import numpy as np
import pytest
from numba import cuda

from nanollm.staging import PinnedUploads


def test_uploads_land_and_slots_alternate(rng):
    stream = cuda.stream()
    uploads = PinnedUploads(64, np.int32, stream, slots=2)
    device = cuda.to_device(np.full(64, -1, dtype=np.int32))  # poisoned
    seen = []
    for _ in range(5):
        values = rng.integers(-2**31, 2**31, 64, dtype=np.int64).astype(np.int32)
        slot = uploads.next_slot()
        seen.append(id(slot))
        slot[:40] = values[:40]
        uploads.send(slot, device, 0, 40)
        slot[40:] = values[40:]
        uploads.send(slot, device, 40, 64)  # a second copy from the same slot
        stream.synchronize()
        np.testing.assert_array_equal(device.copy_to_host(), values)
    assert seen[0] == seen[2] == seen[4] and seen[1] == seen[3] and seen[0] != seen[1]


def test_partial_send_leaves_the_rest(rng):
    stream = cuda.stream()
    uploads = PinnedUploads(16, np.int32, stream)
    device = cuda.to_device(np.full(16, -1, dtype=np.int32))
    slot = uploads.next_slot()
    slot[:] = 7
    uploads.send(slot, device, 4, 8)
    stream.synchronize()
    expected = np.full(16, -1, dtype=np.int32)
    expected[4:8] = 7
    np.testing.assert_array_equal(device.copy_to_host(), expected)


def test_bad_sends_are_refused():
    stream = cuda.stream()
    uploads = PinnedUploads(16, np.int32, stream)
    device = cuda.device_array(16, dtype=np.int32)
    with pytest.raises(ValueError, match="next_slot"):
        uploads.send(np.zeros(16, dtype=np.int32), device, 0, 16)
    slot = uploads.next_slot()
    with pytest.raises(ValueError, match="int32"):
        uploads.send(slot, cuda.device_array(16, dtype=np.float32), 0, 16)
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        uploads.send(slot, device, 0, 17)
    with pytest.raises(ValueError, match="size >= 1"):
        PinnedUploads(0, np.int32, stream)
