"""FLIP's patch dropout (`model.patch_dropout`): what is kept (the class token and a random subset
of distinct patches, open_clip's count), none dropped at evaluation, gradients through the kept
tokens only, one subset per micro-batch in both passes of exact accumulation, a run that trains,
and a ResNet refused."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.infra.errors import UsageError
from clip_jax.models import CLIP, l2_normalize, model_config
from clip_jax.models.vit import drop_patches, patches_kept
from clip_jax.parallel import sharding
from clip_jax.training import losses, validate
from clip_jax.training import trainer as train
from clip_jax.training.train_step import make_loss_and_grad, split_micro_batches
from tests.conftest import load_config, read_losses, tiny_config, with_overrides

P = 0.5


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its parameters, and a batch of 8 images (16 patches each)."""
    cfg = model_config("tiny")
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    tokens = jnp.ones((1, cfg["text"]["context_length"]), jnp.int32)
    params = nn.unbox(jax.jit(CLIP(**cfg).init)(jax.random.key(0), images[:1], tokens))["params"]
    return cfg, {"params": params}, images


def encode(cfg, variables, images, *, train, key=None, capture=False):
    """Image embeddings [B, E] of CLIP(**cfg); with `capture`, also ln_pre's output [B, T, D]."""
    model = CLIP(**cfg)
    rngs = {"dropout": key} if key is not None else {}
    kwargs = dict(capture_intermediates=lambda m, _: m.name == "ln_pre") if capture else {}
    out = model.apply(variables, images, train=train, method="encode_image", rngs=rngs, **kwargs)
    if not capture:
        return out
    emb, state = out
    (tokens,) = state["intermediates"]["visual"]["ln_pre"]["__call__"]
    return emb, tokens


def test_evaluation_is_unchanged_exactly(tiny):
    cfg, variables, images = tiny
    plain = jax.jit(lambda v, x: encode(cfg, v, x, train=False))(variables, images)
    dropped = {**cfg, "patch_dropout": P}
    got = jax.jit(lambda v, x: encode(dropped, v, x, train=False))(variables, images)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))


def test_training_keeps_open_clips_count_and_differs_by_key(tiny):
    cfg, variables, images = tiny
    cfg = {**cfg, "patch_dropout": P}
    run = jax.jit(lambda k: encode(cfg, variables, images, train=True, key=k, capture=True))
    (a, tokens), (b, _), (a_again, _) = (
        run(jax.random.key(5)),
        run(jax.random.key(6)),
        run(jax.random.key(5)),
    )
    assert tokens.shape == (8, 1 + patches_kept(16, P), cfg["vision"]["width"]) == (8, 9, 32)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))
    full = encode(tiny[0], variables, images, train=False)
    assert not np.allclose(a, full)  # training does drop


@pytest.mark.parametrize("n,p", [(196, 0.5), (256, 0.75), (16, 0.7), (49, 0.9), (4, 0.9)])
def test_the_kept_count_is_open_clips(n, p):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip.transformer")
    layer = open_clip.PatchDropout(p).train()
    assert layer(torch.zeros(2, 1 + n, 4)).shape[1] == 1 + patches_kept(n, p)


def test_the_class_token_is_kept_and_the_patches_are_distinct():
    b, n, d = 16, 49, 3
    ids = jnp.broadcast_to(jnp.arange(1 + n, dtype=jnp.float32)[None, :, None], (b, 1 + n, d))
    for seed in range(5):
        out = np.asarray(jax.jit(drop_patches, static_argnums=1)(ids, 0.6, jax.random.key(seed)))
        kept = patches_kept(n, 0.6)
        assert out.shape == (b, 1 + kept, d)
        np.testing.assert_array_equal(out[:, 0], 0.0)  # the class token, first
        for row in out[:, 1:, 0]:
            assert len(set(row.tolist())) == kept and set(row.tolist()) <= set(range(1, 1 + n))
        assert len({tuple(sorted(r)) for r in out[:, 1:, 0].tolist()}) > 1  # rows differ


def test_gradients_flow_through_the_kept_patches_only(tiny):
    cfg, variables, images = tiny
    cfg = {**cfg, "patch_dropout": P}

    def loss(params, image):
        return jnp.sum(encode(cfg, {"params": params}, image, train=True, key=jax.random.key(7)))

    grads = jax.jit(jax.grad(loss))(variables["params"], images[:1])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["visual"]["conv1"]["kernel"]).max()) > 0
    pos = np.abs(np.asarray(grads["visual"]["positional_embedding"])).max(-1)  # [1 + 16]
    assert pos[0] > 0  # the class token's position
    assert (pos[1:] > 0).sum() == patches_kept(16, P)  # one image: its dropped positions get 0


