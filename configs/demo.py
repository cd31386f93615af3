"""The offline demo: a tiny CLIP on real handwritten digits (scikit-learn's 1,797, captioned from
templates), a couple of minutes on a laptop CPU. Write the data once, then train:

    python -m clip_jax.data.digits --output /tmp/clip_jax_digits --image_size 32
    python -m clip_jax.main --config=configs/demo.py --workdir=/tmp/clip_jax_demo

`configs/demo.py:DIR` reads the shards from DIR instead.
"""

from configs import common

DEFAULT_DATA = "/tmp/clip_jax_digits"


def get_config(arg=None):
    c = common.base_config("tiny", learning_rate=5e-3)
    c.model.dtype = "float32"
    c.batch_size = 64
    c.total_steps = 300
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.1
    c.train_data.source = f"tfrecord:{arg or DEFAULT_DATA}/train-*.tfrecord"
    c.train_data.shuffle_buffer = 2000
    return c
