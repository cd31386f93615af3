"""Config validation at start-up: every shipped config passes; each bad value is one UsageError
line naming the key, the value and what is allowed, in-process and through the command line."""

import os
import subprocess
import sys

import pytest

from clip_jax.evals import registry
from clip_jax.infra.errors import UsageError
from clip_jax.training import validate
from clip_jax.weights.state_dicts import abstract_variables
from configs import common, tiny
from tests.conftest import CONFIGS, ROOT, load_config, run_python, with_overrides


def with_value(name: str, key: str, value):
    return with_overrides(load_config(name), **{key: value})


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_validates(name, arg):
    validate.validate(load_config(name, arg))


def test_every_key_of_a_training_config_has_a_rule():
    keys = set(common.MEANINGS) - {"evals"}
    assert keys <= set(validate.RULES), keys - set(validate.RULES)
    for kind in registry.TYPES:  # an eval entry's keys have theirs with their type
        assert all(key.rule.allowed for key in registry.keys(kind).values()), kind


def test_a_config_has_every_key_its_rules_name():
    """Defaults live in the config: every key is there (a ResNet has no ViT keys), the model's
    included, and a config that lacks one is refused naming it, never filled in by the code."""
    for name in ("tiny", "rn50"):
        c = load_config(name)
        for key in validate.RULES:
            node = c
            for part in key.split("."):
                assert part in node or key in validate.VIT_KEYS, (name, key)
                node = node.get(part, {})
    c = load_config("tiny")
    with c.unlocked():
        del c.train_data["shuffle_buffer"]
    with pytest.raises(UsageError, match="^the config has no train_data.shuffle_buffer: derive"):
        validate.validate(c)


def test_a_loss_that_does_not_fit_the_model_is_refused_unless_asked_for():
    c = load_config("siglip2_b16", "smoke")
    validate.validate(c)
    with_overrides(c, **{"loss.name": "softmax"})
    with pytest.raises(UsageError, match="^loss.name='softmax' with a model that has a logit bias"):
        validate.validate(c)
    with_overrides(c, **{"loss.allow_mismatch": True})
    validate.validate(c)  # fine-tuning a SigLIP model with CLIP's loss, on purpose
    c = load_config("tiny")
    with_overrides(c, **{"loss.name": "sigmoid"})
    with pytest.raises(UsageError, match="^loss.name='sigmoid' needs a learned bias"):
        validate.validate(c)


def test_the_frozen_groups_are_the_models_top_level_parameters():
    model = {**load_config("tiny").model.to_dict(), "init_logit_bias": -10.0}
    assert set(abstract_variables(model)["params"]) == set(validate.FROZEN_GROUPS)


