"""The training core on 8 CPU devices: exact accumulation, identical losses whatever the mesh or
the process count, the non-finite guard, a tiny model that learns, and the CLI's errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax.models import CLIP, model_config
from clip_jax.parallel import sharding
from clip_jax.training import guard, losses
from clip_jax.training import trainer as train
from clip_jax.training.train_step import make_loss_and_grad
from configs import tiny
from tests.conftest import (
    read_losses,
    read_rows,
    run_processes,
    run_python,
    tiny_config,
    write_shard_with_bad_records,
    write_wds_with_bad_records,
)


def test_accumulation_gives_the_large_batch_gradient():
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    model = CLIP(**model_config("tiny"))
    images = jax.random.normal(jax.random.key(1), (64, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (64, 16), 1, 49407)
    batch = {"image": images, "text": tokens}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1]))["params"]
        batch = jax.device_put(
            batch,
            {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)},
        )
        loss_fn = losses.make_loss_fn("softmax", mesh, sharding.BATCH_AXES)
        whole = make_loss_and_grad(model, loss_fn, mesh, accum_steps=1, frozen=())
        accum = make_loss_and_grad(model, loss_fn, mesh, accum_steps=4, frozen=())
        key = jax.random.key(3)
        whole, accum = (
            jax.jit(whole)(params, {}, batch, key),
            jax.jit(accum)(params, {}, batch, key),
        )
    np.testing.assert_allclose(accum[0], whole[0], rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(whole[1]))
    for a, b in zip(jax.tree.leaves(accum[1]), jax.tree.leaves(whole[1]), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("accum_steps", [1, 2])
@pytest.mark.parametrize("frozen", [("visual",), ("text_tower",)])
def test_a_frozen_tower_gets_no_gradient(frozen, accum_steps):
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    model = CLIP(**model_config("tiny"))
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (16, 16), 1, 49407)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1]))["params"]
        loss_fn = losses.make_loss_fn("softmax", mesh, sharding.BATCH_AXES)
        fn = make_loss_and_grad(model, loss_fn, mesh, accum_steps=accum_steps, frozen=frozen)
        batch = {"image": images, "text": tokens}
        _, grads, _ = jax.jit(fn)(params, {}, batch, jax.random.key(3))
    for group in ("visual", "text_tower"):
        norm = float(optax.tree.norm(grads[group]))
        assert (norm == 0) == (group in frozen), (group, norm)
    assert float(grads["logit_scale"]) != 0  # the temperature trains on


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("data8"))
    train.run(tiny_config(**{"mesh.data": 8}), workdir)
    return read_losses(workdir)


def test_losses_equal_on_a_2x2x2_mesh(tmp_path, reference_losses):
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    train.run(config, str(tmp_path))
    got = read_losses(str(tmp_path))
    assert sorted(got) == list(range(1, 7))
    for step, loss in reference_losses.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)


def test_two_processes_match_one(tmp_path, reference_losses):
    args = [
        "--config=configs/tiny.py",
        f"--workdir={tmp_path}",
        "--config.total_steps=6",
        "--config.log_every_steps=1",
        "--config.mesh.data=8",
    ]
    for returncode, out in run_processes("clip_jax.main", args):
        assert returncode == 0, out[-3000:]
    got = read_losses(str(tmp_path))
    for step, loss in reference_losses.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)


def test_tiny_config_learns(tmp_path):
    metrics = train.run(tiny.get_config(), str(tmp_path))
    got = read_losses(str(tmp_path))
    assert sorted(got) == [10, 20, 30, 40, 50]
    assert got[50] < 0.6 * got[10], got
    rows = read_rows(str(tmp_path))
    for key in (
        "step",
        "loss",
        "learning_rate",
        "logit_scale",
        "pairs_per_sec",
        "skipped_examples",
        "grad_norm",
        "step_time",
    ):
        assert key in rows[-1]
    assert metrics["loss"] == rows[-1]["loss"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_nonfinite_loss_halts_with_the_step(tmp_path):
    config = tiny_config(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0})
    with pytest.raises(guard.NonFiniteLossError, match=r"non-finite at step \d+"):
        train.run(config, str(tmp_path))


def test_nonfinite_loss_skipped_when_asked(tmp_path):
    config = tiny_config(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0})
    config.nonfinite = "skip"
    config.nonfinite_max_consecutive = 1000  # told to go on whatever happens
    config.nonfinite_max_fraction = 1.0
    last = train.run(config, str(tmp_path))
    assert last["nonfinite_steps"] >= 1


def test_cli_bad_mesh_is_one_clear_line(tmp_path):
    args = ["-m", "clip_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}"]
    result = run_python([*args, "--config.mesh.data=3"], timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: mesh data=3" in result.stderr


@pytest.mark.parametrize("kind", ["tfrecord", "wds"])
@pytest.mark.parametrize("steps,passes", [(2, 1), (4, 2)])
def test_training_on_shards_counts_planted_bad_records_per_pass(tmp_path, steps, passes, kind):
    write = write_shard_with_bad_records if kind == "tfrecord" else write_wds_with_bad_records
    source, planted = write(tmp_path / "data")
    config = tiny_config(
        **{"train_data.source": source, "train_data.shuffle_buffer": 0, "total_steps": steps}
    )
    last = train.run(config, str(tmp_path / "run"))  # 2 steps of 32 = one pass of 64 examples
    assert last["skipped_examples"] == planted * passes
    assert np.isfinite(last["loss"])
