"""ViT-L/14 at 336 px: in the paper, ViT-L/14 trained for one more epoch at 336 px at learning
rate 2e-5. This config is that extra epoch; start it from a trained ViT-L/14.

    python -m clip_jax.main --config=configs/l14_336.py --config.train_data.source=tfrecord:GLOB
"""

from configs import common


def get_config(arg=None):
    c = common.base_config("ViT-L-14-336", learning_rate=2e-5)
    c.total_steps = 400_000_000 // c.batch_size  # one epoch
    c.optim.warmup_steps = 100
    return common.apply_arg(c, arg)
