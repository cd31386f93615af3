"""Published CLIP weights by model name and tag, as open_clip names them: the registry (data), a
download cache with sha256 checks, and `list_pretrained()`.

    model, variables = clip_jax.load_pretrained("ViT-B-32", pretrained="openai")

Cache: `cache_dir=` if given, else `$CLIP_JAX_CACHE/weights`, else `~/.cache/clip_jax/weights`;
files land as `MODEL/TAG/FILENAME` (a `-quickgelu` name shares its base model's files).

Checksums. A download streams into a temporary file in the cache directory while its sha256 is
computed, and is renamed into place only when that equals the expected hash: the registry's (OpenAI
publishes it in the URL's path) or, where the registry has none, the one the server declares
(Hugging Face sends an LFS file's sha256 as `X-Linked-Etag` on its redirect; a 64-hex `ETag` counts
too). A mismatch raises a UsageError and nothing is kept. When no hash is known at all, the file is
refused unless `verify=False`; a known hash is always checked. A checked file gets a sidecar
`FILENAME.sha256` (`sha256sum -c` format) and later calls trust a file with its sidecar, without
re-hashing or touching the network (when the registry pins a hash, the sidecar must match it);
an unchecked one gets `FILENAME.sha256.unverified`, which only `verify=False` calls accept.

Sources. Each entry lists its files in order: OpenAI's own URL first, then open_clip's Hugging Face
copies (`.safetensors`, which needs no PyTorch, before the `.bin`). The next is tried when one
cannot be fetched (network error, HTTP error), and PyTorch files are skipped when torch is absent.

The Hugging Face Hub. Files of a Hub repository (`Source.hub_repo`) are fetched by
`huggingface_hub` into its own cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`; `cache_dir=` given: `CACHE_DIR/hub`), the one open_clip and timm use:
weights already there are not fetched again, and the Hub's tokens (`HF_TOKEN`, `hf auth login`)
for gated repositories, `HF_ENDPOINT` mirrors and offline mode (`HF_HUB_OFFLINE=1`) work as for
every Hugging Face user. A cached file is used without touching the network. The Hub names an LFS
file's blob by its sha256: the blob is hashed once and checked against it (a mismatch removes it
and raises a UsageError), and a marker under `WEIGHTS_DIR/.hub-verified/` spares later loads the
hashing. A Hub file without a sha256 is refused unless `verify=False`, as any other file.
OpenAI's own URLs keep their pinned hashes and the downloader here.
"""

import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from email.message import Message
from typing import Any, NamedTuple

from clip_jax.data.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from clip_jax.infra import cache, hub, paths
from clip_jax.infra.errors import UsageError

_TIMEOUT_S = 60  # per socket operation, so a dead mirror fails over instead of hanging
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
_TORCH_EXTS = (".pt", ".pth", ".bin")
_INCEPTION = (0.5, 0.5, 0.5)


class Source(NamedTuple):
    url: str
    sha256: str | None = None  # None: take the hash the server declares, if it sends one
    hub_repo: str | None = None  # a file of this Hub repository: fetched by huggingface_hub


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published checkpoint of a model config: where to get it, what it needs, and its
    evaluation protocol (open_clip's preprocessing config for the tag)."""

    sources: tuple[Source, ...]  # tried in order
    quick_gelu: bool = False  # the activation the weights were trained with
    mean: tuple[float, ...] = CLIP_MEAN  # the pixel statistics they were trained with
    std: tuple[float, ...] = CLIP_STD
    resize_mode: str = "shortest"  # `Preprocess.resize_mode`
    interpolation: str = "bicubic"
    tokenizer: str = "clip_bpe"  # `data.tokenizers.get_tokenizer`'s name of the tag's tokenizer

    def preprocess(self, size: int) -> Preprocess:
        """These weights' evaluation transform at the model's resolution `size`."""
        return Preprocess(size, self.resize_mode, self.interpolation, self.mean, self.std)


def _hf(repo: str, **fields: Any) -> Weights:
    urls = [f"https://huggingface.co/{repo}/resolve/main/{name}" for name in _HF_FILES]
    return Weights(tuple(Source(url, hub_repo=repo) for url in urls), **fields)


def _siglip(repo: str, tokenizer: str) -> Weights:
    """A SigLIP / SigLIP 2 checkpoint on the Hub: open_clip's preprocessing for it, the image
    squashed to the model's square (no crop), bicubic, mean and std 0.5; and its tokenizer, the
    tokenizer.json of the repository open_clip's config names (`hf_tokenizer_name`)."""
    family = "siglip2" if "SigLIP2" in repo else "siglip"
    return _hf(
        repo,
        mean=_INCEPTION,
        std=_INCEPTION,
        resize_mode="squash",
        tokenizer=f"{family}:hf-hub:{tokenizer}",
    )


def _openai(sha256: str, filename: str, timm_repo: str) -> Weights:
    url = f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}"
    return Weights((Source(url, sha256), *_hf(timm_repo).sources), quick_gelu=True)


