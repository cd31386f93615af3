"""The base every experiment derives from: CLIP's published training recipe (Radford et al. 2021,
appendix F), with the model filled in by name from `clip_jax.models.sizes`.

Keys mirror the keyword arguments of the code that reads them: `CLIP(**config.model)`, the optimizer
from `config.optim`, the mesh from `config.mesh`, the input pipeline from `config.train_data`.
"""

import ml_collections

from clip_jax.data import captions
from clip_jax.data.preprocess import MAX_IMAGE_PIXELS
from clip_jax.infra.errors import UsageError
from clip_jax.models import model_config
from clip_jax.parallel import sharding

# Paper: 32 epochs of 400M pairs at batch 32,768.
PAPER_BATCH = 32768
PAPER_STEPS = 32 * 400_000_000 // PAPER_BATCH

# One line per key of `base_config`, what `python -m clip_jax.main --show_config` prints beside
# each value (tests check that every key has one). `*` matches any one component.
MEANINGS = {
    "seed": "seeds the parameters' initialisation and the data order",
    "batch_size": "global batch: image-text pairs per step over all devices and hosts",
    "total_steps": "optimizer steps of the whole run (also the length of the LR schedule)",
    "log_every_steps": "a row of metrics.jsonl (and TensorBoard) every this many steps",
    "checkpoint_every_steps": "save a checkpoint every this many steps (and at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep (at least 2 while spikes are "
    "watched or nonfinite=rollback; and the newest from before a spike, until it is over)",
    "keep_period": "also keep every checkpoint whose step is a multiple of this (0: none)",
    "resume_step": "resume from the checkpoint at this step instead of the newest (None: the "
    "newest); the newer ones move to workdir/abandoned/, never deleted; applied once, so a "
    "relaunch of the same command goes on from the new branch",
    "nonfinite": "a step with a non-finite loss or gradient: halt (stop), skip (count it and go "
    "on) or rollback (to the newest checkpoint from before the trouble, its batches skipped)",
    "nonfinite_max_consecutive": "nonfinite=skip: halt after this many skipped steps in a row",
    "nonfinite_max_fraction": "nonfinite=skip: halt when more than this fraction of the run's "
    "steps (and at least nonfinite_max_consecutive) were skipped",
    "spike.window": "loss spikes: the mean and spread of the last this many calm losses are the "
    "yardstick (0: no detection); detection starts once the window is full",
    "spike.factor": "a step is a spike when its loss exceeds the window's mean by this many "
    "spreads (standard deviations, at least 1% of the mean)",
    "spike.length": "this many spikes in a row call for spike.policy; as many calm steps in a "
    "row end the episode (checkpoints written during one are marked spiking)",
    "spike.policy": "a run of spike.length spikes: log (count them and go on), halt, or rollback",
    "max_rollbacks": "nonfinite=rollback and spike.policy=rollback: halt at the rollback after "
    "this many in the run",
    "rollback_lr_scale": "each rollback multiplies the learning rate by this (1: the same "
    "schedule, as PaLM restarted; below 1: lower, as OPT's runs were restarted by hand)",
    "init_from": "OpenAI / OpenCLIP / clip_jax weights to start a fresh run from ('': none)",
    "init_from_allow_torchscript_code": "run the TorchScript code inside init_from's file "
    "(torch.jit.load): unsafe, only for a file you trust as a program",
    "mesh.data": "devices of the data-parallel mesh axis (-1: the remaining devices)",
    "mesh.fsdp": "devices of the FSDP axis: parameters sharded over the model width",
    "mesh.tensor": "devices of the tensor-parallel axis: heads and MLP units split",
    "mesh.allow_split_physical_axes": "let a mesh axis take part of a TPU slice's physical axis "
    "(e.g. data=2, fsdp=256 on v5p:8x8x8), which the default device order refuses",
    "mesh.rules": "logical axis -> mesh axes, one (name, axes) pair per axis the layers name "
    "(MaxText's logical_axis_rules); axes None (replicated), an axis or a tuple of axes",
    "model.embed_dim": "width of the joint image-text embedding space",
    "model.quick_gelu": "QuickGELU activations, as OpenAI trained with",
    "model.dtype": "compute dtype (parameters stay float32): bfloat16 or float32",
    "model.param_dtype": "dtype the parameters are stored in",
    "model.remat_policy": "rematerialise residual blocks (ResNet: bottlenecks): none, full or dots",
    "model.attn_impl": "attention kernel for jax.nn.dot_product_attention (None: XLA, cudnn)",
    "model.patch_dropout": "FLIP: the fraction of each image's patch tokens dropped in training "
    "(a random subset kept, none dropped at evaluation); ViTs only, 0: off",
    "model.scan_layers": "run each transformer stack as one nn.scan over stacked parameters: "
    "the same function, its block compiled once, not once per layer (pair it with a "
    "remat_policy); a ResNet's text tower scans, its stages do not; a resume keeps it",
    "model.init_logit_scale": "initial log(1/temperature)",
    "model.init_logit_bias": "initial bias of the sigmoid (SigLIP) loss (None: no bias)",
    "model.vision.image_size": "input resolution in pixels (square)",
    "model.vision.patch_size": "ViT patch size in pixels",
    "model.vision.width": "image tower width (ResNet: channels of the first stage)",
    "model.vision.layers": "image tower depth (ResNet: blocks per stage, 4 numbers)",
    "model.vision.heads": "attention heads of the image tower (ResNet: of its attention pool)",
    "model.vision.mlp_ratio": "ViT MLP hidden units per unit of width",
    "model.vision.init_scheme": "how the image tower's weights start: default, or openai "
    "(OpenAI's code: PyTorch's own initialisers where it keeps them)",
    "model.vision.pool_type": "token (CLIP: a class token, ln_post on it, a projection) or map "
    "(SigLIP: no class token, an attention-pooling head whose output is the embedding)",
    "model.vision.patch_bias": "a bias in the patch convolution (SigLIP's towers have one)",
    "model.vision.ln_eps": "the image tower's LayerNorm epsilon (1e-5 CLIP, 1e-6 SigLIP)",
    "model.vision.gelu_tanh": "GELU's tanh approximation in the image tower (some SigLIP sizes)",
    "model.text.context_length": "tokens per caption (longer captions are truncated)",
    "model.text.vocab_size": "text tower vocabulary (must hold the tokenizer's)",
    "model.text.width": "text tower width",
    "model.text.layers": "text tower depth",
    "model.text.heads": "attention heads of the text tower",
    "model.text.mlp_ratio": "text MLP hidden units per unit of width",
    "model.text.pool_type": "which token's features embed a caption: argmax (the highest id: the "
    "CLIP BPE's end token), eot (the first eot_token_id) or last (the last position: SigLIP's "
    "tokenizers, which pad to the context); must be where the tokenizer ends captions",
    "model.text.eot_token_id": "the end-of-text id that pool_type=eot looks for (the "
    "sentencepiece model's eos id)",
    "model.text.causal": "causal attention (CLIP); False: every token sees every other (SigLIP)",
    "model.text.proj_type": "linear (a projection into the joint space) or none (the pooled "
    "features are the embedding)",
    "model.text.proj_bias": "the text projection has a bias (SigLIP)",
    "model.text.ln_eps": "the text tower's LayerNorm epsilon (1e-5 CLIP, 1e-6 SigLIP)",
    "model.text.gelu_tanh": "GELU's tanh approximation in the text tower (SigLIP 2)",
    "loss.name": "softmax (CLIP) or sigmoid (SigLIP)",
    "loss.chunk_size": "stream the loss over column blocks of this size (0: not chunked)",
    "loss.allow_mismatch": "train with the softmax loss a model that has a logit bias (a SigLIP "
    "model), which is refused otherwise",
    "loss.max_logit_scale": "the temperature's clamp: logit scale at most this (100 in CLIP)",
    "optim.learning_rate": "peak learning rate, after warmup",
    "optim.warmup_steps": "linear warmup from 0 over this many steps",
    "optim.schedule": "after warmup: cosine (decay to 0) or constant",
    "optim.b1": "AdamW beta1",
    "optim.b2": "AdamW beta2",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "decoupled weight decay, as open_clip applies it: not on gains, "
    "biases, the class token or the temperature",
    "optim.grad_clip_norm": "clip the global gradient norm to this (0: no clipping)",
    "optim.mu_dtype": "dtype of AdamW's first moment: float32, or bfloat16 for half its memory",
    "optim.accum_steps": "micro-batches per step, gradient exact over the whole batch",
    "optim.frozen": "top-level parameter groups not trained, e.g. ('visual',) for LiT",
    "train_data.source": "synthetic, tfrecord:GLOB, wds:GLOB, tfds:NAME[/CONFIG]:SPLIT or a "
    "mixture A@w,B@w",
    "train_data.image_key": "the records' image feature",
    "train_data.text_key": "the records' caption feature",
    "train_data.tokenizer": "clip_bpe, the path of a sentencepiece .model, or siglip:MODEL / "
    "siglip2:MODEL (SigLIP's / SigLIP 2's; MODEL a sentencepiece file, a tokenizer.json or "
    "hf-hub:REPO)",
    "train_data.shuffle_buffer": "records shuffled at once (0 or 1: no shuffling)",
    "train_data.crop_scale": "random resized crop: range of the kept area fraction",
    "train_data.augmentation": "random_resized_crop (open_clip's, crop_scale of the area) or "
    "random_square_crop (the CLIP paper's: shorter side resized, a random square)",
    "train_data.data_dir": "tfds data_dir ('': tfds's default)",
    "train_data.templates": "captions of a label-only tfds dataset: one drawn per example, the "
    "class name at its {}",
    "train_data.max_image_pixels": "images whose header declares more pixels are skipped and "
    "counted, never decoded (decompression bombs)",
    "evals": "evals during training: evals.NAME = dict(type=..., source=..., every_steps=...)",
}


