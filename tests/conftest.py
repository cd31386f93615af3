"""Test set-up: 8 CPU devices (for the sharded paths), quiet TensorFlow, no GPU probing; and the
helpers that more than one test module uses."""

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

DEVICES = 8
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")
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
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f not in ("common.py", "__init__.py")
)  # the shipped experiment configs, by module name
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int = DEVICES) -> dict[str, str]:
    """The environment of a child process: this checkout importable, `devices` CPU devices."""
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


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
    env = cpu_env(devices)
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


# --- Running the suite on several workers --------------------------------------------------

# Modules whose tests start several processes (multi-host jobs, preemption) or run a whole
# program end to end (the demo, the notebook, a gs:// life cycle, the benchmark's peer): under
# pytest-xdist they run on one worker, one after another, so that their processes never compete
# with each other's for the cores (`-n 0` runs everything in this process, in order).
PROCESS_MODULES = (
    "test_benchmark",
    "test_checkpoint",
    "test_demo",
    "test_evals",
    "test_logs",
    "test_notebook",
    "test_remote_workdir",
    "test_sharding",
    "test_siglip_train",
    "test_train",
)


def pytest_collection_modifyitems(config, items):
    """Each test joins an xdist group (`--dist loadgroup`): "processes" for those of
    PROCESS_MODULES, its module's otherwise, so that a module's fixtures are built once."""
    import pytest

    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        group = "processes" if module in PROCESS_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))


# --- Configs ---------------------------------------------------------------------------------


def load_config(name: str, arg: str | None = None):
    """`configs/NAME.py`'s get_config(ARG)."""
    return importlib.import_module(f"configs.{name}").get_config(arg)


def with_overrides(config, **overrides):
    """CONFIG with each dotted key (`"optim.learning_rate"`) set to its value, in place."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    """The tiny config for 6 steps, each logged, with OVERRIDES (dotted keys) applied."""
    short = {"total_steps": 6, "log_every_steps": 1}
    return with_overrides(load_config("tiny"), **{**short, **overrides})


def train_data_config(**overrides):
    """A whole `train_data` config (every key, as the input pipeline reads them), OVERRIDES set."""
    return with_overrides(load_config("tiny").train_data, **overrides)


def open_train_source(
    cfg, *, size=8, length=8, vocab=49408, seed=0, process_index=0, process_count=1, **kw
):
    """`pipeline.make_source(cfg)` for a small model, one process by default (`kw`: tokenizer)."""
    from clip_jax.data import pipeline

    return pipeline.make_source(
        cfg,
        seed=seed,
        image_size=size,
        context_length=length,
        vocab_size=vocab,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )


# --- A run's outputs -------------------------------------------------------------------------


def read_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_losses(workdir) -> dict[int, float]:
    """{step: loss} of a run's metrics; a resumed run's rows come last and win (rows without a
    loss, as a rollback's, left out)."""
    return {r["step"]: r["loss"] for r in read_rows(workdir) if "loss" in r}


def worst_rel_err(ours, ref) -> float:
    """max over rows of ||ours - ref||_inf / ||ref||_inf."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)))


# --- Data ------------------------------------------------------------------------------------


def write_shard_with_bad_records(directory, good=64, image_size=32):
    """One shard: 3 undecodable images first (truncated JPEG, non-image bytes, empty), then
    `good` real handwritten digits; read in file order (shuffle_buffer=0)."""
    from clip_jax.data import digits
    from clip_jax.data.prepare import ShardWriter, make_example

    os.makedirs(directory, exist_ok=True)
    images, labels = digits.load_digits()
    jpegs = [digits.render(images[i], image_size) for i in range(good)]
    bad = [jpegs[0][: len(jpegs[0]) // 2], b"not an image at all", b""]
    with ShardWriter(str(directory), "mixed", 1000) as writer:
        for i, data in enumerate(bad):
            writer.write(make_example(data, "a broken picture", f"bad{i}"))
        for i, data in enumerate(jpegs):
            writer.write(make_example(data, f"the digit {labels[i]}", f"{i:04d}"))
    return f"tfrecord:{directory}/mixed-*.tfrecord", len(bad)


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar file of (name, bytes) members in the given order: a webdataset shard."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_wds_with_bad_records(directory, good=64, image_size=32, shards=1):
    """webdataset shards of handwritten digits, `good` usable samples (captions in `.txt`, every
    third one in `.json`) dealt over `shards` tars, the first shard opening with 5 bad samples: a
    truncated JPEG, non-image bytes, an image without a caption, a caption without an image and a
    `.json` without a caption. Returns the source string and the number of bad samples."""
    from clip_jax.data import digits

    os.makedirs(directory, exist_ok=True)
    images, labels = digits.load_digits()
    jpegs = [digits.render(images[i], image_size) for i in range(good)]
    bad = [
        [("bad0.jpg", jpegs[0][: len(jpegs[0]) // 2]), ("bad0.txt", b"a broken picture")],
        [("bad1.jpg", b"not an image at all"), ("bad1.txt", b"a broken picture")],
        [("bad2.jpg", jpegs[1])],
        [("bad3.txt", b"a caption alone")],
        [("bad4.png", jpegs[2]), ("bad4.json", b'{"url": "no caption here"}')],
    ]
    samples = []
    for i, data in enumerate(jpegs):
        text = f"the digit {labels[i]}"
        if i % 3 == 2:
            meta = json.dumps({"caption": text, "key": f"{i:04d}"}).encode()
            samples.append([(f"{i:04d}.jpg", data), (f"{i:04d}.json", meta)])
        else:
            samples.append([(f"{i:04d}.jpg", data), (f"{i:04d}.txt", text.encode())])
    for s in range(shards):
        members = [m for sample in (bad if s == 0 else []) + samples[s::shards] for m in sample]
        write_tar(os.path.join(directory, f"shard-{s:05d}.tar"), members)
    return f"wds:{directory}/shard-*.tar", len(bad)
