"""Model FLOPs utilisation: achieved FLOP/s over the card's dense bf16 tensor-core peak.

Peaks are the vendors' dense (no sparsity) bf16 figures, as llm.c's llmc/mfu.h uses; a card not
in the table reports no MFU rather than a made-up one.
"""

# (substring of the device name, dense bf16 TFLOP/s), most specific first
BF16_PEAK_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / HBM3
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
]


def peak_bf16_tflops(device_name):
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def mfu(flops_per_step, seconds_per_step, device_name):
    """Fraction of peak, or None for an unknown card."""
    peak = peak_bf16_tflops(device_name)
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12)
