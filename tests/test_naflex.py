"""NaFlex (SigLIP 2's native aspect ratios): the token budget, padding that never changes an
embedding, a square image at the model's resolution equal to the fixed-resolution tower, the
position grid resampled as PyTorch's antialiased bilinear interpolation does, and one compiled
program for a stream of 500 random image sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.data import naflex
from clip_jax.data.preprocess import normalize
from clip_jax.models import CLIP, model_config
from clip_jax.models.vit import naflex_positions


@pytest.fixture(scope="module")
def tiny():
    model = CLIP(**model_config("tiny-siglip"))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), int))
    return model, variables


def encode(model, variables, patches, grid):
    return model.apply(variables, patches, grid=grid, method="encode_image")


def most_patches(height, width, budget):
    """The most patches any scale fits in `budget`, by brute force: a grid changes only where a
    side reaches a whole number of patches, k rows (or columns) exactly, so those scales are
    the candidates (sides at least one patch)."""
    best = 0
    for k in range(1, budget + 1):
        for rows, cols in ((k, -(-k * width // height)), (-(-k * height // width), k)):
            count = max(rows, 1) * max(cols, 1)
            if count <= budget:
                best = max(best, count)
    return best


@pytest.mark.parametrize("budget", [1, 16, 64, 256, 576])
def test_target_size_fills_the_budget_at_the_images_aspect(budget):
    rng = np.random.default_rng(budget)
    for _ in range(100):
        height, width = (int(x) for x in rng.integers(1, 2000, 2))
        h, w = naflex.target_size(height, width, 16, budget)
        assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
        assert (h // 16) * (w // 16) == most_patches(height, width, budget), (height, width)
    assert naflex.target_size(512, 512, 16, 256) == (256, 256)
    assert naflex.target_size(100, 1000, 16, 256) == (80, 800)  # 5 x 50 = 250 patches


def test_patchify_orders_patches_by_row_and_pixels_like_the_kernel():
    pixels = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
    patches = naflex.patchify(pixels, 2)
    assert patches.shape == (2 * 3, 12)
    np.testing.assert_array_equal(patches[4], pixels[2:4, 2:4].reshape(-1))  # row 1, column 1


def test_padding_never_changes_an_embedding(tiny):
    model, variables = tiny
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(40, 90), (120, 30)]]
    patches, grid = naflex.batch(images, 8, max_patches=20)
    base = encode(model, variables, patches, grid)
    for extra, value in [(12, 0.0), (12, 1e3), (100, -5.0)]:
        padded = np.concatenate([patches, np.full((2, extra, patches.shape[2]), value)], 1)
        got = encode(model, variables, padded, grid)  # other shapes: other float roundings
        np.testing.assert_allclose(got, base, rtol=0, atol=2e-6)
    shuffled = patches.copy()
    for b, (h, w) in enumerate(grid):
        shuffled[b, h * w :] = rng.standard_normal(shuffled[b, h * w :].shape)
    np.testing.assert_array_equal(encode(model, variables, shuffled, grid), base)  # same shape


@pytest.mark.parametrize("budget", [16, 24])
def test_a_square_image_at_the_models_resolution_is_the_fixed_tower(tiny, budget):
    model, variables = tiny
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
    patches, grid = naflex.batch([image], 8, budget)
    assert grid.tolist() == [[4, 4]]  # 5 x 5 patches would be 25 > 24: no resize
    fixed = model.apply(
        variables,
        normalize(image[None], naflex.SIGLIP_MEAN, naflex.SIGLIP_STD),
        method="encode_image",
    )
    np.testing.assert_allclose(encode(model, variables, patches, grid), fixed, rtol=0, atol=2e-6)


def test_positions_resample_as_pytorchs_antialiased_bilinear():
    torch = pytest.importorskip("torch")
    side, dim = 6, 5
    pos = np.random.default_rng(2).standard_normal((side * side, dim)).astype(np.float32)
    grids = [(6, 6), (3, 9), (12, 2), (1, 1), (4, 17)]
    tokens = max(h * w for h, w in grids)
    got = np.asarray(naflex_positions(jnp.asarray(pos), jnp.asarray(grids), tokens))
    for b, (h, w) in enumerate(grids):
        grid = torch.from_numpy(pos.reshape(side, side, dim)).permute(2, 0, 1)[None]
        want = (
            torch.nn.functional.interpolate(
                grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )[0]
            .permute(1, 2, 0)
            .reshape(h * w, dim)
        )
        np.testing.assert_allclose(got[b, : h * w], want.numpy(), rtol=1e-5, atol=1e-5)


def test_one_compiled_program_for_500_random_sizes(tiny):
    model, variables = tiny
    traces = []

    @jax.jit
    def embed(patches, grid):
        traces.append(patches.shape)  # runs once per compiled program
        return encode(model, variables, patches, grid)

    rng = np.random.default_rng(3)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 400, (500, 2))]
    for i in range(0, 500, 4):
        images = [np.zeros((h, w, 3), np.uint8) + 128 for h, w in sizes[i : i + 4]]
        out = embed(*naflex.batch(images, 8, max_patches=32))
        assert out.shape == (4, 32) and bool(jnp.isfinite(out).all())
    assert len(traces) == 1, traces
