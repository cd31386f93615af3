"""clip_jax equals open_clip (the reference) on the same weights: encode_image and encode_text.

A randomly initialised open_clip model (every weight and BatchNorm statistic perturbed, so that no
mapping hides behind an init of ones or zeros) goes state dict -> safetensors -> load_pretrained.
Skips cleanly without torch / open_clip; the golden tests in test_golden.py always run.
"""

import jax
import numpy as np
import pytest

from clip_jax.inference import load
from clip_jax.weights import files as weight_files
from clip_jax.weights import state_dicts
from tests.conftest import worst_rel_err

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

MAX_REL_ERR = 1e-4


def perturbed_openclip(name, seed=0):
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point() or key == "logit_scale":
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.add_(torch.randn_like(t) * 0.02)
    return model


@pytest.mark.parametrize("name", ["RN50-quickgelu", "ViT-B-32-quickgelu", "ViT-B-32"])
def test_encoders_match_open_clip(tmp_path, name):
    from safetensors.torch import save_file

    ref = perturbed_openclip(name)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    model, variables = load.load_pretrained(path, quick_gelu=name.endswith("-quickgelu"))

    size = ref.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of a cat.", "A diagram of the CLIP architecture, drawn by hand!"]
    tokens = open_clip.get_tokenizer(name)(texts)
    with torch.no_grad():
        ref_image = ref.encode_image(images).numpy()
        ref_text = ref.encode_text(tokens).numpy()

    encode_image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    encode_text = jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))
    ours_image = encode_image(variables, images.permute(0, 2, 3, 1).numpy())
    ours_text = encode_text(variables, tokens.numpy().astype(np.int32))

    assert worst_rel_err(ours_image, ref_image) <= MAX_REL_ERR
    assert worst_rel_err(ours_text, ref_text) <= MAX_REL_ERR
    np.testing.assert_allclose(
        np.exp(np.asarray(variables["params"]["logit_scale"])),
        ref.logit_scale.exp().item(),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["RN50-quickgelu", "ViT-B-32"])
def test_export_loads_into_open_clip_strictly(tmp_path, name):
    ref = perturbed_openclip(name, seed=3)
    path = str(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    _, variables = load.load_pretrained(path)
    cfg = state_dicts.infer_config(weight_files.read_state_dict(path)[0])
    out = str(tmp_path / "exported.safetensors")
    load.save_pretrained(out, variables, cfg)

    from safetensors.torch import load_file

    exported = load_file(out)
    fresh = open_clip.create_model(name, pretrained=None)
    fresh.load_state_dict(exported, strict=True)
    for key, value in ref.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(fresh.state_dict()[key], value), key


def small_openclip():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    text = CLIPTextCfg(context_length=16, vocab_size=1000, width=64, heads=1, layers=1)
    vision = CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32)
    return open_clip.model.CLIP(32, vision, text, quick_gelu=True).eval()


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint", "torchscript"])
def test_reads_torch_files(tmp_path, layout):
    ref = small_openclip()
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(1, 999, (2, 16))
    path = str(tmp_path / "model.pt")
    if layout == "state_dict":
        torch.save(ref.state_dict(), path)
    elif layout == "training_checkpoint":  # as open_clip's trainer writes, from DDP
        sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
        torch.save({"epoch": 3, "name": "run", "state_dict": sd}, path)
    else:  # OpenAI released TorchScript archives
        torch.jit.save(torch.jit.trace(ref, (images, tokens), strict=False), path)
    model, variables = load.load_pretrained(path)
    with torch.no_grad():
        ref_image = ref.encode_image(images).numpy()
    ours = model.apply(variables, images.permute(0, 2, 3, 1).numpy(), method="encode_image")
    assert worst_rel_err(ours, ref_image) <= MAX_REL_ERR
