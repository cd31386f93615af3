"""Test set-up: 8 CPU devices (for the sharded paths), quiet TensorFlow, no GPU probing."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA's persistent compilation cache, shared by this session and the processes it starts: the
# suite compiles the same tiny train step many times (each run builds its step afresh), and a
# cached executable is the same computation, loaded in milliseconds instead of compiled in
# seconds.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "clip_jax_tests_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# TensorFlow's bundled libraries make a later import of triton (which open_clip pulls in through
# torchvision) crash the process; the other order is fine. Import the reference first if present.
with contextlib.suppress(ImportError):
    import open_clip  # noqa: F401


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root with this checkout importable; output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_processes(module: str, args: list[str], num_processes: int = 2, devices: int = 4):
    """Runs `python -m module args` as `num_processes` processes of `devices` CPU devices each,
    joined by jax.distributed on 127.0.0.1; returns their (returncode, output) pairs."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]
