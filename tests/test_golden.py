"""Golden outputs, always run: small models made and evaluated by open_clip (tests/golden/
make_golden.py), loaded by clip_jax from their PyTorch-layout float16 safetensors."""

import os

import jax
import numpy as np
import pytest

import clip_jax
from tests.conftest import worst_rel_err

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
# Head counts cannot be read off tensor shapes; these small models use 32-wide heads.
OVERRIDES = {"vit": dict(vision=dict(heads=2), text=dict(heads=2)), "rn": dict(text=dict(heads=2))}


@pytest.mark.parametrize("name", ["vit", "rn"])
def test_matches_open_clip_outputs(name):
    model, variables = clip_jax.load_pretrained(
        os.path.join(GOLDEN, f"{name}.safetensors"), **OVERRIDES[name]
    )
    assert model.quick_gelu  # no clip_jax metadata: an OpenAI-layout file
    io = np.load(os.path.join(GOLDEN, f"{name}_io.npz"))
    image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(
        variables, io["images_nhwc"]
    )
    text = jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))(variables, io["tokens"])
    assert worst_rel_err(image, io["image_emb"]) <= 1e-4
    assert worst_rel_err(text, io["text_emb"]) <= 1e-4


def test_wrong_head_count_changes_outputs():
    """The guard above is sharp: a plausible but wrong architecture does not pass."""
    model, variables = clip_jax.load_pretrained(os.path.join(GOLDEN, "vit.safetensors"))
    io = np.load(os.path.join(GOLDEN, "vit_io.npz"))
    image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(
        variables, io["images_nhwc"]
    )
    assert worst_rel_err(image, io["image_emb"]) > 1e-2
