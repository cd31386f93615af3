"""A tiny ViT CLIP on synthetic data: trains in seconds on a CPU, for tests and first runs.

python -m clip_jax.main --config=configs/tiny.py   # into runs/tiny
"""

from configs import common


def get_config(arg=None):
    c = common.base_config("tiny", learning_rate=5e-3)
    c.batch_size = 32
    c.total_steps = 50
    c.log_every_steps = 10
    c.checkpoint_every_steps = 25
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.1
    c.model.dtype = "float32"
    c.train_data.source = "synthetic"
    return common.apply_arg(c, arg)
