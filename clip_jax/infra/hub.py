"""Files of the Hugging Face Hub, through huggingface_hub: its cache (the one open_clip and timm
share), its token for gated repositories, `HF_ENDPOINT` (read at each call) and offline mode."""

import http.client
import os


def fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: the network's errors, HTTP statuses, and the Hub's (a
    missing repository or file, offline mode without the file)."""
    from huggingface_hub import errors as hub_errors

    # The Hub's HTTP errors and its "cannot reach the Hub, not cached" are OSErrors already; a
    # file missing on the Hub is not.
    return (OSError, http.client.HTTPException, hub_errors.EntryNotFoundError)


def first_line(error: BaseException) -> str:
    """An error's first line (the Hub's messages run to several), or its type's name."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def cached(repo: str, filename: str, cache_dir: str | None = None) -> str | None:
    """The file's path in huggingface_hub's cache, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def download(repo: str, filename: str, cache_dir: str | None = None) -> str:
    """The file's local path: cached, or downloaded with huggingface_hub (progress bars on
    stderr). Its errors propagate (`fetch_errors`)."""
    from huggingface_hub import hf_hub_download

    from clip_jax import __version__

    return hf_hub_download(
        repo,
        filename,
        cache_dir=cache_dir,
        endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now, not at import
        library_name="clip_jax",
        library_version=__version__,
    )
