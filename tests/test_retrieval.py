"""Retrieval metrics against a brute-force float64 reference (full matrix, argsort)."""

import numpy as np
import pytest

from clip_jax.evals import retrieval

KS = (1, 2, 5, 10, 10_000)  # 10_000 is past every candidate count here


def _reference_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Queries [Q, N] scores, positive [Q, N] bool -> 1-based rank of the first correct, [Q].

    Sorts by score descending, wrong before correct on equal scores (ties count against).
    """
    ranks = []
    for row, pos in zip(scores, positive, strict=True):
        order = np.lexsort((pos, -row))  # last key first: -score, then wrong (False) first
        ranks.append(int(np.flatnonzero(pos[order])[0]) + 1)
    return np.asarray(ranks)


def _reference(image_emb, text_emb, ids, ks):
    images = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    texts = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    scores = texts.astype(np.float64) @ images.astype(np.float64).T  # [T, I]
    positive = ids[:, None] == np.arange(len(image_emb))[None, :]  # [T, I]
    captioned = positive.any(axis=0)
    t2i = _reference_ranks(scores, positive)
    i2t = _reference_ranks(scores.T[captioned], positive.T[captioned])
    out = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_r@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def _data(counts, dim=16, noise=1.0, seed=0):
    """Images [I, E] and captions near their image (so ranks spread over 1..many), unnormalised."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(len(counts), dim)).astype(np.float32)
    ids = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(ids)
    texts = images[ids] + noise * rng.normal(size=(len(ids), dim)).astype(np.float32)
    images *= rng.uniform(0.1, 10.0, size=(len(counts), 1)).astype(np.float32)
    return images, texts.astype(np.float32), ids


def _assert_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        assert isinstance(got[key], float), key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "counts",
    [
        [1] * 60,
        [5] * 40,
        np.random.default_rng(1).integers(1, 8, size=50),
        np.random.default_rng(2).integers(0, 4, size=50),  # some images have no caption
    ],
    ids=["1_each", "5_each", "1_to_7", "0_to_3"],
)
def test_matches_reference(counts):
    images, texts, ids = _data(counts)
    got = retrieval.metrics(images, texts, ids, ks=KS, chunk_size=16)
    _assert_equal(got, _reference(images, texts, ids, KS))
    # Not all trivially 1 or 0: the data spreads ranks out.
    assert 0 < got["text_to_image_r@1"] < 1
    assert got["image_to_text_r@10000"] == got["text_to_image_r@10000"] == 1.0


def test_default_keys():
    images, texts, ids = _data([2] * 20)
    got = retrieval.metrics(images, texts, ids)
    want = {f"{d}_r@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    want |= {
        f"{d}_{s}_rank" for d in ("image_to_text", "text_to_image") for s in ("mean", "median")
    }
    assert set(got) == want


def test_ties_count_against():
    # Two identical images, each with one caption equal to it: every correct match ties a wrong one.
    e = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-3.0, 0.0, 1.0]], np.float32)
    got = retrieval.metrics(e, e * 2.0, np.array([0, 1, 2]), ks=(1, 2))
    assert got["text_to_image_r@1"] == pytest.approx(1 / 3)
    assert got["image_to_text_r@1"] == pytest.approx(1 / 3)
    assert got["text_to_image_r@2"] == got["image_to_text_r@2"] == 1.0
    assert got["text_to_image_mean_rank"] == pytest.approx(5 / 3)
    assert got["image_to_text_median_rank"] == 2.0


def test_ties_random_duplicates_match_reference():
    images, texts, ids = _data(np.random.default_rng(3).integers(1, 6, size=40), noise=0.3)
    images[10:20] = images[0:10]  # duplicate images
    texts[5:15] = texts[20:30]  # duplicate captions (mostly of other images)
    got = retrieval.metrics(images, texts, ids, ks=KS, chunk_size=7)
    _assert_equal(got, _reference(images, texts, ids, KS))


def test_chunk_size_does_not_change_result():
    images, texts, ids = _data(np.random.default_rng(4).integers(1, 8, size=53))
    whole = retrieval.metrics(images, texts, ids, ks=KS, chunk_size=4096)
    for chunk_size in (1, 10, 52):  # uneven last chunks, and one row at a time
        assert retrieval.metrics(images, texts, ids, ks=KS, chunk_size=chunk_size) == whole


@pytest.mark.parametrize("bad", [-1, 30])
def test_out_of_range_ids_raise(bad):
    images, texts, ids = _data([2] * 30)
    ids[3] = bad
    with pytest.raises(ValueError, match="text_image_ids"):
        retrieval.metrics(images, texts, ids)


@pytest.mark.parametrize(
    "change",
    [
        lambda i, t, ids: (i, t, ids[:-1]),  # one id short
        lambda i, t, ids: (i, t, ids.astype(np.float32)),  # not integers
        lambda i, t, ids: (i[:, :-1], t, ids),  # widths differ
        lambda i, t, ids: (i, t[:0], ids[:0]),  # no captions
    ],
)
def test_bad_arguments_raise(change):
    with pytest.raises(ValueError, match="retrieval"):
        retrieval.metrics(*change(*_data([2] * 10)))
