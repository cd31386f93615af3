"""Every config builds its model (shapes only, no weights) of the published size, with the
paper's recipe."""

import pytest

from clip_jax.models import CLIP, model_config
from clip_jax.weights.state_dicts import abstract_variables
from tests.conftest import load_config

# Each shipped paper config: its model (whose size tests/test_models.py checks against the published
# parameter count) and the paper's peak learning rate (Radford et al. 2021, tables 19 and 20).
PAPER = {
    "rn50": ("RN50", 5e-4),
    "rn101": ("RN101", 5e-4),
    "rn50x4": ("RN50x4", 5e-4),
    "rn50x16": ("RN50x16", 4e-4),
    "rn50x64": ("RN50x64", 3.6e-4),
    "b32": ("ViT-B-32", 5e-4),
    "b16": ("ViT-B-16", 5e-4),
    "l14": ("ViT-L-14", 4e-4),
    "l14_336": ("ViT-L-14-336", 2e-5),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_builds_the_paper_model_with_its_recipe(name):
    c = load_config(name)
    model, learning_rate = PAPER[name]
    assert c.model.to_dict() == {**model_config(model), "dtype": "bfloat16"}
    variables = abstract_variables(c.model.to_dict())  # shapes only
    assert set(variables["params"]) >= {"visual", "text_tower", "logit_scale"}
    assert isinstance(CLIP(**c.model), CLIP)  # config keys mirror the module's fields
    assert c.batch_size == 32768 and c.optim.learning_rate == learning_rate
    assert c.optim.weight_decay == 0.2 and c.optim.b1 == 0.9
    resnet = name.startswith("rn")
    assert (c.optim.b2, c.optim.eps) == ((0.999, 1e-8) if resnet else (0.98, 1e-6))
    assert c.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", [*sorted(PAPER), "tiny"])
def test_smoke_argument_shrinks_the_run(name):
    c = load_config(name, "smoke")
    assert c.batch_size <= 8 and c.total_steps <= 3
    assert c.model.to_dict() == {**load_config(name).model.to_dict(), "dtype": "float32"}


def test_unknown_argument_is_clear():
    with pytest.raises(ValueError, match="unknown config argument 'huge'"):
        load_config("b16", "huge")


# Each shipped SigLIP config and its open_clip size (tests/test_siglip.py checks the counts).
SIGLIP = {
    "siglip_b16": "ViT-B-16-SigLIP",
    "siglip2_b16": "ViT-B-16-SigLIP2",
    "siglip2_l16": "ViT-L-16-SigLIP2-256",
    "siglip2_so400m14": "ViT-SO400M-14-SigLIP2",
    "siglip2_so400m16": "ViT-SO400M-16-SigLIP2-256",
    "siglip2_gopt16": "ViT-gopt-16-SigLIP2-256",
}


@pytest.mark.parametrize("name", sorted(SIGLIP))
def test_siglip_configs_build_their_size_with_siglips_recipe(name):
    c = load_config(name)
    assert c.model.to_dict() == {**model_config(SIGLIP[name]), "dtype": "bfloat16"}
    assert c.model.init_logit_bias == -10.0 and c.loss.name == "sigmoid"
    assert (c.batch_size, c.optim.b2, c.optim.weight_decay) == (32768, 0.95, 1e-4)
    family = "siglip2:" if "SigLIP2" in SIGLIP[name] else "siglip:"
    assert c.train_data.tokenizer.startswith(family)
    smoke = load_config(name, "smoke")
    assert smoke.model.to_dict() == {**c.model.to_dict(), "dtype": "float32"}
