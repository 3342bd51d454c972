"""The fused classifier's candidates side by side at the training step's logits: v1 against v2 (the
row kept in shared memory) and v3 (v2 with batched sums, the default), at d12 B=64 (65,536 rows) and d48 B=16 (16,384
rows), T=1024, V=50257 of Vp=50304 columns. One call per micro-step (vs_llmc.py's runs have one
micro-step per step), so "step ms" = ms.

    python benchmarks/classifier_candidates.py

Each configuration first runs once on a fresh copy of the same logits: its losses and dlogits are
compared with v1's at 512 threads (v2 should match bit for bit at the same block size; any other
block size sums in another order, and the column gives the largest differences), and 32 sampled
rows with the float64 reference (relative errors; FAILED past 1e-5 / 4e-3, non-finite losses or
touched padding). Then it is timed in place (later calls see dlogits as logits).
GB/s counts the floor: one read and one write of the real logits (loss only: one read). The logits
are a hash of their position (uniform in [-8, 8)), drawn on the GPU; padding columns hold NaN.
"""

from common import copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda, float32, int64, uint32

from nanollm import reference
from nanollm.kernels import classifier
from nanollm.kernels.bf16 import bf16_to_float, float_to_bf16, from_bf16_bits, squirrel_noise5

T, V, Vp = 1024, 50257, 50304
SETTINGS = [("d12", 64, 1), ("d48", 16, 1)]  # model, B, classifier calls per step
# (variant, block size, write dlogits); the first is the baseline every row is compared with
CONFIGS = [("v1", 512, True), ("v1", 1024, True), ("v2", 512, True), ("v2", 1024, True), ("v2", 384, True),
           ("v3", 384, True), ("v3", 512, True), ("v1", 512, False), ("v2", 512, False)]
SAMPLE_ROWS = 32


@cuda.jit
def fill_logits_kernel(bits, columns, real_columns, seed):
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    while i < bits.size:
        if i % columns < real_columns:
            noise = squirrel_noise5(uint32(i & 0xFFFFFFFF), uint32(seed) ^ uint32(i >> 32))
            bits[i] = float_to_bf16((float32(noise >> uint32(8)) * float32(2.0**-24) - float32(0.5)) * float32(16.0))
        else:
            bits[i] = 0xFFFF  # NaN: a kernel that read padding would give NaN losses
        i += int64(cuda.gridDim.x) * cuda.blockDim.x


@cuda.jit
def compare_bf16_kernel(a, b, differing, largest):
    """differing[0] += how many bf16 values differ; largest[0] = max |a - b| over finite pairs."""
    i = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    count = 0
    biggest = float32(0.0)
    while i < a.size:
        if a[i] != b[i]:
            count += 1
            d = abs(bf16_to_float(a[i]) - bf16_to_float(b[i]))
            if d == d:
                biggest = max(biggest, d)
        i += int64(cuda.gridDim.x) * cuda.blockDim.x
    if count:
        cuda.atomic.add(differing, 0, count)
        cuda.atomic.max(largest, 0, biggest)


