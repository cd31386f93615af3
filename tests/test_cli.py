"""The command line as a user meets it: `--help` everywhere, one error line with exit status 2 for
each kind of mistake, the default workdir, and the summaries that start and end a run."""

import json
import os
import subprocess
import sys
import time

import pytest

from clip_jax.evals import registry
from clip_jax.infra import cli
from clip_jax.infra.errors import UsageError
from clip_jax.training import metrics, runs, summary
from configs import common, tiny
from tests.conftest import CONFIGS, ROOT, cpu_env, load_config, read_rows, tiny_config


def start(module: str, *args: str, cwd: str = ROOT, devices: int = 8) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**cpu_env(devices), "CLIP_JAX_DEBUG": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def main_error(*args: str, tmp_path) -> str:
    """Runs `python -m clip_jax.main --config=configs/tiny.py ARGS`; returns its one error line."""
    workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}/w"]
    code, _, err = finish(start("clip_jax.main", *args, *workdir))
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    return last


def test_help_exits_0_on_every_entry_point():
    commands = [
        ("clip_jax.main",),
        ("clip_jax.evaluate",),
        ("clip_jax.linear_probe",),
        ("clip_jax.benchmark",),
        ("clip_jax.convert", "export"),
        ("clip_jax.data.prepare",),
        ("clip_jax.data.digits",),
        ("clip_jax.data.tokenizers",),
    ]
    procs = [(c, start(*c, "--help")) for c in commands]
    for command, proc in procs:
        code, out, err = finish(proc)
        assert code == 0, (command, err[-2000:])
        assert "flags:" in out and "--" in out, (command, out[:500])


def test_user_errors_are_one_line_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("CLIP_JAX_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info, cli.user_errors():
        raise UsageError("mesh data=3: no")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: mesh data=3: no\n"
    with pytest.raises(ValueError, match="a bug"), cli.user_errors():
        raise ValueError("a bug")  # a plain ValueError is not the user's
    monkeypatch.setenv("CLIP_JAX_DEBUG", "1")
    with pytest.raises(UsageError), cli.user_errors():
        raise UsageError("shown with its traceback")


def test_batch_that_does_not_divide_over_the_data_devices(tmp_path):
    line = main_error("--config=configs/tiny.py", "--config.batch_size=30", tmp_path=tmp_path)
    assert line == (
        "error: batch_size 30 does not divide over the 8 batch shards of the mesh "
        "(data=8 x fsdp=1); use a multiple of 8"
    )


def test_export_of_a_missing_workdir_is_one_line(tmp_path):
    missing = tmp_path / "no_run"
    code, out, err = finish(
        start("clip_jax.convert", "export", f"--workdir={missing}", f"--out={tmp_path}/x.npz")
    )
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == [
        f"error: {missing}/config.json is missing: is {missing} a clip_jax run directory?"
    ]
    assert not out and not os.path.exists(tmp_path / "x.npz")


def test_mesh_that_does_not_match_the_devices(tmp_path):
    line = main_error("--config=configs/tiny.py", "--config.mesh.data=3", tmp_path=tmp_path)
    assert line.startswith("error: mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but there are 8")


def test_data_source_that_matches_nothing_fails_before_the_model(tmp_path):
    t0 = time.perf_counter()
    code, _, err = finish(
        start(
            "clip_jax.main",
            "--config=configs/tiny.py",
            f"--config.train_data.source=tfrecord:{tmp_path}/none-*.tfrecord",
            f"--workdir={tmp_path}/w",
        )
    )
    seconds = time.perf_counter() - t0
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: no files match '{tmp_path}/none-*.tfrecord' (train_data.source); check the path"
    )
    assert "parameters" not in err and "compiling" not in err  # the model was never built
    assert not os.path.exists(tmp_path / "w" / "config.json")
    assert seconds < 90, seconds  # TensorFlow's import, not a model build and compile


def test_paper_configs_refuse_to_train_on_synthetic_data_silently(tmp_path):
    line = main_error("--config=configs/b16.py", tmp_path=tmp_path)
    assert line.startswith("error: train_data.source is empty: give the data to train on, e.g. ")
    assert "--config.train_data.source=tfrecord:gs://" in line and "synthetic" in line
    for name in CONFIGS:
        source = load_config(name).train_data.source
        assert source != "synthetic" or name == "tiny", name
        assert load_config(name, "smoke")


