"""The accelerators clip_jax knows by name: memory and peak dense bfloat16 FLOP/s per chip, for
MFU (`clip_jax.benchmark`) and pod fit (`clip_jax.aot`). One table, so that both agree.

TPUs are named as JAX's `device_kind` names them, exactly ("TPU v5" is a v5p, "TPU v5 lite" a
v5e); GPUs by a model name that their `device_kind` contains ("NVIDIA H100 80GB HBM3").
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as libtpu describes it and as its datasheet rates it."""

    kind: str  # jax's device_kind
    chip_config: str  # libtpu's chip_config_name: "megacore" makes a chip's 2 TensorCores 1 device
    hbm_bytes: int
    peak_tflops: float  # dense bfloat16


# Google Cloud's TPU pages: HBM per chip (GiB) and peak bf16 TFLOP/s; keyed by libtpu's name.
TPUS = {
    "v4": Chip("TPU v4", "megacore", 32 * GiB, 275.0),
    "v5e": Chip("TPU v5 lite", "default", 16 * GiB, 197.0),
    "v5p": Chip("TPU v5", "megacore", 95 * GiB, 459.0),
    "v6e": Chip("TPU v6 lite", "default", 32 * GiB, 918.0),
}

# NVIDIA's datasheets: dense bf16 TFLOP/s (without sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a device of `device_kind`; None for CPUs and unknown chips."""
    for chip in TPUS.values():
        if device_kind == chip.kind:
            return chip.peak_tflops
    return next((t for name, t in GPU_PEAK_TFLOPS.items() if name in device_kind), None)
