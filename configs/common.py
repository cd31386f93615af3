"""The base every experiment derives from: CLIP's published training recipe (Radford et al. 2021,
appendix F), with the model filled in by name from `clip_jax.models.sizes`.

Keys mirror the keyword arguments of the code that reads them: `CLIP(**config.model)`, the optimizer
from `config.optim`, the mesh from `config.mesh`, the input pipeline from `config.train_data`.
"""

import ml_collections

from clip_jax.errors import UsageError
from clip_jax.models.sizes import model_config

# Paper: 32 epochs of 400M pairs at batch 32,768.
PAPER_BATCH = 32768
PAPER_STEPS = 32 * 400_000_000 // PAPER_BATCH


def base_config(
    model: str, learning_rate: float, resnet: bool = False
) -> ml_collections.ConfigDict:
    """The paper's recipe for one model: AdamW, decoupled weight decay 0.2, 2000 warmup steps then
    cosine decay, β2 0.98 / ε 1e-6 for ViTs and β2 0.999 / ε 1e-8 for ResNets, temperature init
    0.07 clamped at 100."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = PAPER_BATCH  # global, across all devices and hosts
    c.total_steps = PAPER_STEPS
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3  # the newest ones; plus every keep_period-th step when > 0
    c.keep_period = 0
    c.nonfinite = "halt"  # or "skip": a step with a non-finite loss or gradient is not applied
    c.init_from = ""  # OpenAI / OpenCLIP / clip_jax weights to start from (fresh runs only)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest

    c.model = ml_collections.ConfigDict(model_config(model))
    c.model.dtype = "bfloat16"  # compute; parameters stay float32
    c.model.remat_policy = "none"

    c.loss = ml_collections.ConfigDict(dict(name="softmax", chunk_size=0, max_logit_scale=100.0))

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = learning_rate
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999 if resnet else 0.98
    c.optim.eps = 1e-8 if resnet else 1e-6
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 0.0  # 0 disables; the paper does not clip
    c.optim.accum_steps = 1  # micro-batches per step; the gradient stays exact (train_step.py)
    c.optim.frozen = ()  # top-level parameter groups not trained: ("visual",) for LiT

    c.train_data = ml_collections.ConfigDict()
    c.train_data.source = "synthetic"  # or tfrecord:GLOB, tfds:NAME[/CONFIG]:SPLIT
    c.train_data.image_key = "jpg"
    c.train_data.text_key = "txt"
    c.train_data.tokenizer = "clip_bpe"  # or a sentencepiece .model path
    c.train_data.shuffle_buffer = 10_000  # records; 0 or 1: no shuffling
    c.train_data.crop_scale = (0.9, 1.0)  # random resized crop's area range
    c.train_data.data_dir = ""  # tfds data_dir ("": tfds's default)

    c.evals = ml_collections.ConfigDict()
    return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`configs/X.py:smoke` keeps the architecture and shrinks the run to a few CPU steps."""
    if arg in (None, ""):
        return c
    if arg != "smoke":
        raise UsageError(f"unknown config argument {arg!r}; the only one is 'smoke'")
    c.batch_size = 8
    c.total_steps = 3
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.optim.warmup_steps = 1
    c.model.dtype = "float32"  # CPUs have no fast bf16
    return c
