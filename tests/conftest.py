"""Test set-up: 8 CPU devices (for the sharded paths), quiet TensorFlow, no GPU probing."""

import contextlib
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# TensorFlow's bundled libraries make a later import of triton (which open_clip pulls in through
# torchvision) crash the process; the other order is fine. Import the reference first if present.
with contextlib.suppress(ImportError):
    import open_clip  # noqa: F401
