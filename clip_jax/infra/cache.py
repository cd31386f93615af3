"""Where clip_jax keeps what it writes or downloads for itself: `$CLIP_JAX_CACHE` when set, else
`~/.cache/clip_jax`. Inside it: `digits/` (the demo's data, written on first use by
`clip_jax.data.digits.cached_shards`), `weights/` (pretrained checkpoints,
`clip_jax.weights.pretrained`) and `features/` (the linear-probe job's features of weight files)."""

import os

from clip_jax.infra.errors import UsageError

ENV = "CLIP_JAX_CACHE"


def cache_dir(*parts: str) -> str:
    """The cache root, or the path `parts` below it (nothing is created)."""
    root = os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax")
    return os.path.join(root, *parts)


def make_dir(folder: str, what: str, hint: str = f"set {ENV} to another folder") -> None:
    """Creates a cache folder, or says in one line why it cannot be (`what`: "the weights
    cache", ...) and what to do (`hint`)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {what} {folder} ({e}); {hint}") from None
