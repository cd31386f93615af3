"""The Colab notebook (notebooks/clip_jax_colab.ipynb): committed without outputs, and its code
cells, those tagged `colab-only` skipped, run in order in one namespace on a 2-device CPU with a
short run, as a user's kernel would run them."""

import json
import os
import re
import subprocess
import sys

import pytest

from clip_jax.data import digits
from tests.conftest import PNG_SIGNATURE, ROOT, cpu_env

NOTEBOOK = os.path.join(ROOT, "notebooks", "clip_jax_colab.ipynb")
STEPS = 12  # instead of the demo's own: compile, a few steps, the evals, a checkpoint
SHOWN = 6  # held-out digits printed and drawn with their predictions
DEVICES = 2  # "all the runtime's cores": the batch is split over two CPU devices


def _notebook() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _code_cells(notebook: dict) -> list[dict]:
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_is_committed_without_outputs():
    notebook = _notebook()
    assert notebook["nbformat"] == 4
    cells = _code_cells(notebook)
    assert cells
    for i, cell in enumerate(cells):
        assert cell["outputs"] == [], f"code cell {i} has outputs"
        assert cell["execution_count"] is None, f"code cell {i} has an execution count"
    markdown = [c for c in notebook["cells"] if c["cell_type"] == "markdown"]
    assert len(markdown) >= len(cells) // 2  # a tutorial: each step explained


def test_colab_set_up_is_tagged_and_the_rest_is_plain_python():
    cells = _code_cells(_notebook())
    colab = "\n".join(_source(c) for c in cells if "colab-only" in _tags(c))
    assert "jax[tpu]" in colab and "/dev/accel" in colab  # a TPU found: its JAX installed
    assert re.search(r'^REPO = ""', colab, re.M)  # the placeholder the user sets
    assert '"-e"' in colab and "[demo]" in colab  # the clone installed, with scikit-learn
    parameters = [c for c in cells if "parameters" in _tags(c)]
    assert len(parameters) == 1
    assert "TOTAL_STEPS = None" in _source(parameters[0])
    for i, cell in enumerate(cells):
        if "colab-only" in _tags(cell):
            continue
        source = _source(cell)
        for line in source.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"cell {i}: {line!r} is no Python"
        compile(source, f"cell {i}", "exec")


def _script(cells: list[dict], workdir: str) -> str:
    """The cells a user's kernel runs on a CPU, one module: colab-only ones left out, the
    parameters overridden right after their cell (as papermill injects them)."""
    parts = []
    for i, cell in enumerate(cells):
        if "colab-only" in _tags(cell):
            continue
        parts.append(f"# --- code cell {i} ---\n{_source(cell)}\n")
        if "parameters" in _tags(cell):
            overrides = f"TOTAL_STEPS = {STEPS}\nWORKDIR = {workdir!r}\nNUM_SHOWN = {SHOWN}\n"
            parts.append(f"# --- injected parameters ---\n{overrides}")
    return "\n".join(parts)


def test_notebook_runs_on_cpu(tmp_path):
    pytest.importorskip("sklearn")  # the digits ship inside scikit-learn
    pytest.importorskip("matplotlib")
    workdir = tmp_path / "run"
    script = tmp_path / "notebook.py"
    script.write_text(_script(_code_cells(_notebook()), str(workdir)))
    env = {
        **cpu_env(DEVICES),
        "CLIP_JAX_CACHE": str(tmp_path / "cache"),  # the digits are written afresh
        "MPLBACKEND": "Agg",
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,  # about a minute on 2 idle cores, longer when others share them
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-4000:]

    assert f"on {DEVICES} x cpu" in out
    assert re.search(rf"global batch \d+, {STEPS} steps", out)
    assert "trained: final loss" in out
    assert f"curves: {workdir / 'curves.png'}" in out  # no IPython here: the path is printed
    assert (workdir / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert re.search(rf"zeroshot/digits/top1 +{STEPS} +0\.\d{{4}}", out)  # the results table

    zeroshot = re.search(
        rf"zero-shot top-1 on the {digits.TEST_SIZE} held-out digits: (\d\.\d{{3}})", out
    )
    assert zeroshot, out[-3000:]
    shown = re.findall(r"^  true (\w+) +predicted (\w+)", out, re.M)
    classnames = set(digits.CLASS_NAMES)
    assert len(shown) == SHOWN and all({true, pred} <= classnames for true, pred in shown)
    probe = re.search(
        rf"linear probe top-1 on the {digits.TEST_SIZE} held-out digits: (\d\.\d{{3}}) \(C = ", out
    )
    assert probe, out[-3000:]

    # The notebook's own zero-shot and probe (digits decoded by PIL, fit at the run's C) agree with
    # the run's evals of the same checkpoint (decoded by TensorFlow). The two JPEG decoders
    # differ by a few levels on some pixels, and a 12-step model's probe is sensitive to them:
    # 0.03 apart (9 of 300 digits) has been seen, so the probe is held to 0.05.
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for r in rows if r["step"] == STEPS for k, v in r.items()}
    assert abs(float(zeroshot[1]) - final["zeroshot/digits/top1"]) <= 0.02
    assert abs(float(probe[1]) - final["linear_probe/probe/top1"]) <= 0.05
