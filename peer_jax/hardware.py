"""Peak dense bf16 matmul FLOP/s per device, by JAX device kind, for the `mfu` metric.

``Trainer.log_metrics`` logs ``mfu = model FLOP/s / (peak · devices)`` when
``TrainConfig.peak_flops_per_device`` is set, else with the peak this table gives for the
devices it runs on (none on CPU, or on an unknown accelerator: then no ``mfu``).

Sources: Google Cloud TPU system-architecture pages (per chip; v4 and v5p chips are one
megacore JAX device each) and NVIDIA's H100/H200 datasheets (dense, i.e. without 2:4 sparsity,
which the datasheets' headline figures include at 2×).
"""

from __future__ import annotations

import jax

# (substring of a lower-cased ``device_kind``, peak FLOP/s). First match wins, so more
# specific names come first ('tpu v5 lite' before 'tpu v5').
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports 'TPU v5'
    ("tpu v4", 275e12),
    ("h200", 989e12),  # H200 SXM; H200 NVL is lower but reports the same name family
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # H100 SXM5 (also 'H100 80GB HBM3')
)


def peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device of kind ``device_kind``; None if not in the table."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS:
        if name in kind:
            return peak
    return None


def peak_flops_per_device(devices=None) -> float | None:
    """The table's peak for ``devices`` (default ``jax.devices()``): None on CPU, for unknown
    kinds, or when the devices are not all of one kind."""
    devices = jax.devices() if devices is None else devices
    if not devices or any(d.platform == "cpu" for d in devices):
        return None
    kinds = {d.device_kind for d in devices}
    if len(kinds) != 1:
        return None
    return peak_flops(kinds.pop())
