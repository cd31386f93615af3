"""SigLIP and SigLIP 2: sizes, parameter counts, and parity with open_clip (import and export).

The always-run tests check every size's parameter count against open_clip's (counted from its
model configs, open_clip 3.3.0) and the export's names and shapes against open_clip's state dict
(tests/golden/siglip2_b16_keys.json). With the reference extra, perturbed open_clip models go
state dict -> safetensors -> load_pretrained, and must give the same embeddings and logits; the
export loads back into open_clip strictly.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import CLIP, MODELS, model_config
from clip_jax.models.sizes import is_siglip
from clip_jax.weights import state_dicts
from tests.conftest import worst_rel_err

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

# sum(p.numel() for p in CustomTextCLIP(**open_clip.get_model_config(name)).parameters()), on the
# meta device, open_clip 3.3.0 with timm 1.0.31.
OPENCLIP_PARAMS = {
    "ViT-B-16-SigLIP": 203155970,
    "ViT-B-16-SigLIP-256": 203202050,
    "ViT-B-16-SigLIP-384": 203447810,
    "ViT-B-16-SigLIP-512": 203791874,
    "ViT-B-16-SigLIP-i18n-256": 370626050,
    "ViT-B-16-SigLIP2": 375187970,
    "ViT-B-16-SigLIP2-256": 375234050,
    "ViT-B-16-SigLIP2-384": 375479810,
    "ViT-B-16-SigLIP2-512": 375823874,
    "ViT-B-32-SigLIP2-256": 376856066,
    "ViT-L-16-SigLIP-256": 652150786,
    "ViT-L-16-SigLIP-384": 652478466,
    "ViT-L-16-SigLIP2-256": 881526786,
    "ViT-L-16-SigLIP2-384": 881854466,
    "ViT-L-16-SigLIP2-512": 882313218,
    "ViT-SO400M-14-SigLIP": 877360306,
    "ViT-SO400M-14-SigLIP-378": 877960498,
    "ViT-SO400M-14-SigLIP-384": 877960498,
    "ViT-SO400M-14-SigLIP2": 1135463602,
    "ViT-SO400M-14-SigLIP2-378": 1136008498,
    "ViT-SO400M-16-SigLIP-i18n-256": 1127430706,
    "ViT-SO400M-16-SigLIP2-256": 1135670962,
    "ViT-SO400M-16-SigLIP2-384": 1136039602,
    "ViT-SO400M-16-SigLIP2-512": 1136555698,
    "ViT-gopt-16-SigLIP2-256": 1871393906,
    "ViT-gopt-16-SigLIP2-384": 1871885426,
}


def count_params(cfg):
    leaves = jax.tree.leaves(state_dicts.abstract_variables(cfg)["params"])
    return sum(int(np.prod(x.shape)) for x in leaves)


def test_every_siglip_size_is_known():
    names = {name for name, cfg in MODELS.items() if is_siglip(cfg)} - {"tiny-siglip"}
    assert names == set(OPENCLIP_PARAMS)


@pytest.mark.parametrize("name", sorted(OPENCLIP_PARAMS))
def test_parameter_count_equals_open_clip(name):
    assert count_params(model_config(name)) == OPENCLIP_PARAMS[name]


def test_export_names_and_shapes_are_open_clip_state_dict():
    with open(os.path.join(GOLDEN, "siglip2_b16_keys.json")) as f:
        want = json.load(f)["state_dict"]
    cfg = model_config("ViT-B-16-SigLIP2")
    shapes = jax.tree.map(
        lambda x: np.zeros(x.shape, np.uint8), state_dicts.abstract_variables(cfg)
    )
    got = {k: list(v.shape) for k, v in state_dicts.to_state_dict(shapes, cfg).items()}
    assert got == want


def test_import_export_is_exact_and_infers_the_size():
    cfg = model_config("tiny-siglip")
    model = CLIP(**cfg)
    variables = model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
    )
    sd = state_dicts.to_state_dict(variables, cfg)
    assert state_dicts.infer_config(sd) == cfg
    back = state_dicts.from_state_dict(sd, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(jax.device_get(variables)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_param_has_logical_axes():
    import flax.linen as nn

    boxed = jax.eval_shape(
        lambda: CLIP(**model_config("tiny-siglip")).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
        )
    )["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


def test_siglip_starts_with_siglips_temperature_and_bias():
    model = CLIP(**model_config("tiny-siglip"))
    images, tokens = jnp.ones((2, 32, 32, 3)), jnp.ones((2, 16), jnp.int32)
    variables = model.init(jax.random.key(0), images, tokens)
    out = model.apply(variables, images, tokens)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-6)
    assert float(out["logit_bias"]) == -10.0


def test_last_token_pooling_reads_the_last_position():
    """Two texts that differ only at the last position embed differently: the tower pools
    there (and attends both ways, so every position reaches it)."""
    cfg = model_config("tiny-siglip")
    model = CLIP(**cfg)
    tokens = jnp.asarray([[5, 6, 7] + [1] * 13, [5, 6, 7] + [1] * 12 + [9]], jnp.int32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), tokens)
    emb = np.asarray(model.apply(variables, tokens, method="encode_text"))
    assert not np.allclose(emb[0], emb[1])


# --- Parity with open_clip (reference extra) ---------------------------------------------------


def perturbed_siglip(name, layers=None, seed=0):
    """open_clip's SigLIP model `name`, every weight perturbed (no mapping hides behind an init
    of ones or zeros); `layers` keeps that many blocks of each tower (their widths kept)."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    torch.manual_seed(seed)
    cfg = {k: v for k, v in open_clip.get_model_config(name).items() if k != "custom_text"}
    model = open_clip.CustomTextCLIP(**cfg).eval()
    if layers is not None:
        model.visual.trunk.blocks = model.visual.trunk.blocks[:layers]
        model.text.transformer.resblocks = model.text.transformer.resblocks[:layers]
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key not in ("logit_scale", "logit_bias"):
                t.add_(torch.randn_like(t) * 0.02)
    return model


