"""Throughput accounting: tokens/s, model TFLOP/s per accelerator and MFU from the model's FLOPs per token.

Model FLOPs come from the shape (:func:`megatron_bliss.models.model_flops_per_token`: 6 x matmul parameters plus
attention, no recomputation counted), so MFU compares runs honestly whatever the kernels or recomputation. The peak
is the accelerator's dense bf16 rate; on the CPU there is no meaningful peak and MFU is left empty.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; matched by substring of the device name.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),   # SXM; the PCIe card is lower (756e12): set logging.peak_flops for it
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
)


def detect_peak_flops() -> float | None:
    """Dense bf16 peak FLOP/s of this rank's GPU by name, or None (CPU, or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def throughput_metrics(tokens: int, seconds: float, flops_per_token: float, num_devices: int,
                       peak_flops: float | None) -> dict:
    """tokens/s, TFLOP/s per device and MFU (None without a peak) for ``tokens`` processed in ``seconds``."""
    tokens_per_s = tokens / max(seconds, 1e-12)
    flops_per_device = tokens_per_s * flops_per_token / num_devices
    return {
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / peak_flops if peak_flops else None,
    }