# Each bad value and the line it gives: the common mistakes first, then the other keys' bounds.
BAD = [
    ("optim.learning_rate", -1e-3, "optim.learning_rate=-0.001: use a positive number"),
    ("batch_size", 0, "batch_size=0: use a positive integer"),
    ("batch_size", -4, "batch_size=-4: use a positive integer"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0: use a positive integer"),
    ("total_steps", 0, "total_steps=0: use a positive integer"),
    ("log_every_steps", 0, "log_every_steps=0: use a positive integer"),
    ("optim.learning_rate", 0.0, "optim.learning_rate=0.0: use a positive number"),
    ("optim.learning_rate", float("nan"), "optim.learning_rate=nan: use a positive number"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1: use a number >= 0"),
    ("optim.b1", -0.5, "optim.b1=-0.5: use a number in [0, 1)"),
    ("optim.b2", 1.0, "optim.b2=1.0: use a number in [0, 1)"),
    ("optim.eps", 0.0, "optim.eps=0.0: use a positive number"),
    ("optim.accum_steps", 0, "optim.accum_steps=0: use a positive integer"),
    ("optim.accum_steps", 3, "batch_size=32: use a multiple of optim.accum_steps=3"),
    ("optim.schedule", "linear", "optim.schedule='linear': use one of 'cosine', 'constant'"),
    ("optim.frozen", ("vision",), "optim.frozen=('vision',): use a list of parameter groups"),
    ("optim.grad_clip_norm", -1.0, "optim.grad_clip_norm=-1.0: use a number >= 0"),
    ("mesh.data", 0, "mesh.data=0: use a positive integer, or -1 (the rest)"),
    ("mesh.fsdp", -2, "mesh.fsdp=-2: use a positive integer, or -1 (the rest)"),
    ("mesh.tensor", -1, "mesh={'data': -1, 'fsdp': 1, 'tensor': -1}: use -1 on at most one axis"),
    ("model.vision.image_size", 0, "model.vision.image_size=0: use a positive integer"),
    (
        "model.vision.image_size",
        36,
        "model.vision.image_size=36: use a multiple of model.vision.patch_size=8",
    ),
    ("model.vision.patch_size", -8, "model.vision.patch_size=-8: use a positive integer"),
    ("model.vision.heads", 3, "model.vision.heads=3: use a divisor of the width, 32"),
    ("model.text.heads", 5, "model.text.heads=5: use a divisor of the width, 32"),
    ("model.text.context_length", 0, "model.text.context_length=0: use a positive integer"),
    ("model.text.vocab_size", 0, "model.text.vocab_size=0: use a positive integer"),
    ("model.embed_dim", 0, "model.embed_dim=0: use a positive integer"),
    ("model.dtype", "int8", "model.dtype='int8': use a floating dtype"),
    ("model.remat_policy", "some", "model.remat_policy='some': use one of 'none', 'full', 'dots'"),
    ("loss.name", "clip", "loss.name='clip': use one of 'softmax', 'sigmoid'"),
    ("loss.name", "sigmoid", "loss.name='sigmoid' needs a learned bias: set model.init_logit_bias"),
    ("loss.chunk_size", -1, "loss.chunk_size=-1: use an integer >= 0 (0: not chunked)"),
    ("loss.max_logit_scale", 0.0, "loss.max_logit_scale=0.0: use a positive number"),
    ("nonfinite", "ignore", "nonfinite='ignore': use one of 'halt', 'skip', 'rollback'"),
    ("resume_step", 0, "resume_step=0: use None or a checkpoint's step"),
    ("spike.window", -1, "spike.window=-1: use an integer >= 0 (0: no spike detection)"),
    ("spike.factor", 0.0, "spike.factor=0.0: use a positive number"),
    ("spike.length", 0, "spike.length=0: use a positive integer"),
    ("spike.policy", "skip", "spike.policy='skip': use one of 'log', 'halt', 'rollback'"),
    ("max_rollbacks", -1, "max_rollbacks=-1: use"),
    ("rollback_lr_scale", 0.0, "rollback_lr_scale=0.0: use a number in (0, 1]"),
    ("rollback_lr_scale", 2.0, "rollback_lr_scale=2.0: use a number in (0, 1]"),
    ("keep_checkpoints", 0, "keep_checkpoints=0: use a positive integer"),
    ("keep_period", -1, "keep_period=-1: use an integer >= 0 (0: none)"),
    ("seed", True, "seed=True: use an integer"),
    ("train_data.crop_scale", (0.5, 1.5), "train_data.crop_scale=(0.5, 1.5): use (low, high)"),
    ("train_data.crop_scale", (0.0, 1.0), "train_data.crop_scale=(0.0, 1.0): use (low, high)"),
    ("train_data.shuffle_buffer", -1, "train_data.shuffle_buffer=-1: use an integer >= 0"),
    ("train_data.image_key", "", "train_data.image_key='': use a non-empty string"),
    ("train_data.tokenizer", "", "train_data.tokenizer='': use a non-empty string"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_key(key, value, message):
    with pytest.raises(UsageError) as e:
        validate.validate(with_value("tiny", key, value))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


BAD_EVALS = [
    ("every_steps", -1, "evals.digits.every_steps=-1: use an integer >= 0 (0: at the end only)"),
    ("batch_size", 0, "evals.digits.batch_size=0: use a positive integer"),
    ("templates", "", "evals.digits.templates='': use a name, a file or a list of strings"),
    ("type", "zero_shot", "evals.digits.type='zero_shot'; choose one of"),
    ("source", "", "evals.digits.source is empty"),
]


@pytest.mark.parametrize("key,value,message", BAD_EVALS, ids=[k for k, _, _ in BAD_EVALS])
def test_a_bad_eval_entry_is_one_line_naming_the_entry_and_key(key, value, message):
    c = load_config("demo")
    c.evals.digits[key] = value
    with pytest.raises(UsageError) as e:
        validate.validate(c)
    assert str(e.value).startswith(message), str(e.value)


def test_eval_keys_of_every_type_are_checked():
    c = load_config("demo")
    c.evals.probe.val_fraction = 1.0
    with pytest.raises(UsageError, match=r"^evals.probe.val_fraction=1.0: use a number in \(0, "):
        validate.validate(c)
    c = load_config("demo")
    with c.evals.unlocked():
        c.evals.r = dict(type="retrieval", source="tfds:coco_captions:test", ks=(1, 0))
        c.evals.f = dict(type="fewshot", source="digits:test", train_source="digits:train")
    with pytest.raises(UsageError, match=r"^evals.r.ks=\(1, 0\): use a list of positive integers"):
        validate.validate(c)
    c.evals.r.ks = (1, 5)
    c.evals.f.shots = (0,)
    with pytest.raises(UsageError, match=r"^evals.f.shots=\(0,\): use a list of positive integers"):
        validate.validate(c)


def test_the_model_keys_that_configs_may_add_are_checked():
    c = load_config("tiny")
    with c.unlocked():
        c.model.text.pool_type = "eot"
    with pytest.raises(UsageError, match="^model.text.pool_type='eot' needs model.text.eot"):
        validate.validate(c)
    with c.unlocked():
        c.model.text.eot_token_id = c.model.text.vocab_size
    with pytest.raises(UsageError, match="^model.text.eot_token_id=49408: use an id below"):
        validate.validate(c)
    with c.unlocked():
        c.model.text.eot_token_id = 49407
        c.model.attn_impl = "flash"
    with pytest.raises(UsageError, match="^model.attn_impl='flash': use one of None, 'xla'"):
        validate.validate(c)
    c = load_config("rn50")
    c.model.vision.layers = (3, 4, 6)
    with pytest.raises(UsageError, match=r"^model.vision.layers=\(3, 4, 6\): use a positive"):
        validate.validate(c)
    c.model.vision.layers = (3, 4, 6, 3)
    c.model.vision.heads = 30
    with pytest.raises(UsageError, match="^model.vision.heads=30: use a divisor of the width x 32"):
        validate.validate(c)


def test_the_command_line_refuses_a_bad_value_with_one_line(tmp_path):
    """Through `python -m clip_jax.main`, which validates before it opens data or builds the
    model (train.run's first step)."""
    command = [
        sys.executable,
        "-m",
        "clip_jax.main",
        "--config=configs/tiny.py",
        "--config.batch_size=0",
        f"--workdir={tmp_path}/w",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("CLIP_JAX_DEBUG", None)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: batch_size=0: use a positive integer"], result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "w")  # refused before anything was written


def test_keys_whose_default_is_none_take_a_value_on_the_command_line():
    """A sentencepiece run's pooling, SigLIP's bias and the attention kernel are None by default;
    the command line sets them (as a typed placeholder each, `common.NONE_KEYS`)."""

    def none_keys(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from none_keys(value, f"{prefix}{key}.")
            elif value is None:
                yield f"{prefix}{key}"

    for name in ("tiny", "rn50"):
        assert set(none_keys(load_config(name))) == set(common.NONE_KEYS), name
    result = run_python(
        [
            "-m",
            "clip_jax.main",
            "--config=configs/tiny.py",
            "--config.model.text.pool_type=eot",
            "--config.model.text.eot_token_id=3",
            "--config.model.init_logit_bias=-10",
            "--config.model.attn_impl=xla",
            "--show_config",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = {
        line.split(" = ")[0]: line.split(" = ")[1].split()[0]
        for line in result.stdout.splitlines()
        if " = " in line
    }
    assert shown["model.text.eot_token_id"] == "3" and shown["model.text.pool_type"] == "'eot'"
    assert shown["model.init_logit_bias"] == "-10.0" and shown["model.attn_impl"] == "'xla'"


def test_a_config_without_evals_is_refused_naming_them():
    c = load_config("tiny")
    with c.unlocked():
        del c["evals"]
    with pytest.raises(UsageError, match="^the config has no evals"):
        validate.validate(c)


def test_a_warmup_longer_than_the_run_is_said(monkeypatch):
    said = []
    monkeypatch.setattr(validate.logging, "warning", lambda msg, *a: said.append(msg % a))
    config = tiny.get_config()
    config.total_steps, config.optim.warmup_steps = 50, 51
    validate.validate(config)
    assert said == [
        "optim.warmup_steps=51 is longer than the run (total_steps=50): the learning rate "
        "never reaches optim.learning_rate"
    ]
