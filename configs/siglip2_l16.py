"""SigLIP 2 ViT-L/16 at 256 px, trained with SigLIP's recipe
(`common.siglip_config`): sigmoid loss, batch 32,768, AdamW beta2 0.95.

The tokenizer is the published weights' (`siglip2:hf-hub:timm/...`, fetched on first use); a
local file instead: `--config.train_data.tokenizer=siglip2:PATH` (docs/siglip.md).

python -m clip_jax.main --config=configs/siglip2_l16.py --config.train_data.source=wds:GLOB
python -m clip_jax.main --config=configs/siglip2_l16.py:smoke  # a few CPU steps
"""

from configs import common


def get_config(arg=None):
    c = common.siglip_config("ViT-L-16-SigLIP2-256")
    return common.apply_arg(c, arg)
