"""Layers scanned with nn.scan (`model.scan_layers`): the same function as the unrolled stack
given the same numbers stacked (embeddings, loss, gradients, with remat too), the stacked axis
replicated, the weight-decay mask unchanged, weight files identical in both layouts, a resume
that flips it refused, a run that trains; and the compile time it saves (printed, not asserted).
"""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from clip_jax.inference import load
from clip_jax.infra.errors import UsageError
from clip_jax.models import CLIP, model_config
from clip_jax.models.clip import layers_layout, stack_layers, unstack_layers
from clip_jax.parallel import sharding
from clip_jax.training import optim, runs, state
from clip_jax.training import trainer as train
from clip_jax.weights import state_dicts
from tests.conftest import ROOT, cpu_env, read_losses, tiny_config
from tests.test_convert import assert_trees_equal, init_variables


def batch(cfg, n=4):
    size, length = cfg["vision"]["image_size"], cfg["text"]["context_length"]
    images = jax.random.normal(jax.random.key(1), (n, size, size, 3))
    tokens = jax.random.randint(jax.random.key(2), (n, length), 1, 49407)
    return images, tokens


def loss_and_grads(cfg, variables, images, tokens):
    """A scalar of both towers' embeddings in training mode, its gradient, and the embeddings."""
    model = CLIP(**cfg)
    stats = variables.get("batch_stats", {})

    def loss(params):
        v = {"params": params, **({"batch_stats": stats} if stats else {})}
        out, _ = model.apply(v, images, tokens, train=True, mutable=["batch_stats"])
        emb = (out["image"], out["text"])
        return jnp.sum(out["image"] @ out["text"].T * out["logit_scale"]), emb

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def assert_close_trees(a, b, atol):
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=1e-6, atol=atol, err_msg=str(path)
        )


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_the_scanned_stack_computes_the_unrolled_one(policy):
    """The same embeddings, loss and gradients, both towers scanned."""
    cfg = model_config("tiny", remat_policy=policy)
    images, tokens = batch(cfg)
    variables = init_variables(cfg)
    stacked = stack_layers(variables)
    (want_loss, want_emb), want_grads = loss_and_grads(cfg, variables, images, tokens)
    scanned_cfg = {**cfg, "scan_layers": True}
    (got_loss, got_emb), got_grads = loss_and_grads(scanned_cfg, stacked, images, tokens)
    for got, want in zip(got_emb, want_emb, strict=True):  # image, then text
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    assert_close_trees(got_grads, stack_layers(want_grads), atol=1e-6)


def test_a_resnet_scans_its_text_tower_only():
    cfg = model_config("tiny-rn")
    scanned_cfg = {**cfg, "scan_layers": True}
    variables = init_variables(cfg)
    stacked = init_variables(scanned_cfg)
    assert jax.tree.map(np.shape, stacked["params"]["visual"]) == jax.tree.map(
        np.shape, variables["params"]["visual"]
    )
    assert list(stacked["params"]["text_tower"]["transformer"]) == ["resblocks"]
    stacked = stack_layers(variables)
    _, tokens = batch(cfg)
    want = CLIP(**cfg).apply(variables, tokens, method="encode_text")
    got = CLIP(**scanned_cfg).apply(stacked, tokens, method="encode_text")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_stacked_layout():
    """One `resblocks` per tower, its leaves [layers, ...], the layer axis replicated on an FSDP
    mesh; the same parameters as the unrolled layout, in other places."""
    cfg = model_config("tiny", scan_layers=True)
    plain = state_dicts.abstract_variables(model_config("tiny"))["params"]
    scanned = state_dicts.abstract_variables(cfg)["params"]
    layers = cfg["vision"]["layers"]
    blocks = scanned["visual"]["transformer"]
    assert list(blocks) == ["resblocks"]
    assert blocks["resblocks"]["mlp"]["c_fc"]["kernel"].shape == (layers, 32, 128)
    assert sum(x.size for x in jax.tree.leaves(plain)) == sum(
        x.size for x in jax.tree.leaves(scanned)
    )
    unstacked = unstack_layers(init_variables(cfg))["params"]
    assert jax.tree.map(np.shape, unstacked) == jax.tree.map(lambda x: x.shape, plain)
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    specs = {}
    for scan in (False, True):
        config = tiny_config(**{"model.scan_layers": scan, "mesh.data": 1, "mesh.fsdp": 8})
        specs[scan] = state.build(config, mesh).shardings.params["visual"]["transformer"]
    want = specs[False]["resblocks_0"]["mlp"]["c_fc"]["kernel"].spec
    assert "fsdp" in want
    assert specs[True]["resblocks"]["mlp"]["c_fc"]["kernel"].spec == PartitionSpec(None, *want)