# Model config (clip_jax.models.sizes) -> tag -> weights; from open_clip's pretrained.py, with
# OpenAI's original URLs (their sha256 in the path) ahead of the copies open_clip now points to.
PRETRAINED: dict[str, dict[str, Weights]] = {
    "RN50": {
        "openai": _openai(
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
            "RN50.pt",
            "timm/resnet50_clip.openai",
        ),
        "yfcc15m": _hf("timm/resnet50_clip.yfcc15m", quick_gelu=True),
        "cc12m": _hf("timm/resnet50_clip.cc12m", quick_gelu=True),
    },
    "RN101": {
        "openai": _openai(
            "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
            "RN101.pt",
            "timm/resnet101_clip.openai",
        ),
        "yfcc15m": _hf("timm/resnet101_clip.yfcc15m", quick_gelu=True),
    },
    "RN50x4": {
        "openai": _openai(
            "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
            "RN50x4.pt",
            "timm/resnet50x4_clip.openai",
        ),
    },
    "ViT-B-32": {
        "openai": _openai(
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            "ViT-B-32.pt",
            "timm/vit_base_patch32_clip_224.openai",
        ),
        "laion400m_e31": _hf("timm/vit_base_patch32_clip_224.laion400m_e31", quick_gelu=True),
        "laion400m_e32": _hf("timm/vit_base_patch32_clip_224.laion400m_e32", quick_gelu=True),
        "laion2b_e16": _hf("timm/vit_base_patch32_clip_224.laion2b_e16"),
        "laion2b_s34b_b79k": _hf("laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        "datacomp_xl_s13b_b90k": _hf("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    },
    "ViT-B-16": {
        "openai": _openai(
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            "ViT-B-16.pt",
            "timm/vit_base_patch16_clip_224.openai",
        ),
        "laion400m_e31": _hf("timm/vit_base_patch16_clip_224.laion400m_e31"),
        "laion400m_e32": _hf("timm/vit_base_patch16_clip_224.laion400m_e32"),
        "laion2b_s34b_b88k": _hf("laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        "datacomp_xl_s13b_b90k": _hf("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    },
    "ViT-L-14": {
        "openai": _openai(
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            "ViT-L-14.pt",
            "timm/vit_large_patch14_clip_224.openai",
        ),
        "laion400m_e31": _hf("timm/vit_large_patch14_clip_224.laion400m_e31"),
        "laion400m_e32": _hf("timm/vit_large_patch14_clip_224.laion400m_e32"),
        "laion2b_s32b_b82k": _hf(
            "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean=_INCEPTION, std=_INCEPTION
        ),
        "datacomp_xl_s13b_b90k": _hf("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    },
    "ViT-L-14-336": {
        "openai": _openai(
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            "ViT-L-14-336px.pt",
            "timm/vit_large_patch14_clip_336.openai",
        ),
    },
    # SigLIP and SigLIP 2 (Google's WebLI training), as open_clip lists them.
    "ViT-B-16-SigLIP": {"webli": _siglip("timm/ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP")},
    "ViT-B-16-SigLIP-256": {"webli": _siglip("timm/ViT-B-16-SigLIP-256", "timm/ViT-B-16-SigLIP")},
    "ViT-B-16-SigLIP-i18n-256": {
        "webli": _siglip("timm/ViT-B-16-SigLIP-i18n-256", "timm/ViT-B-16-SigLIP-i18n-256")
    },
    "ViT-B-16-SigLIP-384": {"webli": _siglip("timm/ViT-B-16-SigLIP-384", "timm/ViT-B-16-SigLIP")},
    "ViT-B-16-SigLIP-512": {"webli": _siglip("timm/ViT-B-16-SigLIP-512", "timm/ViT-B-16-SigLIP")},
    "ViT-L-16-SigLIP-256": {"webli": _siglip("timm/ViT-L-16-SigLIP-256", "timm/ViT-B-16-SigLIP")},
    "ViT-L-16-SigLIP-384": {"webli": _siglip("timm/ViT-L-16-SigLIP-384", "timm/ViT-B-16-SigLIP")},
    "ViT-SO400M-14-SigLIP": {"webli": _siglip("timm/ViT-SO400M-14-SigLIP", "timm/ViT-B-16-SigLIP")},
    "ViT-SO400M-16-SigLIP-i18n-256": {
        "webli": _siglip("timm/ViT-SO400M-16-SigLIP-i18n-256", "timm/ViT-B-16-SigLIP-i18n-256")
    },
    "ViT-SO400M-14-SigLIP-378": {  # open_clip's: the 384 weights (the same 27x27 grid)
        "webli": _siglip("timm/ViT-SO400M-14-SigLIP-384", "timm/ViT-B-16-SigLIP")
    },
    "ViT-SO400M-14-SigLIP-384": {
        "webli": _siglip("timm/ViT-SO400M-14-SigLIP-384", "timm/ViT-B-16-SigLIP")
    },
    "ViT-B-32-SigLIP2-256": {
        "webli": _siglip("timm/ViT-B-32-SigLIP2-256", "timm/ViT-B-32-SigLIP2-256")
    },
    "ViT-B-16-SigLIP2": {"webli": _siglip("timm/ViT-B-16-SigLIP2", "timm/ViT-B-16-SigLIP2")},
    "ViT-B-16-SigLIP2-256": {
        "webli": _siglip("timm/ViT-B-16-SigLIP2-256", "timm/ViT-B-16-SigLIP2-256")
    },
    "ViT-B-16-SigLIP2-384": {
        "webli": _siglip("timm/ViT-B-16-SigLIP2-384", "timm/ViT-B-16-SigLIP2-384")
    },
    "ViT-B-16-SigLIP2-512": {
        "webli": _siglip("timm/ViT-B-16-SigLIP2-512", "timm/ViT-B-16-SigLIP2-512")
    },
    "ViT-L-16-SigLIP2-256": {
        "webli": _siglip("timm/ViT-L-16-SigLIP2-256", "timm/ViT-L-16-SigLIP2-256")
    },
    "ViT-L-16-SigLIP2-384": {
        "webli": _siglip("timm/ViT-L-16-SigLIP2-384", "timm/ViT-L-16-SigLIP2-384")
    },
    "ViT-L-16-SigLIP2-512": {
        "webli": _siglip("timm/ViT-L-16-SigLIP2-512", "timm/ViT-L-16-SigLIP2-512")
    },
    "ViT-SO400M-14-SigLIP2": {
        "webli": _siglip("timm/ViT-SO400M-14-SigLIP2", "timm/ViT-SO400M-14-SigLIP2")
    },
    "ViT-SO400M-14-SigLIP2-378": {
        "webli": _siglip("timm/ViT-SO400M-14-SigLIP2-378", "timm/ViT-SO400M-14-SigLIP2-378")
    },
    "ViT-SO400M-16-SigLIP2-256": {
        "webli": _siglip("timm/ViT-SO400M-16-SigLIP2-256", "timm/ViT-SO400M-16-SigLIP2-256")
    },
    "ViT-SO400M-16-SigLIP2-384": {
        "webli": _siglip("timm/ViT-SO400M-16-SigLIP2-384", "timm/ViT-SO400M-16-SigLIP2-384")
    },
    "ViT-SO400M-16-SigLIP2-512": {
        "webli": _siglip("timm/ViT-SO400M-16-SigLIP2-512", "timm/ViT-SO400M-16-SigLIP2-512")
    },
    "ViT-gopt-16-SigLIP2-256": {
        "webli": _siglip("timm/ViT-gopt-16-SigLIP2-256", "timm/ViT-gopt-16-SigLIP2-256")
    },
    "ViT-gopt-16-SigLIP2-384": {
        "webli": _siglip("timm/ViT-gopt-16-SigLIP2-384", "timm/ViT-gopt-16-SigLIP2-384")
    },
}


# ---------------------------------------------------------------------------------------------
# Names


def _tags(model: str) -> dict[str, Weights]:
    """A model's tags; `NAME-quickgelu` has NAME's QuickGELU-trained weights, as in open_clip."""
    base = model.removesuffix("-quickgelu")
    tags = PRETRAINED.get(base, {})
    return {t: w for t, w in tags.items() if w.quick_gelu} if base != model else tags


def list_tags(model: str) -> list[str]:
    """The tags of a model name's published weights ([] for a name the registry does not know)."""
    return list(_tags(model))


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def list_pretrained() -> list[tuple[str, str]]:
    """Every (model name, tag) with published weights, as open_clip's `list_pretrained()`."""
    names = [*PRETRAINED, *(f"{m}-quickgelu" for m in PRETRAINED)]
    return [(name, tag) for name in names for tag in _tags(name)]


def lookup(model: str, tag: str) -> Weights:
    """The registry entry of a model name and tag; UsageError listing what exists otherwise."""
    tags = _tags(model)
    if not tags:
        known = ", ".join(dict.fromkeys(name for name, _ in list_pretrained()))
        raise UsageError(f"no pretrained weights for model {model!r}; models with weights: {known}")
    if _clean_tag(tag) not in tags:
        raise UsageError(
            f"no pretrained weights {tag!r} for {model}; its tags: {', '.join(tags)} "
            "(clip_jax.list_pretrained() lists all)"
        )
    return tags[_clean_tag(tag)]


def resolve(
    path: str, tag: str | None, *, cache_dir: str | None, verify: bool
) -> tuple[str, dict[str, Any]]:
    """`load_pretrained`'s first step: (model name, tag) -> (cached file, the model fields the
    weights need); a path without a tag passes through."""
    if tag is None:
        if cache_dir is not None or not verify:
            raise UsageError("cache_dir= and verify= apply to pretrained=TAG downloads only")
        if not paths.path(path).exists() and _tags(path):
            raise UsageError(
                f"{path!r} is a model name, not a file: choose its weights with pretrained=TAG "
                f"(one of {', '.join(_tags(path))})"
            )
        return path, {}
    weights = lookup(path, tag)
    from clip_jax.models import sizes  # here: listing names imports no JAX

    # The resolution is the named size's: shapes alone read 27 patches of 14 as 378 px, where
    # ViT-SO400M-14-SigLIP-384 takes 384 (the pixels past the last patch dropped).
    size = sizes.size_config(path)["vision"]["image_size"]
    return download(path, tag, cache_dir=cache_dir, verify=verify), {
        "quick_gelu": weights.quick_gelu,
        "vision": {"image_size": size},
    }


# ---------------------------------------------------------------------------------------------
# Cache and download


def weights_dir(cache_dir: str | None = None) -> str:
    """Where downloaded weights live: `cache_dir`, `$CLIP_JAX_CACHE/weights` or
    `~/.cache/clip_jax/weights`."""
    if cache_dir is not None:
        return os.path.expanduser(cache_dir)
    root = os.environ.get("CLIP_JAX_CACHE") or os.path.join("~", ".cache", "clip_jax")
    return os.path.join(os.path.expanduser(root), "weights")


def download(model: str, tag: str, *, cache_dir: str | None = None, verify: bool = True) -> str:
    """The local path of a published checkpoint, downloaded and checked on first use.

    Args:
      model: a model name of `list_pretrained()` (e.g. "ViT-B-32").
      tag: one of its tags (e.g. "openai"; case and "-" vs "_" do not matter).
      cache_dir: the weights directory (default: see `weights_dir`).
      verify: False also accepts a file for which no sha256 is known (a known one is checked).

    Returns:
      The path of the cached file.
    """
    weights = lookup(model, tag)
    folder = os.path.join(weights_dir(cache_dir), model.removesuffix("-quickgelu"), _clean_tag(tag))
    sources = [s for s in weights.sources if not _needs_torch(s.url) or _has_torch()]
    if not sources:
        raise UsageError(
            f"{model} {tag!r} is published as PyTorch files only: pip install torch to read them"
        )
    for source in sources:
        if source.hub_repo is not None:
            cached = _hub_cached(source, cache_dir)
            if cached is not None:
                return _check_hub_blob(cached, cache_dir, verify)
        elif _is_cached(_target(folder, source), source.sha256, verify):
            return _target(folder, source)
    failures = []
    for source in sources:
        try:
            if source.hub_repo is not None:
                return _hub_fetch(source, cache_dir, verify)
            cache.make_dir(folder, "the weights cache", "set CLIP_JAX_CACHE or pass cache_dir=")
            return _fetch(source, _target(folder, source), verify)
        except hub.fetch_errors() as e:  # URLError, HTTPError, timeouts, resets, the Hub's errors
            failures.append(f"{source.url}: {hub.first_line(e)}")
    raise UsageError(
        f"could not download {model} {tag!r}: {'; '.join(failures)}. Check the network, or "
        "download one of these files by hand and pass its path to load_pretrained"
    )


def _hub_cache(cache_dir: str | None) -> str | None:
    """huggingface_hub's cache for Hub files: its own default (shared with open_clip and timm), or
    `CACHE_DIR/hub` when the caller names a cache."""
    return None if cache_dir is None else os.path.join(os.path.expanduser(cache_dir), "hub")


def _hub_cached(source: Source, cache_dir: str | None) -> str | None:
    """The Hub file's path in huggingface_hub's cache, or None; no network."""
    return hub.cached(source.hub_repo, _filename(source.url), _hub_cache(cache_dir))


def _hub_fetch(source: Source, cache_dir: str | None, verify: bool) -> str:
    """Downloads a Hub file with huggingface_hub and checks it (`_check_hub_blob`)."""
    path = hub.download(source.hub_repo, _filename(source.url), _hub_cache(cache_dir))
    return _check_hub_blob(path, cache_dir, verify)


def _check_hub_blob(path: str, cache_dir: str | None, verify: bool) -> str:
    """A Hub file whose blob is named by its sha256 (LFS) is hashed once and checked; a marker
    remembers it. A mismatch removes the blob and its link: nothing corrupt stays cached."""
    blob = os.path.realpath(path)
    name = os.path.basename(blob).lower()
    if not (len(name) == 64 and all(c in "0123456789abcdef" for c in name)):
        if verify:
            raise UsageError(
                f"no checksum is known for {path} (the Hub stores it as a non-LFS file); pass "
                "verify=False to accept it unchecked"
            )
        return path
    marker = os.path.join(weights_dir(cache_dir), ".hub-verified", name)
    if os.path.isfile(marker):
        return path
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != name:
        for stale in (blob, path):
            if os.path.lexists(stale):
                os.remove(stale)
        raise UsageError(
            f"checksum mismatch for {path}: expected {name}, got {digest.hexdigest()}; the file "
            "was not kept"
        )
    cache.make_dir(os.path.dirname(marker), "the weights cache", "set CLIP_JAX_CACHE")
    with open(marker, "w") as f:
        f.write(f"{name}  {os.path.basename(path)}\n")
    print(f"{os.path.basename(path)}: sha256 {name} verified", file=sys.stderr)
    return path


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _needs_torch(url: str) -> bool:
    return os.path.splitext(_filename(url))[1].lower() in _TORCH_EXTS


def _filename(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def _target(folder: str, source: Source) -> str:
    return os.path.join(folder, _filename(source.url))


def _is_cached(path: str, pinned: str | None, verify: bool) -> bool:
    sidecars = [path + ".sha256"] + ([] if verify else [path + ".sha256.unverified"])
    for sidecar in sidecars:
        if os.path.isfile(path) and os.path.isfile(sidecar):
            with open(sidecar) as f:
                recorded = f.read().split(maxsplit=1)[:1]
            if recorded and (pinned is None or recorded[0] == pinned):
                return True
    return False


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of each redirect: Hugging Face declares the file's sha256 there."""

    def __init__(self) -> None:
        self.headers: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _declared_sha256(headers: list[Message]) -> str | None:
    """The first 64-hex `X-Linked-Etag`, else `ETag`, along the redirect chain."""
    for key in ("X-Linked-Etag", "ETag"):
        for h in headers:
            value = (h.get(key) or "").removeprefix("W/").strip('"').lower()
            if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
                return value
    return None


def _fetch(source: Source, path: str, verify: bool) -> str:
    from clip_jax import __version__

    redirects = _RecordRedirects()
    request = urllib.request.Request(source.url, headers={"User-Agent": f"clip_jax/{__version__}"})
    with urllib.request.build_opener(redirects).open(request, timeout=_TIMEOUT_S) as response:
        expected = source.sha256 or _declared_sha256([*redirects.headers, response.headers])
        if expected is None and verify:
            raise UsageError(
                f"no checksum is known for {source.url} (none in the registry, no sha256 ETag from "
                "the server); pass verify=False to accept it unchecked"
            )
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{_filename(path)}.")
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _copy(response, out, total, source.url, path)
            if expected is not None and digest != expected:
                raise UsageError(
                    f"checksum mismatch for {source.url}: expected {expected}, got {digest}; "
                    "the file was not kept"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    checked = expected is not None
    _write_sidecar(path, digest, ".sha256" if checked else ".sha256.unverified")
    print(
        f"{_filename(path)}: sha256 {digest} {'verified' if checked else 'NOT verified'}",
        file=sys.stderr,
    )
    return path


def _copy(response: Any, out: Any, total: int | None, url: str, path: str) -> str:
    """Streams the body to `out` with a progress line on stderr; returns its sha256."""
    print(f"downloading {url}\n  -> {path}", file=sys.stderr)
    tty = sys.stderr.isatty()
    digest, done = hashlib.sha256(), 0
    start = last = time.monotonic()
    while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if time.monotonic() - last >= (0.5 if tty else 10.0):
            last = time.monotonic()
            _progress(done, total, last - start, "\r" if tty else "\n")
    seconds = time.monotonic() - start
    print(
        f"  {done / 1e6:.1f} MB in {seconds:.1f} s, {done / 1e6 / max(seconds, 1e-6):.1f} MB/s",
        file=sys.stderr,
    )
    if total is not None and done != total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")
    return digest.hexdigest()


def _progress(done: int, total: int | None, seconds: float, end: str) -> None:
    """`  120.3 MB of 351.7 MB (34%), ETA 9 s, 25.1 MB/s`."""
    rate = done / max(seconds, 1e-6)
    line = f"  {done / 1e6:.1f} MB"
    if total:
        eta = (total - done) / rate if rate else 0.0
        line += f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%), ETA {eta:.0f} s"
    print(f"{line}, {rate / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)


def _write_sidecar(path: str, digest: str, suffix: str) -> None:
    tmp = f"{path}{suffix}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, path + suffix)
    stale = ".sha256.unverified" if suffix == ".sha256" else ".sha256"
    if os.path.exists(path + stale):
        os.remove(path + stale)
