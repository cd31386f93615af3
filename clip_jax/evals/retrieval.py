"""Image-text retrieval metrics: recall@K and the rank of the first correct match, both ways.

The CLIP-paper convention (as in CLIP_benchmark's zero-shot retrieval): an image may have any number
of captions; image-to-text recall@K is the fraction of images with *any* of their captions among the
top K texts, text-to-image recall@K the fraction of captions whose one image is among the top K
images. Similarity is the cosine of the two embeddings. Ties count against the model: a wrong
candidate that scores exactly as high as the best correct one ranks above it.

Scores are computed in float32 at the highest matmul precision, a chunk of query rows against all
candidates at a time, so the full [num_texts, num_images] matrix never exists at once.

The eval type `retrieval` (`Retrieval`) embeds a captioned source's images and captions and
reports these metrics.
"""

import functools
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.evals import extract
from clip_jax.evals.evaluator import Evaluator, Key
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import POSITIVE_INT, POSITIVE_INTS
from clip_jax.models.clip import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def metrics(
    image_emb: jax.Array | np.ndarray,
    text_emb: jax.Array | np.ndarray,
    text_image_ids: jax.Array | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K and mean / median rank for image-to-text and text-to-image retrieval.

    Images with no caption are candidates for text-to-image retrieval (always wrong ones) but are
    left out of the image-to-text averages: with nothing to find, they have no rank.

    Args:
      image_emb: [num_images, E] image embeddings, normalised or not (L2-normalised here).
      text_emb: [num_texts, E] text embeddings, normalised or not.
      text_image_ids: int [num_texts], for each caption the row in `image_emb` of its image.
      ks: the K of each recall@K; a K past the number of candidates gives recall 1.
      chunk_size: query rows scored at a time; memory is [chunk_size, num_candidates] floats.

    Returns:
      `image_to_text_r@K` and `text_to_image_r@K` for each K in `ks`, and `image_to_text_mean_rank`,
      `image_to_text_median_rank`, `text_to_image_mean_rank`, `text_to_image_median_rank`: the
      1-based rank of the best-ranked correct candidate, averaged over queries. Python floats.

    Raises:
      ValueError: on mismatched shapes, non-integer or out-of-range ids, no captions, or a K or
        chunk size below 1.
    """
    ids = _check(image_emb, text_emb, text_image_ids, ks, chunk_size)
    images = _normalize(jnp.asarray(image_emb, jnp.float32))  # [I, E]
    texts = _normalize(jnp.asarray(text_emb, jnp.float32))  # [T, E]
    num_images = images.shape[0]

    t2i = _chunked(_text_to_image_ranks, texts, jnp.asarray(ids), images, chunk_size)  # [T]
    has_caption = np.bincount(ids, minlength=num_images) > 0  # [I]
    image_index = jnp.arange(num_images, dtype=jnp.int32)
    i2t = _chunked(_image_to_text_ranks, images, image_index, (texts, jnp.asarray(ids)), chunk_size)
    i2t = i2t[has_caption]

    out = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_r@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def _check(image_emb, text_emb, text_image_ids, ks, chunk_size) -> np.ndarray:
    """Validates the arguments; returns the ids as int32 numpy [num_texts]."""
    if np.ndim(image_emb) != 2 or np.ndim(text_emb) != 2:
        raise ValueError(
            f"retrieval: embeddings must be 2-D, got image {np.shape(image_emb)} "
            f"and text {np.shape(text_emb)}"
        )
    (num_images, dim), (num_texts, text_dim) = np.shape(image_emb), np.shape(text_emb)
    if dim != text_dim:
        raise ValueError(f"retrieval: image width {dim} != text width {text_dim}")
    ids = np.asarray(text_image_ids)
    if ids.shape != (num_texts,):
        raise ValueError(f"retrieval: text_image_ids has shape {ids.shape}, want ({num_texts},)")
    if num_texts == 0:
        raise ValueError("retrieval: no captions")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"retrieval: text_image_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= num_images:
        raise ValueError(
            f"retrieval: text_image_ids must lie in [0, {num_images}), "
            f"got [{ids.min()}, {ids.max()}]"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval: each K must be >= 1, got {tuple(ks)}")
    if chunk_size < 1:
        raise ValueError(f"retrieval: chunk_size must be >= 1, got {chunk_size}")
    return ids.astype(np.int32)


@jax.jit
def _normalize(x: jax.Array) -> jax.Array:
    """Rows to unit L2 norm; an all-zero row stays zero (and scores 0 against everything)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _chunked(rank_fn, queries, query_ids, candidates, chunk_size: int) -> np.ndarray:
    """Runs `rank_fn` over `queries` in chunks of `chunk_size` rows; returns ranks [num_queries]."""
    n = queries.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    # Padded rows get id -1: they match nothing, and their ranks are cut off below.
    queries = jnp.pad(queries, ((0, pad), (0, 0)))
    query_ids = jnp.pad(query_ids, (0, pad), constant_values=-1)
    ranks = _map_chunks(rank_fn, queries, query_ids, candidates, chunk)
    return np.asarray(ranks)[:n]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _map_chunks(rank_fn, queries, query_ids, candidates, chunk: int) -> jax.Array:
    """One compiled loop over [num_chunks, chunk] query rows; one chunk's scores live at a time."""
    queries = queries.reshape(-1, chunk, queries.shape[-1])  # [N, C, E]
    query_ids = query_ids.reshape(-1, chunk)  # [N, C]
    ranks = jax.lax.map(lambda q: rank_fn(*q, candidates), (queries, query_ids))  # [N, C]
    return ranks.reshape(-1)


def _text_to_image_ranks(texts, image_ids, images) -> jax.Array:
    """Texts [C, E] with their image ids [C] against images [I, E] -> 1-based ranks [C]."""
    scores = jnp.matmul(texts, images.T, precision=_HIGHEST)  # [C, I]
    # The correct score is read from the same matrix, so a duplicate image ties it exactly.
    correct = jnp.take_along_axis(scores, jnp.maximum(image_ids, 0)[:, None], axis=1)  # [C, 1]
    wrong = jnp.arange(images.shape[0])[None, :] != image_ids[:, None]  # [C, I]
    return 1 + jnp.sum(wrong & (scores >= correct), axis=1, dtype=jnp.int32)


def _image_to_text_ranks(images, image_index, candidates) -> jax.Array:
    """Images [C, E] with their indices [C] against (texts [T, E], ids [T]) -> ranks [C]."""
    texts, text_image_ids = candidates
    scores = jnp.matmul(images, texts.T, precision=_HIGHEST)  # [C, T]
    correct = text_image_ids[None, :] == image_index[:, None]  # [C, T]
    best = jnp.max(jnp.where(correct, scores, -jnp.inf), axis=1, keepdims=True)  # [C, 1]
    return 1 + jnp.sum(~correct & (scores >= best), axis=1, dtype=jnp.int32)


class Retrieval(Evaluator):
    """Image-to-text and text-to-image retrieval over a captioned source: recall@K for each K of
    `ks`, both ways."""

    KEYS: ClassVar[dict[str, Key]] = {
        "ks": Key(
            (1, 5, 10),
            "recall@K for these K",
            POSITIVE_INTS,
        ),
        "max_captions": Key(7, "captions kept per image", POSITIVE_INT),
    }
    TASK = "zeroshot_retrieval"
    TEXT = True

    def __init__(self, cfg, model, tokenizer, mesh, rules):
        super().__init__(cfg, model, tokenizer, mesh, rules)
        if not self.source.has_captions:
            raise UsageError(f"evals.{self.name}: {self.source.name} has no captions to retrieve")

    def _predict(self):
        model, protocol = self.model, self.preprocess

        def predict(variables, batch, extra):
            del extra
            images = extract.normalize(batch["image"], protocol.mean, protocol.std)
            zimg = model.apply(variables, images, method="encode_image")
            tokens = batch["tokens"]  # [B, M, L]
            b, m, length = tokens.shape
            ztxt = model.apply(variables, tokens.reshape(b * m, length), method="encode_text")
            return {
                "image_emb": l2_normalize(zimg),
                "text_emb": l2_normalize(ztxt).reshape(b, m, -1),
            }

        return predict

    def evaluate(self, variables, model_id, cache_root) -> dict:
        # Shards of one caption per record (grouped by image id) need one row each.
        max_captions = 1 if self.source.has_image_ids else self.cfg["max_captions"]
        out, _ = self.extract(
            "retrieval", self._predict, variables, self.source, max_captions=max_captions
        )
        image_emb, text_emb, text_ids = group_captions(out)
        result = metrics(image_emb, text_emb, text_ids, ks=tuple(self.cfg["ks"]))
        if self.dropped_captions:
            result["dropped_captions"] = self.dropped_captions
        return result


def group_captions(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example outputs of retrieval's predict -> (image_emb [I, E], text_emb [T, E],
    text_image_ids [T]). Examples sharing an image id (TFRecord shards of one caption per
    record) are one image; tfds examples carry all their captions and no id."""
    counts = out["num_captions"]
    texts = np.concatenate([out["text_emb"][i, :c] for i, c in enumerate(counts)])
    example_of_text = np.repeat(np.arange(len(counts)), counts)
    ids = out.get("image_key")
    if ids is None:
        return out["image_emb"], texts, example_of_text
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True, axis=0)
    order = np.argsort(first)  # images in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    image_of_example = rank[inverse.reshape(-1)]
    return out["image_emb"][first[order]], texts, image_of_example[example_of_text]