# The keys whose default is None, with the type a value given to them has: ml_collections can
# override a None key from the command line only as a typed placeholder.
NONE_KEYS = {
    "resume_step": int,
    "model.attn_impl": str,
    "model.init_logit_bias": float,
    "model.text.eot_token_id": int,
}


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
    c.nonfinite = "halt"  # or "skip" or "rollback": a non-finite step is never applied
    c.nonfinite_max_consecutive = 5  # a run that keeps skipping is dead: halt
    c.nonfinite_max_fraction = 0.05
    # Loss spikes: a loss 6 spreads above the last 100 calm steps' mean; 3 in a row call for the
    # policy (PaLM rolled back about 100 steps before a spike and skipped the batches between).
    c.spike = ml_collections.ConfigDict(dict(window=100, factor=6.0, length=3, policy="log"))
    c.max_rollbacks = 3
    c.rollback_lr_scale = 1.0
    c.init_from = ""  # OpenAI / OpenCLIP / clip_jax weights to start from (fresh runs only)
    c.init_from_allow_torchscript_code = False  # unsafe: torch.jit.load runs the file's code

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
    c.mesh.allow_split_physical_axes = False
    c.mesh.rules = sharding.DEFAULT_RULES  # FSDP over the width, tensor over heads and MLP

    c.model = ml_collections.ConfigDict(model_config(model))
    c.model.dtype = "bfloat16"  # compute; parameters stay float32
    # The model's other keys are its modules' defaults. The text tower pools at the highest
    # id, where the CLIP BPE ends a caption; a sentencepiece tokenizer needs
    # model.text.pool_type="eot" and its end id in model.text.eot_token_id (training refuses to
    # start otherwise, naming both).
    for key, kind in NONE_KEYS.items():  # None, yet settable from the command line
        parent, _, leaf = key.rpartition(".")
        node = c
        for part in filter(None, parent.split(".")):
            node = node[part]
        # A size's own value (a SigLIP's logit bias) stays; None otherwise.
        node[leaf] = ml_collections.FieldReference(node.get(leaf), field_type=kind)

    c.loss = ml_collections.ConfigDict(dict(name="softmax", chunk_size=0, max_logit_scale=100.0))
    c.loss.allow_mismatch = False  # refuse softmax on a model with a logit bias (SigLIP's)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = learning_rate
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999 if resnet else 0.98
    c.optim.eps = 1e-8 if resnet else 1e-6
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 0.0  # 0 disables; the paper does not clip
    c.optim.mu_dtype = "float32"  # or "bfloat16": half the first moment's memory
    c.optim.accum_steps = 1  # micro-batches per step; the gradient stays exact (train_step.py)
    c.optim.frozen = ()

    c.train_data = ml_collections.ConfigDict()
    c.train_data.source = ""  # required: tfrecord:, wds:, tfds: or synthetic (see above)
    c.train_data.image_key = "jpg"
    c.train_data.text_key = "txt"
    c.train_data.tokenizer = "clip_bpe"  # or a sentencepiece .model path
    c.train_data.shuffle_buffer = 10_000  # records; 0 or 1: no shuffling
    c.train_data.crop_scale = (0.9, 1.0)  # random resized crop's area range
    c.train_data.data_dir = ""  # tfds data_dir ("": tfds's default)
    c.train_data.templates = captions.CAPTION_TEMPLATES  # captions of label-only datasets
    c.train_data.max_image_pixels = MAX_IMAGE_PIXELS  # PIL's limit: larger ones never decoded
    c.train_data.augmentation = "random_resized_crop"  # or the paper's "random_square_crop"

    c.evals = ml_collections.ConfigDict()
    # A key that a config file or an override misspells is an error, not a silent new key; evals
    # stay open for entries (`with c.unlocked():` adds another key on purpose).
    c.lock()
    c.evals.unlock()
    return c


def siglip_config(model: str, learning_rate: float = 1e-3) -> ml_collections.ConfigDict:
    """SigLIP's recipe (Zhai et al. 2023) for a named SigLIP / SigLIP 2 size: the sigmoid loss
    over the global batch, batch 32,768, AdamW with beta2 0.95 (the paper's fix for loss spikes at
    large batch) and weight decay 1e-4, the logit scale and bias at t' = log 10 and b = -10 (the
    size's), and the tokenizer of its published weights (`siglip2:hf-hub:timm/...`, the
    tokenizer.json of the repository open_clip names, fetched on first use)."""
    from clip_jax.weights import pretrained

    c = base_config(model, learning_rate)
    c.loss.name = "sigmoid"
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    c.train_data.tokenizer = pretrained.lookup(model, "webli").tokenizer
    return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`configs/X.py:smoke` keeps the architecture and shrinks the run to a few CPU steps."""
    if arg in (None, ""):
        return c
    if arg != "smoke":
        raise UsageError(f"unknown config argument {arg!r}; the only one is 'smoke'")
    c.train_data.source = "synthetic"
    c.batch_size = 8
    c.total_steps = 3
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.optim.warmup_steps = 1
    c.model.dtype = "float32"  # CPUs have no fast bf16
    return c
