"""Writes the golden files of test_golden.py from open_clip (run once; needs torch + open_clip).

Two small open_clip models (a ViT and a ModifiedResNet, QuickGELU, vocabulary 1000), weights
perturbed at random and rounded to float16 (as OpenAI ships them), saved as `<name>.safetensors`
in the PyTorch layout, and `<name>_io.npz` with inputs and open_clip's float32 outputs.

    python tests/golden/make_golden.py
"""

import os

import numpy as np
import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=2)
VISION = {
    "vit": CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
    "rn": CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=64, image_size=32),
}


def main():
    for name, vision in VISION.items():
        torch.manual_seed(0)
        model = open_clip.model.CLIP(32, vision, TEXT, quick_gelu=True).eval()
        with torch.no_grad():
            for key, t in model.state_dict().items():
                if t.is_floating_point() and key != "logit_scale":
                    if key.endswith("running_var"):
                        t.copy_(torch.rand_like(t) + 0.5)
                    else:
                        t.add_(torch.randn_like(t) * 0.05)
            model.half().float()  # round every weight to float16, compute in float32
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(HERE, f"{name}.safetensors"))
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        tokens = torch.randint(1, 998, (3, 16), generator=torch.Generator().manual_seed(2))
        tokens[:, 0] = 998  # "start", then an end token (the highest id) at varied positions
        for row, end in enumerate((5, 15, 9)):
            tokens[row, end] = 999
            tokens[row, end + 1 :] = 0
        with torch.no_grad():
            image_emb = model.encode_image(images).numpy()
            text_emb = model.encode_text(tokens).numpy()
        np.savez(
            os.path.join(HERE, f"{name}_io.npz"),
            images_nhwc=images.permute(0, 2, 3, 1).numpy(),
            tokens=tokens.numpy().astype(np.int32),
            image_emb=image_emb,
            text_emb=text_emb,
            open_clip_version=np.asarray(open_clip.__version__),
        )
        print(f"wrote {name}: image {image_emb.shape}, text {text_emb.shape}")


if __name__ == "__main__":
    main()
