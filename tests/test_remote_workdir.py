"""The tiny config's whole life cycle with its workdir on `gs://`: train, resume, export,
evaluate, on a fake Google Cloud Storage server on 127.0.0.1 (tests/fake_gcs.py), while every
local-file call (`open`, `os.makedirs`, `os.path.exists`, ...) that sees a `gs:` path fails the
test: everything a run reads and writes goes through the path layer (clip_jax.infra.paths:
etils.epath) and orbax/tensorstore.

Routing: tensorstore (checkpoint arrays) follows TENSORSTORE_GCS_HTTP_URL; etils.epath's fsspec
backend (gcsfs) follows STORAGE_EMULATOR_HOST. With TensorFlow installed epath would take TF's
GCS filesystem, which has no emulator switch, so the test has epath take fsspec's: the code under
test calls the same epath API either way.
"""

import builtins
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

import clip_jax  # noqa: E402
from clip_jax.inference import (
    jobs,  # noqa: E402
    load,
)
from clip_jax.infra import paths
from clip_jax.training import checkpoint, runs  # noqa: E402
from clip_jax.training import trainer as train
from tests.conftest import free_port, tiny_config  # noqa: E402

BUCKET = "clip-jax-test"


@pytest.fixture(scope="module")
def fake_gcs():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "fake_gcs.py"), str(port), BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the fake GCS server did not start")
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    from etils.epath import gpath

    tf_installed = gpath._is_tf_installed
    gpath._is_tf_installed = lambda: False
    yield f"gs://{BUCKET}"
    gpath._is_tf_installed = tf_installed
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.kill()
    server.wait()


def _mentions_gs(args) -> bool:
    return any(
        isinstance(a, (str, bytes, os.PathLike)) and "gs:" in str(os.fspath(a)) for a in args
    )


@pytest.fixture
def no_local_calls_on_gs(monkeypatch):
    """Fails the test when a local-file function is called with a gs: path."""
    seen = []

    def guard(name, fn):
        def wrapped(*args, **kwargs):
            if _mentions_gs(args):
                seen.append(f"{name}{args!r}")
                raise AssertionError(f"local-file call on a gs:// path: {name}{args!r}")
            return fn(*args, **kwargs)

        return wrapped

    for module, names in (
        (builtins, ["open"]),
        (os, ["makedirs", "mkdir", "listdir", "scandir", "stat", "remove", "unlink", "rename"]),
        (os, ["replace", "rmdir"]),
        (os.path, ["exists", "isdir", "isfile", "abspath", "getsize", "realpath"]),
        (shutil, ["rmtree", "copy", "copyfile", "move"]),
    ):
        for name in names:
            monkeypatch.setattr(
                module, name, guard(f"{module.__name__}.{name}", getattr(module, name))
            )
    yield seen
    assert not seen, seen


def test_guard_catches_a_local_call_on_gs(no_local_calls_on_gs):
    with pytest.raises(AssertionError, match="local-file call"):
        os.makedirs("gs://bucket/run", exist_ok=True)
    no_local_calls_on_gs.clear()


def test_tiny_life_cycle_on_gs(fake_gcs, no_local_calls_on_gs, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_JAX_CACHE", str(tmp_path / "cache"))  # the digits: a local cache
    workdir = f"{fake_gcs}/runs/tiny"
    config = tiny_config(total_steps=4, checkpoint_every_steps=2, log_every_steps=1)
    config.evals.digits = dict(
        type="zeroshot",
        source="digits:test",
        classnames="digits",
        templates="digits",
        batch_size=64,
        every_steps=2,
    )
    first = train.run(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, create=False)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()

    # Resume: two more steps, from the checkpoint at step 4.
    config.total_steps = 6
    last = train.run(config, workdir)
    assert last["loss"] != first["loss"]
    root = paths.path(workdir)
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert rows[-1]["step"] == 6 and "zeroshot/digits/top1" in rows[-1]
    assert json.loads((root / "config.json").read_text())["total_steps"] == 6
    assert json.loads((root / train.DONE_FILE).read_text())["step"] == 6
    assert (root / "evals" / "step_6" / "digits.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in root.iterdir())
    assert (root / "curves.png").exists()

    # Export, and evaluate the run as a batch job writing its results to gs:// too.
    out = f"{workdir}/export/tiny.safetensors"
    assert load.export_run(workdir, out) == 6
    assert paths.path(out).stat().length > 0
    records = jobs.evaluate(None, workdir=workdir, output=f"{workdir}/eval/results.json")
    top1 = {r["dataset"]: r["metrics"]["top1"] for r in records}
    assert top1["digits"] == pytest.approx(last["zeroshot/digits/top1"], abs=1e-6)
    assert json.loads((root / "eval" / "results.json").read_text())[0]["dataset"] == "digits"
    model, variables, step = runs.load_run(workdir)
    assert step == 6 and model.embed_dim == config.model.embed_dim
    # The one-line loaders read both from gs:// too: the run's directory and the export.
    _, from_run = clip_jax.load_pretrained(workdir)
    _, from_export = clip_jax.load_pretrained(out)
    leaves = [jax.tree.leaves(v) for v in (variables, from_run, from_export)]
    for a, b, c in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=0)