@pytest.mark.parametrize(
    "name,layers",
    [("ViT-B-16-SigLIP", None), ("ViT-B-16-SigLIP2", None), ("ViT-SO400M-14-SigLIP2", 3)],
)
def test_embeddings_and_logits_equal_open_clip_and_export_loads_strictly(tmp_path, name, layers):
    ref = perturbed_siglip(name, layers)  # skips without the reference extra
    import torch
    from safetensors.torch import save_file

    from clip_jax.inference import load

    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    model, variables = load.load_pretrained(path)  # the architecture inferred from the file
    want = model_config(name)
    if layers is not None:
        want = {**want, "vision": {**want["vision"], "layers": layers}}
        want["text"] = {**want["text"], "layers": layers}
    for tower in ("vision", "text"):
        assert {k: getattr(model, tower)[k] for k in want[tower]} == want[tower]

    size, length = want["vision"]["image_size"], want["text"]["context_length"]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, size, size, generator=gen)
    tokens = torch.randint(1, want["text"]["vocab_size"], (3, length), generator=gen)
    tokens[0, 10:] = 0  # padding, attended as open_clip attends to it
    with torch.no_grad():
        ref_image = ref.encode_image(images, normalize=True)
        ref_text = ref.encode_text(tokens, normalize=True)
        ref_logits = ref_image @ ref_text.T * ref.logit_scale.exp() + ref.logit_bias
    out = jax.jit(model.apply)(
        variables, images.permute(0, 2, 3, 1).numpy(), tokens.numpy().astype(np.int32)
    )
    assert worst_rel_err(out["image"], ref_image.numpy()) <= 1e-5
    assert worst_rel_err(out["text"], ref_text.numpy()) <= 1e-5
    logits = out["image"] @ out["text"].T * out["logit_scale"] + out["logit_bias"]
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-4)
    assert float(out["logit_bias"]) == ref.logit_bias.item()

    exported = str(tmp_path / "export.safetensors")
    load.save_pretrained(exported, variables, state_dicts.infer_config(ref_state(ref)))
    from safetensors.torch import load_file

    again = perturbed_siglip(name, layers, seed=5)
    again.load_state_dict(load_file(exported), strict=True)
    for key, t in ref.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key


def ref_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}
