"""Shapes, parameter counts of every published size (without weights), dtypes and remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.convert import abstract_variables
from clip_jax.models import CLIP, MODELS, model_config

# Parameter counts of the published models (OpenCLIP's model table, docs/model_profile.csv, in
# millions; BatchNorm running statistics are buffers and not counted).
PUBLISHED_M = {
    "RN50": 102.01,
    "RN101": 119.69,
    "RN50x4": 178.30,
    "RN50x16": 290.98,
    "RN50x64": 623.26,
    "ViT-B-32": 151.28,
    "ViT-B-16": 149.62,
    "ViT-L-14": 427.62,
    "ViT-L-14-336": 427.94,
}


def count_params(cfg):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_variables(cfg)["params"]))


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_count_matches_published(name):
    assert count_params(model_config(name)) / 1e6 == pytest.approx(PUBLISHED_M[name], abs=0.01)


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_forward_shapes_and_normalisation(name):
    cfg = model_config(name)
    model = CLIP(**cfg)
    size, length = cfg["vision"]["image_size"], cfg["text"]["context_length"]
    images = jax.random.normal(jax.random.key(1), (3, size, size, 3))
    tokens = jax.random.randint(jax.random.key(2), (3, length), 1, 49407)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    out = jax.jit(model.apply)(variables, images, tokens)
    assert out["image"].shape == out["text"].shape == (3, cfg["embed_dim"])
    np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)
    image_emb = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(variables, images)
    assert image_emb.dtype == jnp.float32 and image_emb.shape == (3, cfg["embed_dim"])


def test_every_param_has_logical_axes():
    for name in ("tiny", "tiny-rn"):
        boxed = jax.eval_shape(
            lambda n=name: CLIP(**model_config(n)).init(
                jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
            )
        )["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        unboxed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
        assert not unboxed, f"{name}: params without logical axis names"
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim


def test_bf16_compute_keeps_f32_params_and_outputs():
    cfg = model_config("tiny", dtype="bfloat16")
    model = CLIP(**cfg)
    images, tokens = jnp.ones((2, 32, 32, 3)), jnp.ones((2, 16), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    out = jax.jit(model.apply)(variables, images, tokens)
    assert out["image"].dtype == jnp.float32
    f32 = jax.jit(CLIP(**model_config("tiny")).apply)(variables, images, tokens)
    np.testing.assert_allclose(out["image"], f32["image"], atol=3e-2)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_gradients(policy):
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 1, 49407)
    plain = CLIP(**model_config("tiny"))
    remat = CLIP(**model_config("tiny", remat_policy=policy))
    params = jax.jit(plain.init)(jax.random.key(0), images, tokens)["params"]

    def grads(model):
        def loss(p):
            out = model.apply({"params": p}, images, tokens)
            return jnp.sum(out["image"] @ out["text"].T)

        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resnet_train_mode_updates_batch_stats():
    cfg = model_config("tiny-rn")
    model = CLIP(**cfg)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) + 3.0
    variables = jax.jit(model.init)(jax.random.key(0), images, jnp.ones((4, 16), jnp.int32))
    train_apply = jax.jit(
        lambda v, x: model.apply(v, x, train=True, method="encode_image", mutable=["batch_stats"])
    )
    _, updates = train_apply(variables, images)
    before = variables["batch_stats"]["visual"]["stem1"]["bn"]["mean"]
    after = updates["batch_stats"]["visual"]["stem1"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_unknown_model_name_is_clear():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-7'"):
        model_config("ViT-Q-7")


def test_every_size_is_listed():
    assert set(PUBLISHED_M) | {"tiny", "tiny-rn"} == set(MODELS)
