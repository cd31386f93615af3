"""The SigLIP demo: the demo's digits (configs/demo.py) learnt by a tiny SigLIP on a CPU, with
SigLIP's towers (MAP head, bidirectional text tower pooled at the last position), its sigmoid loss
and a SigLIP 2-style tokenizer. One command, no download:

    python -m clip_jax.main --config=configs/siglip_demo.py        # workdir: runs/siglip_demo

The tokenizer, `siglip2:digits`, is a sentencepiece model with SigLIP 2's special ids trained on
the training captions' templates, written into the cache on first use (`clip_jax.data.digits`);
the held-out prompts of the zero-shot eval reach it through its byte fallback where their words
are new. The model is `tiny-siglip` (ViT at 32 px with 8 px patches, width 32, 2 + 2 layers) with
a 400-token table and 16-token captions. The recipe is the demo's (AdamW, warmup then cosine,
learning rate 5e-3, weight decay 0.1, 1,000 steps of 128 pairs); the temperature and bias start at
SigLIP's log 10 and -10.
"""

from configs import common, demo


def get_config(arg=None):
    c = demo.get_config()
    siglip = common.base_config("tiny-siglip", learning_rate=c.optim.learning_rate)
    c.model = siglip.model
    c.model.dtype = "float32"  # CPUs have no fast bf16
    c.model.text.vocab_size = 400  # the tokenizer's (clip_jax.data.digits.TOKENIZER_VOCAB)
    c.loss.name = "sigmoid"
    c.train_data.tokenizer = "siglip2:digits"
    return common.apply_arg(c, arg)