def test_unknown_key_in_an_override(tmp_path):
    line = main_error(
        "--config=configs/tiny.py", "--config.optim.learnign_rate=0.1", tmp_path=tmp_path
    )
    assert line.startswith(
        "error: --config.optim.learnign_rate: configs/tiny.py has no key 'optim.learnign_rate' "
        "(did you mean 'optim.learning_rate'?)"
    )
    line = main_error(
        "--config=configs/tiny.py", "--config.model.vision.patchsize=4", tmp_path=tmp_path
    )
    assert "has no key 'model.vision.patchsize' (did you mean 'model.vision.patch_size'?)" in line


def test_unknown_key_or_model_inside_a_config_file(tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text(
        "from configs import common\n\n\n"
        "def get_config(arg=None):\n"
        '    c = common.base_config("tiny", learning_rate=5e-3)\n'
        "    c.optim.learnign_rate = 1e-3\n"
        "    return c\n"
    )
    line = main_error(f"--config={typo}", tmp_path=tmp_path)
    assert line.startswith(
        f"error: {typo}:6: `c.optim.learnign_rate = 1e-3`: the config has no key 'learnign_rate' "
        "(did you mean 'learning_rate'?)"
    )
    model = tmp_path / "model.py"
    model.write_text(
        "from configs import common\n\n\n"
        "def get_config(arg=None):\n"
        '    return common.base_config("ViT-B-17", learning_rate=5e-4)\n'
    )
    line = main_error(f"--config={model}", tmp_path=tmp_path)
    assert line.startswith(f"error: --config={model}: unknown model 'ViT-B-17'; known: RN101,")


def test_other_config_mistakes(tmp_path):
    cases = [
        (
            ["--config=configs/nope.py"],
            "error: --config=configs/nope.py: no file 'configs/nope.py'",
        ),
        (["--config=configs/tiny.py:huge"], "error: --config=configs/tiny.py:huge: unknown config"),
        (["--config=configs/tiny.py", "--nope"], "error: Unknown command line flag 'nope'"),
        (["--config=configs/tiny.py", "extra"], "error: unexpected arguments: extra"),
        (["--workdir=x"], "error: --config is required"),
    ]
    procs = [(argv, message, start("clip_jax.main", *argv)) for argv, message in cases]
    for argv, message, proc in procs:
        code, _, err = finish(proc)
        assert code == 2 and "Traceback" not in err, (argv, err[-2000:])
        assert err.strip().splitlines()[-1].startswith(message), (argv, err[-2000:])


BROKEN_CONFIGS = {
    "syntax.py": "from configs import common\n\n\ndef get_config(arg=None:\n    return 1\n",
    "imports.py": "import nonexistent_module\n\n\ndef get_config(arg=None):\n    return None\n",
    "raises.py": (
        "from configs import common\n\n\n"
        "def get_config(arg=None):\n"
        "    if arg:\n"
        '        raise ValueError(f"no variant {arg!r}")\n'
        '    return common.base_config("tiny", learning_rate=1e-3, warmup=5)\n'
    ),
}


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
    for name, text in BROKEN_CONFIGS.items():
        (tmp_path / name).write_text(text)
    syntax, imports, raises = (tmp_path / name for name in BROKEN_CONFIGS)
    main, workdir = "clip_jax.main", f"--workdir={tmp_path}/w"
    import_error = (
        f"error: --config={imports} does not load: {imports}:1: `import nonexistent_module`: "
        "ModuleNotFoundError: No module named 'nonexistent_module'"
    )
    cases = [
        (
            [main, f"--config={syntax}", workdir],
            [
                f"error: --config={syntax} does not load: {syntax}:4: SyntaxError: invalid syntax",
                "    def get_config(arg=None:",
                "                           ^",
            ],
        ),
        ([main, f"--config={imports}", workdir], [import_error]),
        (  # raised deeper, in configs/common.py: the config file's line that called it
            [main, f"--config={raises}", workdir],
            [
                f"error: --config={raises} does not load: {raises}:7: `return common.base_config("
                '"tiny", learning_rate=1e-3, warmup=5)`: TypeError: base_config() got an '
                "unexpected keyword argument 'warmup'"
            ],
        ),
        (
            [main, f"--config={raises}:big", workdir],
            [
                f"error: --config={raises}:big does not load: {raises}:6: `raise ValueError("
                "f\"no variant {arg!r}\")`: ValueError: no variant 'big'"
            ],
        ),
    ]
    # Every entry point that takes --config reads it the same way.
    for command in (
        ["clip_jax.evaluate", f"--workdir={tmp_path}/w"],
        ["clip_jax.linear_probe"],
        ["clip_jax.benchmark"],
        ["clip_jax.aot", "--topology=v5e:2x2"],
    ):
        cases.append(([*command, f"--config={imports}"], [import_error]))
    procs = [(argv, lines, start(*argv)) for argv, lines in cases]
    for argv, lines, proc in procs:
        code, _, err = finish(proc)
        assert code == 2 and "Traceback" not in err, (argv, err[-3000:])
        assert [line for line in err.splitlines() if "error:" in line] == lines[:1], (argv, err)
        assert err.strip().splitlines()[-len(lines) :] == lines, (argv, err[-3000:])


def test_a_config_file_that_does_not_load_keeps_its_traceback_under_debug(tmp_path):
    config = tmp_path / "raises.py"
    config.write_text(BROKEN_CONFIGS["raises.py"])
    proc = subprocess.run(
        [sys.executable, "-m", "clip_jax.main", f"--config={config}:big", f"--workdir={tmp_path}"],
        cwd=ROOT,
        env={**cpu_env(), "CLIP_JAX_DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert f'File "{config}", line 6, in get_config' in proc.stderr, proc.stderr[-3000:]


def test_a_workdir_holding_another_run_is_refused(tmp_path):
    other = tiny.get_config()
    other.model.vision.width = 64
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / runs.CONFIG_FILE).write_text(other.to_json_best_effort())
    line = main_error("--config=configs/tiny.py", tmp_path=tmp_path)
    assert line == (
        f"error: {tmp_path}/w holds a run of another config (model.vision.width: 64 -> 32): give "
        "another --workdir, or pass --config_change_ok to train on in this one"
    )


def test_which_config_changes_make_another_run(tmp_path):
    (tmp_path / runs.CONFIG_FILE).write_text(tiny_config().to_json_best_effort())
    for same in (
        {"total_steps": 99},
        {"model.dtype": "bfloat16"},
        {"optim.learning_rate": 1.0},
        {"model.patch_dropout": 0.5},  # FLIP's unmasked tuning resumes the masked run
    ):
        runs.check_same_run(tiny_config(**same), str(tmp_path))  # schedule, compute: same run
    for key, value in [("batch_size", 64), ("model.embed_dim", 16), ("train_data.source", "x")]:
        with pytest.raises(UsageError, match=f"holds a run of another config \\({key}: "):
            runs.check_same_run(tiny_config(**{key: value}), str(tmp_path))
    runs.check_same_run(tiny_config(), str(tmp_path / "fresh"))  # no config.json yet


def test_a_model_key_the_saved_run_lacks_stands_for_its_default(tmp_path):
    saved = json.loads(tiny_config().to_json_best_effort())
    del saved["model"]["scan_layers"]  # a run written before the key existed: unscanned
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(saved))
    runs.check_same_run(tiny_config(), str(tmp_path))
    with pytest.raises(UsageError, match=r"another config \(model.scan_layers: False -> True\)"):
        runs.check_same_run(tiny_config(**{"model.scan_layers": True}), str(tmp_path))


def test_config_files_are_locked_but_evals_take_entries():
    c = tiny.get_config()
    with pytest.raises(AttributeError, match="cannot be added"):
        c.optim.learnign_rate = 1.0
    c.evals.cifar10 = dict(type="zeroshot", source="tfds:cifar10:test")
    assert c.evals.cifar10.type == "zeroshot"


def test_every_config_key_has_a_meaning():
    eval_keys = registry.keys()
    meanings = {**common.MEANINGS, **{f"evals.*.{k}": v.meaning for k, v in eval_keys.items()}}
    for name in CONFIGS:
        config = load_config(name)
        lines = cli.describe_config(config, meanings).splitlines()
        assert len(lines) == len(cli.config_keys(config))
        for line in lines:
            assert "  # " in line and line.split("  # ")[1].strip(), (name, line)
    for kind in registry.TYPES:  # every key of every type says what it is
        assert all(key.meaning for key in registry.keys(kind).values()), kind


def test_show_config_prints_every_key_value_and_meaning():
    code, out, err = finish(start("clip_jax.main", "--config=configs/tiny.py", "--show_config"))
    assert code == 0, err[-2000:]
    lines = out.strip().splitlines()
    assert len(lines) == len(cli.config_keys(tiny.get_config()))
    assert any(line.startswith("batch_size = 32 ") and "# global batch" in line for line in lines)
    assert any(line.startswith("train_data.source = 'synthetic'") for line in lines)


def test_default_workdir_is_runs_config_name():
    assert cli.default_workdir("configs/b16.py") == os.path.join("runs", "b16")
    assert cli.default_workdir("configs/b16.py:smoke") == os.path.join("runs", "b16_smoke")
    assert cli.default_workdir("/x/demo.py:/data/digits") == os.path.join(
        "runs", "demo__data_digits"
    )


def test_a_run_starts_and_ends_with_a_summary_and_resumes_by_the_same_command(tmp_path):
    command = [
        f"--config={ROOT}/configs/tiny.py",
        "--config.total_steps=3",
        "--config.log_every_steps=100",
        "--config.checkpoint_every_steps=100",
    ]
    code, _, err = finish(start("clip_jax.main", *command, cwd=str(tmp_path), devices=2))
    assert code == 0, err[-3000:]
    workdir = os.path.join("runs", "tiny")
    assert f"workdir: {workdir} (the default" in err
    for row in (
        "devices  2 x cpu (2 per process), processes: 1",
        "mesh     data=2 fsdp=1 tensor=1",
        "batch    32 global, 16 per device",
        "data     synthetic",
        "model    1.64M parameters",
        f"workdir  {workdir} (a fresh run)",
    ):
        assert row in err, (row, err[-3000:])
    assert "compiled the train step in " in err and "FLOPs per step (XLA's cost analysis)" in err
    assert "step 1/3 (33.3%) loss " in err  # the first line comes at once, not at step 100
    assert "done: step 3 of 3 in " in err and "final loss  " in err
    assert os.path.join(tmp_path, workdir, "checkpoints", "3") in err
    rows = read_rows(tmp_path / workdir)
    assert [r["step"] for r in rows] == [3]  # progress lines are not metric rows

    code, _, err = finish(start("clip_jax.main", *command, cwd=str(tmp_path), devices=2))
    assert code == 0, err[-3000:]
    assert f"{workdir} already reached step 3 of 3: nothing to do" in err


def test_progress_line_leaves_compilation_and_evals_out(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    progress = metrics.Progress(total_steps=10, start_step=0, batch_size=8)
    assert progress.due(1) and not progress.due(2)
    clock[0] += 2.0
    assert progress.line(1, 3.5) == "step 1/10 (10.0%) loss 3.5000 4 pairs/s ETA 0:00:18"
    progress.exclude(60.0)  # an eval
    clock[0] += 61.0
    assert progress.line(2, 3.0) == "step 2/10 (20.0%) loss 3.0000 8 pairs/s ETA 0:00:12"
    clock[0] += metrics.PROGRESS_EVERY_S
    assert progress.due(3)
    assert summary.format_flops(2.5e12) == "2.50 TFLOPs" and summary.format_flops(None) == "unknown"


def test_show_config_into_a_pipe_closed_early_is_no_error():
    """`--show_config | head`: the reader stops after a line; no traceback, exit 0."""
    p = subprocess.Popen(
        [sys.executable, "-m", "clip_jax.main", "--config=configs/tiny.py", "--show_config"],
        cwd=ROOT,
        env=cpu_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # before a line is written: the write finds no reader, as after `head`
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
