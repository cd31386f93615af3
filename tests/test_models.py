"""Shapes, parameter counts of every published size (without weights), dtypes, remat, and the
image tower's init schemes (OpenAI's initialisation, checked by its statistics)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import CLIP, MODELS, model_config
from clip_jax.models.sizes import is_siglip
from clip_jax.weights.state_dicts import abstract_variables

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


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_gradients(name, policy):
    """Also in training mode, where the ResNet's BatchNorm statistics update inside the
    rematerialised bottlenecks: the same gradients and the same new statistics."""
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 1, 49407)
    plain = CLIP(**model_config(name))
    remat = CLIP(**model_config(name, remat_policy=policy))
    variables = jax.jit(plain.init)(jax.random.key(0), images, tokens)
    params, stats = variables["params"], variables.get("batch_stats", {})

    def grads(model):
        def loss(p):
            v = {"params": p, **({"batch_stats": stats} if stats else {})}
            out, new = model.apply(v, images, tokens, train=True, mutable=["batch_stats"])
            return jnp.sum(out["image"] @ out["text"].T), new

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (g_plain, s_plain), (g_remat, s_remat) = grads(plain), grads(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_plain), jax.tree.leaves(s_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert bool(jax.tree.leaves(s_plain)) == (name == "tiny-rn")


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
    """CLIP's sizes here; SigLIP's in test_siglip.py."""
    clip_sizes = {name for name, cfg in MODELS.items() if not is_siglip(cfg)}
    assert set(PUBLISHED_M) | {"tiny", "tiny-rn"} == clip_sizes


# --- init_scheme="openai": the image tower starts as OpenAI's code starts it --------------------


def init_params(cfg):
    model = CLIP(**cfg)
    size, length = cfg["vision"]["image_size"], cfg["text"]["context_length"]
    images, tokens = jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))["params"]


def stack(params, prefix, *keys):
    """The leaves at params[f"{prefix}{i}"][keys...] for every i, flattened into one array."""
    parts = []
    for name, sub in params.items():
        if name.startswith(prefix):
            for k in keys:
                sub = sub[k]
            parts.append(np.ravel(sub))
    assert parts, prefix
    return np.concatenate(parts)


def assert_uniform(x, bound):
    """x (a few thousand draws or more) looks like U(-bound, bound): within it, reaching it, and
    with its standard deviation bound / sqrt(3)."""
    x = np.ravel(np.asarray(x, np.float64))
    assert np.abs(x).max() <= bound * (1 + 1e-6)
    assert np.abs(x).max() >= 0.99 * bound
    assert np.std(x) == pytest.approx(bound / np.sqrt(3), rel=0.04)
    assert abs(np.mean(x)) < 0.05 * bound


def assert_normal(x, std):
    x = np.ravel(np.asarray(x, np.float64))
    assert np.std(x) == pytest.approx(std, rel=0.04)
    assert abs(np.mean(x)) < 0.05 * std


def assert_const(x, value):
    np.testing.assert_array_equal(np.asarray(x), value)


OPENAI_VIT = dict(image_size=64, patch_size=16, width=256, layers=4, heads=4)


def test_openai_vit_init_keeps_pytorch_defaults():
    """OpenAI's ViT blocks keep PyTorch's defaults (clip/model.py re-initialises only the text
    transformer): nn.Linear U(+-1/sqrt(fan_in)) weights and biases, nn.MultiheadAttention's
    xavier_uniform in_proj [3D, D] with zero biases; the patch conv is an nn.Conv2d."""
    cfg = model_config("tiny", embed_dim=256, vision={**OPENAI_VIT, "init_scheme": "openai"})
    visual = init_params(cfg)["visual"]
    blocks, d = visual["transformer"], OPENAI_VIT["width"]
    assert_uniform(visual["conv1"]["kernel"], (3 * 16 * 16) ** -0.5)
    assert_uniform(stack(blocks, "resblocks_", "attn", "qkv", "kernel"), (6 / (d + 3 * d)) ** 0.5)
    assert_const(stack(blocks, "resblocks_", "attn", "qkv", "bias"), 0.0)
    assert_uniform(stack(blocks, "resblocks_", "attn", "out", "kernel"), d**-0.5)
    assert_const(stack(blocks, "resblocks_", "attn", "out", "bias"), 0.0)
    for layer, fan_in in (("c_fc", d), ("c_proj", 4 * d)):
        assert_uniform(stack(blocks, "resblocks_", "mlp", layer, "kernel"), fan_in**-0.5)
        assert_uniform(stack(blocks, "resblocks_", "mlp", layer, "bias"), fan_in**-0.5)
    for norm in ("ln_1", "ln_2"):
        assert_const(stack(blocks, "resblocks_", norm, "scale"), 1.0)
        assert_const(stack(blocks, "resblocks_", norm, "bias"), 0.0)
    for norm in ("ln_pre", "ln_post"):
        assert_const(visual[norm]["scale"], 1.0)
        assert_const(visual[norm]["bias"], 0.0)
    tokens = np.concatenate([visual["class_embedding"][None], visual["positional_embedding"]])
    assert_normal(tokens, d**-0.5)  # scale * randn, scale = width^-0.5
    assert_normal(visual["proj"], d**-0.5)


def test_init_scheme_changes_only_the_image_tower():
    vision = model_config("tiny")["vision"]
    default = init_params(model_config("tiny"))
    named = init_params(model_config("tiny", vision={**vision, "init_scheme": "default"}))
    openai = init_params(model_config("tiny", vision={**vision, "init_scheme": "openai"}))
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(named), strict=True):
        np.testing.assert_array_equal(a, b)  # "default" is what a config without the key gets
    for key in ("text_tower", "logit_scale"):
        for a, b in zip(jax.tree.leaves(default[key]), jax.tree.leaves(openai[key]), strict=True):
            np.testing.assert_array_equal(a, b)
    conv1 = [p["visual"]["conv1"]["kernel"] for p in (default, openai)]
    assert not np.allclose(*conv1)


def test_openai_resnet_init():
    """OpenAI's ResNet: attention-pool weights normal(C^-0.5), each bottleneck's bn3 scale zero
    (initialize_parameters), and PyTorch's defaults elsewhere: nn.Conv2d U(+-1/sqrt(fan_in)),
    nn.Linear's biases in the pool, BatchNorm ones and zeros."""
    vision = dict(image_size=64, layers=(1, 1, 1, 1), width=32, heads=16, init_scheme="openai")
    visual = init_params(model_config("tiny-rn", vision=vision))["visual"]
    scaled = []  # each conv kernel over its bound: U(-1, 1) together
    for path, kernel in jax.tree_util.tree_flatten_with_path(visual)[0]:
        if jax.tree_util.keystr(path).endswith("['conv']['kernel']"):
            kh, kw, cin, _ = kernel.shape
            bound = (kh * kw * cin) ** -0.5
            assert np.abs(kernel).max() <= bound * (1 + 1e-6), path
            scaled.append(np.ravel(kernel) / bound)
    assert len(scaled) == 3 + 4 * 4  # the stem, then conv1-3 and a downsample per block
    assert_uniform(np.concatenate(scaled), 1.0)
    for path, value in jax.tree_util.tree_flatten_with_path(visual)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['bn']['scale']"):
            assert_const(value, 0.0 if "['conv3']" in name else 1.0)
        if name.endswith("['bn']['bias']"):
            assert_const(value, 0.0)
    pool, c = visual["attnpool"], 32 * 32
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        assert_normal(pool[proj]["kernel"], c**-0.5)
    biases = [np.ravel(pool[p]["bias"]) for p in ("q_proj", "k_proj", "v_proj", "c_proj")]
    assert_uniform(np.concatenate(biases), c**-0.5)
    assert_normal(pool["positional_embedding"], c**-0.5)


def test_unknown_init_scheme_is_clear():
    for name in ("tiny", "tiny-rn"):
        vision = {**model_config(name)["vision"], "init_scheme": "xavier"}
        with pytest.raises(ValueError, match="unknown init_scheme 'xavier'"):
            init_params(model_config(name, vision=vision))