def test_decay_mask_is_the_same_in_both_layouts():
    """Stacked biases and norm scales are 2-D, and still not decayed: the mask goes by name."""
    plain = state_dicts.abstract_variables(model_config("tiny"))["params"]
    scanned = state_dicts.abstract_variables(model_config("tiny", scan_layers=True))["params"]
    want = traverse_util.flatten_dict(optim.decay_mask(plain))
    got = traverse_util.flatten_dict(optim.decay_mask(scanned))
    as_scanned = {
        tuple("resblocks" if re.fullmatch(r"resblocks_\d+", p) else p for p in path): m
        for path, m in want.items()
    }
    assert as_scanned == got
    assert not got[("visual", "transformer", "resblocks", "ln_1", "bias")]
    assert got[("visual", "transformer", "resblocks", "attn", "qkv", "kernel")]


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_weight_files_are_the_same_in_both_layouts(tmp_path, name):
    cfg = model_config(name)
    scanned_cfg = {**cfg, "scan_layers": True}
    variables = init_variables(cfg)
    stacked = stack_layers(variables)
    want, got = (
        state_dicts.to_state_dict(variables, cfg),
        state_dicts.to_state_dict(stacked, scanned_cfg),
    )
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # An open_clip-layout file imports into either layout; the scanned one is the stacked one.
    assert_trees_equal(state_dicts.from_state_dict(want, scanned_cfg), stacked)
    path = str(tmp_path / "scanned.safetensors")
    load.save_pretrained(path, stacked, scanned_cfg)
    model, loaded = load.load_pretrained(path)
    assert model.scan_layers
    assert_trees_equal(loaded, stacked)
    model, loaded = load.load_pretrained(path, scan_layers=False)
    assert not model.scan_layers
    assert_trees_equal(loaded, variables)
    assert_trees_equal(layers_layout(variables, False), variables)
    assert_trees_equal(layers_layout(stacked, True), stacked)


def test_a_scanned_run_trains_and_loads_in_either_layout(tmp_path):
    workdir = str(tmp_path)
    train.run(tiny_config(**{"model.scan_layers": True}), workdir)
    got = read_losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in got.values()) and got[6] < got[1], got
    scanned, variables = load.load_pretrained(workdir)
    plain, unstacked = load.load_pretrained(workdir, scan_layers=False)
    assert scanned.scan_layers and not plain.scan_layers
    images, _ = batch(model_config("tiny"))
    np.testing.assert_allclose(
        plain.apply(unstacked, images, method="encode_image"),
        scanned.apply(variables, images, method="encode_image"),
        rtol=1e-5,
        atol=1e-6,
    )
    # The checkpoints hold the scanned tree: a resume without scan_layers is another run.
    with pytest.raises(UsageError, match=r"model.scan_layers: True -> False"):
        runs.check_same_run(tiny_config(), workdir)


def test_the_key_is_required_and_a_bool():
    from clip_jax.training import validate

    config = tiny_config()
    with config.unlocked():
        del config.model["scan_layers"]
    with pytest.raises(UsageError, match=r"^the config has no model.scan_layers: derive it"):
        validate.validate(config)
    with config.unlocked():
        config.model.scan_layers = "yes"
    with pytest.raises(UsageError, match=r"^model.scan_layers='yes': use True or False$"):
        validate.validate(config)


COMPILE_TIMES = """
import json, time
import jax
from clip_jax.parallel import sharding
from clip_jax.training import state
from tests.conftest import tiny_config
times = {}
for scan in (False, True):
    config = tiny_config(**{"model.scan_layers": scan, "model.vision.layers": 8,
                            "model.text.layers": 8, "mesh.data": 1})
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    spec = state.build(config, mesh)
    t = time.perf_counter()
    state.compile_train_step(spec, 8)
    times[scan] = time.perf_counter() - t
print(json.dumps({"unscanned_s": times[False], "scanned_s": times[True]}))
"""


def test_compile_time_with_and_without_scan(capsys):
    """An 8+8-layer tiny-width model's train step, lowered and compiled both ways in a process
    without XLA's persistent cache (so each is compiled for real); reported, not asserted."""
    out = subprocess.run(
        [sys.executable, "-c", COMPILE_TIMES],
        cwd=ROOT,
        env={**cpu_env(1), "JAX_ENABLE_COMPILATION_CACHE": "false"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    times = json.loads(out.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(
            f"\n8+8 layers, train step lower+compile: unscanned {times['unscanned_s']:.1f} s, "
            f"scanned {times['scanned_s']:.1f} s"
        )
