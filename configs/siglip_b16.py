"""SigLIP (Zhai et al. 2023) ViT-B/16 at 224 px, T5's English tokenizer, trained with
SigLIP's recipe (`common.siglip_config`): sigmoid loss, batch 32,768, AdamW beta2 0.95.

The tokenizer is the published weights' (`siglip:hf-hub:timm/...`, fetched on first use); a
local file instead: `--config.train_data.tokenizer=siglip:PATH` (docs/siglip.md).

python -m clip_jax.main --config=configs/siglip_b16.py --config.train_data.source=wds:GLOB
python -m clip_jax.main --config=configs/siglip_b16.py:smoke  # a few CPU steps
"""

from configs import common


def get_config(arg=None):
    c = common.siglip_config("ViT-B-16-SigLIP")
    return common.apply_arg(c, arg)
