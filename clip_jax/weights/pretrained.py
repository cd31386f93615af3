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
import os
from typing import Any, NamedTuple

from clip_jax.data.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.weights import downloads
from clip_jax.weights.downloads import weights_dir  # noqa: F401  (the public name, kept here)

_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
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


def download(model: str, tag: str, *, cache_dir: str | None = None, verify: bool = True) -> str:
    """The local path of a published checkpoint, downloaded and checked on first use
    (`clip_jax.weights.downloads`).

    Args:
      model: a model name of `list_pretrained()` (e.g. "ViT-B-32").
      tag: one of its tags (e.g. "openai"; case and "-" vs "_" do not matter).
      cache_dir: the weights directory (default: see `downloads.weights_dir`).
      verify: False also accepts a file for which no sha256 is known (a known one is checked).

    Returns:
      The path of the cached file.
    """
    weights = lookup(model, tag)
    folder = os.path.join(model.removesuffix("-quickgelu"), _clean_tag(tag))
    return downloads.fetch(
        weights.sources, folder, f"{model} {tag!r}", cache_dir=cache_dir, verify=verify
    )
