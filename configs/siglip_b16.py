"""SigLIP (Zhai et al. 2023) ViT-B/16 at 224 px, T5's English tokenizer, trained with
SigLIP's recipe (`common.siglip_config`): sigmoid loss, batch 32,768, AdamW beta2 0.95.

The tokenizer is a sentencepiece file you give: `--config.train_data.tokenizer=siglip2:PATH`
(SigLIP 2: Gemma's 256k model) or `siglip:PATH` (SigLIP: T5's English 32k model).

python -m clip_jax.main --config=configs/siglip_b16.py --config.train_data.source=wds:GLOB \
    --config.train_data.tokenizer=siglip:/path/to/sentencepiece.model
python -m clip_jax.main --config=configs/siglip_b16.py:smoke  # a few CPU steps
"""

from configs import common


def get_config(arg=None):
    c = common.siglip_config("ViT-B-16-SigLIP")
    return common.apply_arg(c, arg)
