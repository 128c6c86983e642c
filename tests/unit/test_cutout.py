"""Strip-wise blur-fusion equals blur-fusion computed straight from its definition over the whole image."""
import pytest
import torch

from core_helpers import box_blur
from iconmatting_core import postprocess as post
from iconmatting_core.preprocess import Placement, restore_alpha
from oracles import old_box_blur, old_estimate_foreground


def synthetic(h, w, seed, band=6.0):
    """Image + matte with opaque, transparent and soft (edge and speckle) pixels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(h, w, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d = torch.hypot(yy - 0.45 * h, xx - 0.55 * w) - 0.3 * min(h, w)
    alpha = (0.5 - d / band).clamp(0, 1)
    speckle = torch.rand(h, w, generator=g) < 0.01
    alpha[speckle] = torch.rand(int(speckle.sum()), generator=g)
    return image, alpha


@pytest.mark.parametrize("hw", [(300, 420), (97, 61), (260, 130)])
def test_matches_the_definition(hw):
    image, alpha = synthetic(*hw, seed=hw[0])
    want = old_estimate_foreground(image[None], alpha[None])[0]
    got = post.estimate_foreground(image[None], alpha[None])[0]
    seen = alpha > 0
    assert (alpha == 0).any() and (alpha == 1).any() and ((alpha > 0) & (alpha < 1)).sum() > 100
    assert (got[seen] - want[seen]).abs().max() < 1e-4  # measured ~1e-7: float64 in both
    assert torch.equal(got[alpha == 0], image[alpha == 0])  # invisible: the image colour is kept
    assert torch.equal(got[alpha == 1], image[alpha == 1])


def test_strips_and_batches_and_other_kernels(monkeypatch):
    image, alpha = synthetic(150, 90, seed=1, band=30.0)
    images = torch.stack([image, image.flip(0)])
    alphas = torch.stack([alpha, alpha.flip(1)])
    want = old_estimate_foreground(images, alphas, kernel_sizes=(20, 4, 2))
    monkeypatch.setattr(post, "STRIP_ROWS", 7)  # many strips, halos crossing several of them
    got = post.estimate_foreground(images, alphas, kernel_sizes=(20, 4, 2))
    seen = alphas > 0
    assert (got[seen] - want[seen]).abs().max() < 1e-4


def test_fully_opaque_or_empty_mattes_cost_nothing(monkeypatch):
    image = torch.rand(1, 64, 64, 3)
    calls = []
    monkeypatch.setattr(post, "_blur_fusion_region", lambda *a: calls.append(a))
    for alpha in (torch.zeros(1, 64, 64), torch.ones(1, 64, 64)):
        assert torch.equal(post.estimate_foreground(image, alpha), image)
    assert calls == []


def test_box_blur_matches_the_integral_image_version():
    x = torch.rand(2, 3, 40, 23, dtype=torch.float64)
    for r in (0, 1, 5, 45):
        assert torch.allclose(box_blur(x, r), old_box_blur(x, r), atol=1e-12)


def test_rgba_cutout_fills_one_buffer():
    image, alpha = synthetic(80, 100, seed=3)
    rgba = post.rgba_cutout(image[None], alpha[None])
    assert rgba.shape == (1, 80, 100, 4) and torch.equal(rgba[0, ..., 3], alpha)
    assert torch.equal(rgba[0, ..., :3], post.estimate_foreground(image[None], alpha[None])[0])
    plain = post.rgba_cutout(image[None], alpha[None], estimate_colors=False)
    assert torch.equal(plain[0, ..., :3], image)


def test_restore_alpha_never_writes_into_its_input():
    alpha = torch.full((1, 64, 64), 0.5)
    alpha[0, 0, 0] = 1.5  # out of range: clamped in the result only
    same = restore_alpha(alpha, Placement(64, 64, 64, 64))
    assert same[0, 0] == 1 and alpha[0, 0, 0] == 1.5
    big = restore_alpha(alpha, Placement(300, 200, 64, 64))
    assert big.shape == (300, 200) and float(big.max()) <= 1


@pytest.mark.parametrize("width", [1100, 1030])
def test_edges_wider_than_one_tile_are_corrected_in_every_column(width):
    """A soft edge running across the whole width (> 512 px: several column tiles): every edge
    pixel, including each tile's first and last column, gets the oracle's colour."""
    h = 24
    g = torch.Generator().manual_seed(width)
    image = torch.rand(h, width, 3, generator=g)
    alpha = torch.zeros(h, width)
    alpha[:8] = 1
    alpha[8:16] = torch.linspace(0.9, 0.1, 8)[:, None]  # a band of soft rows, all columns
    alpha[8:16] += 0.05 * torch.rand(8, width, generator=g)
    want = old_estimate_foreground(image[None], alpha[None])[0]
    got = post.estimate_foreground(image[None], alpha[None])[0]
    soft = (alpha > 0) & (alpha < 1)
    assert soft.any(0).all() and width > 2 * post.TILE_COLUMNS
    err = (got - want).abs().amax(-1)  # [h, w]
    assert float(err[soft].max()) < 1e-4
    assert not torch.allclose(want[soft], image[soft], atol=1e-2)  # the correction is visible
    assert torch.equal(got[alpha == 0], image[alpha == 0]) and torch.equal(got[alpha == 1], image[alpha == 1])


def test_far_apart_edges_form_separate_runs():
    assert post._column_runs(torch.tensor([0, 1, 1, 0, 0, 0, 0, 1, 0, 1]).bool(), gap=3) == [(1, 3), (7, 10)]
    assert post._column_runs(torch.tensor([1, 0, 0, 1]).bool(), gap=3) == [(0, 4)]
    assert post._column_runs(torch.tensor([1, 0, 0, 0, 1]).bool(), gap=3) == [(0, 1), (4, 5)]
    assert post._column_runs(torch.zeros(5, dtype=torch.bool), gap=3) == []


def test_two_objects_far_apart_in_small_tiles(monkeypatch):
    """Two soft edges farther apart than the filters reach (two runs), tiles of 5 columns and strips
    of 3 rows: the same colours as the whole-image oracle."""
    image, alpha = synthetic(30, 200, seed=7)
    alpha = torch.zeros(30, 200)
    alpha[5:25, 10:30] = torch.linspace(0.1, 0.9, 20)[None]
    alpha[5:25, 160:185] = torch.linspace(0.9, 0.2, 25)[None]
    want = old_estimate_foreground(image[None], alpha[None], kernel_sizes=(10, 4))[0]
    monkeypatch.setattr(post, "TILE_COLUMNS", 5)
    monkeypatch.setattr(post, "STRIP_ROWS", 3)
    got = post.estimate_foreground(image[None], alpha[None], kernel_sizes=(10, 4))[0]
    seen = alpha > 0
    assert (got[seen] - want[seen]).abs().max() < 1e-4
    assert torch.equal(got[~seen], image[~seen])


def test_normalise_map_and_heatmap_by_hand():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    got = post.normalise_map(x)
    assert torch.allclose(got[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(got[1], torch.zeros(2, 2))
    colours = post.heatmap(torch.tensor([[0.0, 0.125, 0.25, 0.75, 1.0, 2.0]]))[0]
    want = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.25, 0.65], [0.0, 0.5, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(colours, want, atol=1e-6)


def test_cutouts_build_no_autograd_graph():
    image, alpha = synthetic(40, 50, seed=4)
    image.requires_grad_(True)
    fg = post.estimate_foreground(image[None], alpha[None])
    assert not fg.requires_grad and fg.grad_fn is None