def test_the_selection_is_per_row_on_a_sharded_batch(tiny):
    """The same draw on 8 devices as on one (the key does not depend on the layout), and the
    selection moves no activations between devices: the compiled sharded forward has the
    collectives of the forward without patch dropout, no more."""
    cfg, variables, images = tiny
    key = jax.random.key(9)

    def forward(p):
        return jax.jit(lambda v, x: encode({**cfg, "patch_dropout": p}, v, x, train=True, key=key))

    one = forward(P)(variables, images)
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        rows = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        sharded = forward(P)(variables, rows)
        dropped, plain = (collectives(forward(p).lower(variables, rows)) for p in (P, 0.0))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), rtol=1e-5, atol=1e-6)
    assert dropped == plain


def collectives(lowered) -> dict[str, int]:
    """How often each cross-device collective occurs in a lowered function's compiled HLO."""
    ops = re.findall(
        r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
        lowered.compile().as_text(),
    )
    return dict(collections.Counter(ops))


def test_both_passes_of_accumulation_drop_the_same_patches(tiny):
    """With optim.accum_steps=2 the loss and gradient are those of embedding each micro-batch
    once, with its own key (fold_in(step key, i)): GradCache's second pass re-draws the first's
    subsets, or its gradient would not be the loss's."""
    cfg, variables, _ = tiny
    cfg = {**cfg, "patch_dropout": P}
    model = CLIP(**cfg)
    params = variables["params"]
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(2), (16, 16), 1, 49407)
    key = jax.random.key(3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        loss_fn = losses.make_loss_fn("softmax", mesh, sharding.BATCH_AXES)
        accum = make_loss_and_grad(model, loss_fn, mesh, accum_steps=2, frozen=())
        loss, grads, _ = jax.jit(accum)(params, {}, {"image": images, "text": tokens}, key)

        def reference(p):
            micro_images = split_micro_batches(images, 2, mesh)
            micro_tokens = split_micro_batches(tokens, 2, mesh)
            zimg, ztxt = [], []
            for i in range(2):
                v = {"params": p}
                k = jax.random.fold_in(key, i)
                zimg.append(encode(cfg, v, micro_images[i], train=True, key=k))
                ztxt.append(model.apply(v, micro_tokens[i], train=True, method="encode_text"))
            zimg, ztxt = l2_normalize(jnp.concatenate(zimg)), l2_normalize(jnp.concatenate(ztxt))
            return loss_fn(zimg, ztxt, jnp.exp(p["logit_scale"]), None)

        want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(scale, 1.0)


def test_a_tiny_run_trains_with_patch_dropout(tmp_path):
    train.run(tiny_config(**{"model.patch_dropout": P}), str(tmp_path))
    got = read_losses(str(tmp_path))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in got.values())
    assert got[6] < got[1], got


def test_a_resnet_refuses_patch_dropout():
    config = with_overrides(load_config("rn50"), **{"model.patch_dropout": P})
    with pytest.raises(UsageError) as e:
        validate.validate(config)
    assert str(e.value) == (
        "model.patch_dropout=0.5: use 0 with a ResNet image tower (patch dropout drops a ViT's "
        "patch tokens)"
    )
    cfg = model_config("tiny-rn", patch_dropout=P)
    with pytest.raises(UsageError, match="needs a ViT image tower"):
        jax.eval_shape(
            lambda: CLIP(**cfg).init(
                jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
            )
        )


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_a_bad_fraction_is_one_line(value):
    with pytest.raises(UsageError) as e:
        validate.validate(tiny_config(**{"model.patch_dropout": value}))
    assert str(e.value) == (
        f"model.patch_dropout={value!r}: use a number in [0, 1): the fraction of patches dropped"
    )


def test_the_benchmark_mode_reports_both_ratios():
    from clip_jax.tools import benchmarks

    out = benchmarks.bench_patch_dropout(tiny_config(), batch_size=8, steps=1)
    assert out["what"] == "patch_dropout" and out["patch_dropout"] == 0.5
    assert (out["tokens_without"], out["tokens_with"]) == (17, 9)
    assert out["tower_speedup"] > 0 and out["step_speedup"] > 0
    assert benchmarks.MODES["patch_dropout"] is benchmarks.bench_patch_dropout
