"""glibc's allocator, set for a CPU run from inside the process: no environment variable to set.

XLA allocates a train step's temporaries afresh at every call (1.87 GiB for B/32 at batch 16).
With glibc's defaults, worker threads get such blocks from `mmap` and give them back on free, so
every page is faulted in again every step (docs/performance.md, "Page faults"). One arena, no
mmap and no trimming keep them mapped: the step then faults nothing.

glibc takes these settings from `mallopt` as well as from `GLIBC_TUNABLES`, but only before a
second thread allocates: a thread's arena, once made, stays. So `tune()` runs when a command
starts (`python -m clip_jax.X` imports the package first, with one thread alive), and only
where it helps:
- Linux with glibc;
- a CPU run: no TPU or GPU device files, `JAX_PLATFORMS` empty or "cpu";
- one CPU device: with many forced devices (`--xla_force_host_platform_device_count`), one arena
  shared by all their threads costs more than the faults (the tiny step at batch 1024 on 8
  devices: 0.30 s -> 0.38 s);
- no malloc setting of the user's own in `GLIBC_TUNABLES`, and `CLIP_JAX_MALLOC` not "default".
"""

import ctypes
import glob
import os
import platform
import re
import threading

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = (
    (M_ARENA_MAX, 1),  # one arena for every thread
    (M_MMAP_MAX, 0),  # large blocks from the heap, not mmap
    (M_TRIM_THRESHOLD, -1),  # never give the heap's top back
)
ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")
_FORCED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")

status = "not set"  # what `tune` did, for the benchmark's report


def reason_not_to() -> str:
    """Why the settings do not apply to this process ("" when they do)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if os.environ.get("CLIP_JAX_MALLOC", "") == "default":
        return "CLIP_JAX_MALLOC=default"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and platforms.split(",")[0] != "cpu":
        return f"JAX_PLATFORMS={platforms}"
    if any(glob.glob(pattern) for pattern in ACCELERATOR_FILES) and not platforms:
        return "an accelerator"
    forced = _FORCED.search(os.environ.get("XLA_FLAGS", ""))
    if forced and int(forced.group(1)) > 1:
        return "several CPU devices"
    if threading.active_count() > 1:
        return "threads already running"
    return ""


def tune() -> str:
    """Applies `SETTINGS` where `reason_not_to` finds nothing against; returns what it did."""
    global status
    why = reason_not_to()
    if why:
        status = f"glibc defaults ({why})"
        return status
    libc = ctypes.CDLL(None)
    ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    status = "one arena, no mmap, no trim" if ok else "glibc defaults (mallopt refused)"
    return status
