"""Schedule, weight-decay mask, and the AdamW recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import model_config
from clip_jax.training import optim
from clip_jax.weights import state_dicts
from clip_jax.weights.state_dicts import abstract_variables
from tests.conftest import load_config, with_overrides


def optim_config(**overrides) -> dict:
    """The tiny config's `optim` keys (every argument of `make_optimizer`), no warmup."""
    return with_overrides(load_config("tiny").optim, warmup_steps=0, **overrides).to_dict()


def test_warmup_then_cosine_to_zero():
    lr = optim.make_schedule(1e-3, warmup_steps=10, total_steps=110, schedule="cosine")
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(5e-4, rel=1e-5)  # half way down the cosine
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-12)
    constant = optim.make_schedule(1e-3, 10, 110, schedule="constant")
    assert float(constant(100)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown optim.schedule 'linear'"):
        optim.make_schedule(1e-3, 10, 110, schedule="linear")


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_decay_mask_follows_the_paper(name):
    params = abstract_variables(model_config(name))["params"]
    mask = optim.decay_mask(params)
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    for path, decayed in flat.items():
        leaf = path.rsplit("/", 1)[-1]
        expect = leaf in ("kernel", "embedding", "positional_embedding", "proj", "text_projection")
        assert decayed == expect, path
    assert not flat["logit_scale"]
    if name == "tiny":
        assert not flat["visual/class_embedding"]
        assert not flat["visual/transformer/resblocks_0/attn/qkv/bias"]  # [3, heads, head_dim]


def test_adamw_decays_only_masked_leaves():
    tx, _ = optim.make_optimizer(100, **optim_config(learning_rate=0.1, weight_decay=0.5))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) < 0)  # pure decay: -lr * wd * w
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_clipping_bounds_the_update():
    tx, _ = optim.make_optimizer(
        100, **optim_config(learning_rate=1.0, weight_decay=0.0, grad_clip_norm=1.0)
    )
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.full((4,), 100.0)}
    _, state = tx.update(grads, tx.init(params), params)
    adam = state[1][0]  # chain(clip, adamw(scale_by_adam, decay, lr))
    # Adam's first moment after one step is (1 - b1) times the clipped gradient of norm 1.
    assert float(jnp.linalg.norm(adam.mu["w"])) == pytest.approx(0.1, rel=1e-5)


def test_the_first_moment_can_be_kept_in_bfloat16():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    for dtype in ("float32", "bfloat16"):
        tx, _ = optim.make_optimizer(100, **optim_config(mu_dtype=dtype))
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        adam = state[0][0]  # chain(adamw(scale_by_adam, ...))
        assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}
        assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_decay_mask_is_open_clips(name):
    """open_clip's training script (open_clip_train/main.py) decays every parameter but those of
    fewer than 2 dims and those named bn, ln, bias or logit_scale: so token and positional
    embeddings are decayed there, the class token not. The mask, carried to PyTorch's names and
    layouts by the exporter, is that rule parameter by parameter."""
    cfg = model_config(name)
    variables = jax.eval_shape(lambda: abstract_variables(cfg))
    mask = optim.decay_mask(variables["params"])
    filled = jax.tree.map(
        lambda m, x: np.full(x.shape, float(m), np.float32), mask, variables["params"]
    )
    sd = state_dicts.to_state_dict({"params": filled}, cfg)

    def open_clip_excludes(key: str, ndim: int) -> bool:
        return ndim < 2 or any(s in key for s in ("bn", "ln", "bias", "logit_scale"))

    assert sd
    for key, value in sd.items():
        decayed = {float(v) for v in np.unique(value)}
        assert decayed == {float(not open_clip_excludes(key, value.ndim))}, key
