"""Model FLOPs from the architecture (what MFU is measured against), against a hand count and
XLA's count of the lowered train step (which adds the elementwise work: a little more)."""

import importlib

import jax
import pytest

from clip_jax.models import model_config
from clip_jax.models.clip import complete_config
from clip_jax.models.flops import train_step_flops
from clip_jax.parallel import sharding
from clip_jax.training import state as state_lib


def test_vit_b32_by_hand():
    # Image: 49 patches of 32x32x3 into 768, 12 blocks over 50 tokens, a 768 -> 512 projection.
    block = lambda t, d, m: 2 * t * (4 * d * d + 2 * d * m) + 4 * t * t * d  # noqa: E731
    image = 2 * 49 * 3072 * 768 + 12 * block(50, 768, 3072) + 2 * 768 * 512
    text = 12 * block(77, 512, 2048) + 2 * 512 * 512
    expected = 3 * (16 * (image + text) + 2 * 16 * 16 * 512)
    assert train_step_flops(complete_config(model_config("ViT-B-32")), 16) == expected


def test_a_resnet_is_not_counted():
    assert train_step_flops(complete_config(model_config("RN50")), 16) is None


@pytest.mark.parametrize("name,batch", [("b32", 16), ("b16", 4)])
def test_within_two_percent_below_xlas_count(name, batch):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.dtype = "float32"
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    spec = state_lib.build(config, one)
    cost = state_lib.lower_train_step(spec, batch).cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    model = train_step_flops(spec.model_config, batch)
    assert 0.98 * xla <= model <= xla
