"""Training the SigLIP towers with the sigmoid loss: identical losses on 8 devices, a 2x2x2 mesh,
1 device and 2 processes (as CLIP's in test_train.py), and LiT-style locked towers."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from clip_jax.models import CLIP, model_config
from clip_jax.parallel import sharding
from clip_jax.training import losses
from clip_jax.training import trainer as train
from clip_jax.training.train_step import make_loss_and_grad
from tests.conftest import (
    ROOT,
    cpu_env,
    load_config,
    read_losses,
    read_rows,
    run_processes,
    with_overrides,
)

SHORT = {"total_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 6}


def siglip_config(**overrides):
    """The SigLIP demo's smoke config (tiny-siglip, sigmoid loss, synthetic pairs of batch 8) for
    6 steps, each logged, with OVERRIDES applied."""
    return with_overrides(load_config("siglip_demo", "smoke"), **{**SHORT, **overrides})


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("siglip8"))
    train.run(siglip_config(**{"mesh.data": 8}), workdir)
    losses_ = read_losses(workdir)
    assert sorted(losses_) == list(range(1, 7))
    rows = [r for r in read_rows(workdir) if "loss" in r]
    assert rows[0]["logit_bias"] != rows[-1]["logit_bias"]  # the bias is logged and trains
    return losses_


def cli_args(workdir, **overrides):
    return [
        "--config=configs/siglip_demo.py:smoke",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in {**SHORT, **overrides}.items()),
    ]


def test_siglip_losses_equal_on_a_2x2x2_mesh_and_one_device(tmp_path, reference_losses):
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    train.run(siglip_config(**mesh), str(tmp_path / "mesh"))
    one = subprocess.run(  # a process of its own: this one has 8 devices
        [sys.executable, "-m", "clip_jax.main", *cli_args(tmp_path / "one")],
        cwd=ROOT,
        env=cpu_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("mesh", "one"):
        got = read_losses(str(tmp_path / name))
        for step, loss in reference_losses.items():
            assert abs(got[step] - loss) <= 1e-5, (name, step, got[step], loss)


def test_siglip_two_processes_match_one(tmp_path, reference_losses):
    args = cli_args(tmp_path, **{"mesh.data": 8})
    for returncode, out in run_processes("clip_jax.main", args):
        assert returncode == 0, out[-3000:]
    got = read_losses(str(tmp_path))
    for step, loss in reference_losses.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)


@pytest.mark.parametrize("frozen", [("visual",), ("text_tower",)])
def test_a_locked_siglip_tower_gets_no_gradient(frozen):
    """LiT: the locked tower's gradient is zero; the other, the temperature and the bias train."""
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    model = CLIP(**model_config("tiny-siglip"))
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (16, 16), 1, 32000)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1]))["params"]
        loss_fn = losses.make_loss_fn("sigmoid", mesh, sharding.BATCH_AXES)
        fn = make_loss_and_grad(model, loss_fn, mesh, accum_steps=1, frozen=frozen)
        batch = {"image": images, "text": tokens}
        loss, grads, _ = jax.jit(fn)(params, {}, batch, jax.random.key(3))
    assert np.isfinite(float(loss))
    for group in ("visual", "text_tower"):
        norm = float(optax.tree.norm(grads[group]))
        assert (norm == 0) == (group in frozen), (group, norm)
    assert float(grads["logit_scale"]) != 0 and float(grads["logit_bias"]) != 0
