"""RN50x16 as in the CLIP paper: batch 32,768, 32 epochs of 400M pairs, peak learning rate 4e-4.

python -m clip_jax.main --config=configs/rn50x16.py --config.train_data.source=tfrecord:GLOB
python -m clip_jax.main --config=configs/rn50x16.py:smoke  # a few CPU steps, synthetic data
"""

from configs import common


def get_config(arg=None):
    c = common.base_config("RN50x16", learning_rate=4e-4, resnet=True)
    return common.apply_arg(c, arg)