def grid_for(n, threads=512):
    """Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more than needed."""
    return max(1, min(8 * cuda.get_current_device().MULTIPROCESSOR_COUNT, -(-n // threads)))


def compare(a, b):
    differing, largest = cuda.to_device(np.zeros(1, np.int64)), cuda.to_device(np.zeros(1, np.float32))
    compare_bf16_kernel[grid_for(a.size), 512](a.reshape(a.size), b.reshape(b.size), differing, largest)
    return int(differing.copy_to_host()[0]), float(largest.copy_to_host()[0])


def rows_to_host(array, rows):
    return np.stack([array[int(r)].copy_to_host() for r in rows])


def reference_errors(source, logits, losses, targets, rows, dloss, write):
    """Largest relative loss error and relative L2 error of dlogits (0 if not written) on the sampled
    rows, and whether their padding columns (and, loss only, all columns) are untouched."""
    before, after = rows_to_host(source, rows), rows_to_host(logits, rows)
    values = from_bf16_bits(before).astype(np.float64)
    probs, expected_losses = reference.softmax_cross_entropy_forward(values, targets[rows], V)
    loss_err = np.max(np.abs(losses.copy_to_host()[rows] - expected_losses) / expected_losses)
    if not write:
        return loss_err, 0.0, np.array_equal(after, before)
    expected = reference.softmax_cross_entropy_backward(probs, targets[rows], dloss)
    dlogits_err = np.linalg.norm(from_bf16_bits(after[:, :V]) - expected) / np.linalg.norm(expected)
    return loss_err, dlogits_err, np.array_equal(after[:, V:], before[:, V:])


def occupancy(variant, block_size, write_dlogits):
    """(registers per thread, resident blocks per SM) of the kernel a configuration launches."""
    dispatcher = classifier.TRAINING_KERNELS[variant] if write_dlogits else classifier.fused_classifier_kernel
    compiled = dispatcher.compile(classifier._SIGNATURE)
    shared = classifier.staged_row_bytes(V) if variant != "v1" and write_dlogits else 0
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    return compiled.regs_per_thread, compiled.max_cooperative_grid_blocks(block_size, shared) // sms


def main():
    copy = copy_bandwidth_gbs()
    rows_out = []
    for model, B, calls_per_step in SETTINGS:
        rows = B * T
        rng = np.random.default_rng(0)
        source = cuda.device_array((rows, Vp), np.uint16)
        fill_logits_kernel[grid_for(source.size), 512](source.reshape(source.size), Vp, V, 1234)
        targets = rng.integers(0, V, rows).astype(np.int32)
        targets[0], targets[-1] = V - 1, 0
        device_targets = cuda.to_device(targets)
        sample = np.sort(rng.choice(rows, SAMPLE_ROWS, replace=False))
        dloss = 1.0 / rows
        logits, losses = cuda.device_array_like(source), cuda.device_array(rows, np.float32)
        baseline = None  # (losses, dlogits) of the first configuration
        for variant, block_size, write in CONFIGS:
            def run():
                classifier.fused_classifier(logits, losses, dloss, device_targets, V, write_dlogits=write,
                                            block_size=block_size, variant=variant)

            logits.copy_to_device(source)
            run()
            loss_err, dlogits_err, untouched = reference_errors(source, logits, losses, targets, sample, dloss, write)
            good = np.isfinite(losses.copy_to_host()).all() and loss_err < 1e-5 and dlogits_err < 4e-3 and untouched
            checked = f"{loss_err:.0e} / {dlogits_err:.0e}" + ("" if good else " FAILED")
            if baseline is None:
                baseline = losses.copy_to_host(), cuda.device_array_like(source)
                baseline[1].copy_to_device(logits)
                same = "(baseline)"
            else:
                loss_diff = np.max(np.abs(losses.copy_to_host() - baseline[0]))
                if write:
                    differing, largest = compare(logits, baseline[1])
                    same = "bit-equal" if loss_diff == 0 and differing == 0 else \
                        f"loss |d|<={loss_diff:.1e}; {differing} dlogits differ, |d|<={largest:.1e}"
                else:
                    same = "loss bit-equal" if loss_diff == 0 else f"loss |d|<={loss_diff:.1e}"
            ms = time_ms(lambda i: run(), warmup=3, repeat=20, per_batch=10)
            gbs = (2 if write else 1) * rows * V * 2 / ms / 1e6
            regs, blocks_per_sm = occupancy(variant, block_size, write)
            rows_out.append(dict(model=f"{model} B={B}", variant=variant, mode="dlogits" if write else "loss only",
                                 block=block_size, occupancy=f"{regs} regs, {blocks_per_sm} blocks/SM", ms=ms,
                                 gbs=gbs, pct=100 * gbs / copy, step=ms * calls_per_step,
                                 checked=checked, same=same))
        source = logits = baseline = None  # the GPU memory freed before the next model's arrays
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    print_table(f"Fused classifier candidates, T={T}, V={V}/{Vp}", rows_out,
                [("model", "model", "{}"), ("variant", "variant", "{}"), ("mode", "mode", "{}"),
                 ("block", "threads", "{}"), ("occupancy", "occupancy", "{}"), ("ms", "ms", "{:.3f}"),
                 ("gbs", "GB/s", "{:.0f}"), ("pct", "% of copy", "{:.0f}%"), ("step", "step ms", "{:.3f}"),
                 ("checked", "vs reference: loss / dlogits", "{}"), ("same", "vs v1 [512]", "{}")])


if __name__ == "__main__":
    main()
