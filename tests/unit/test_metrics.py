"""Matting metrics: hand-computed values and slow independent references."""
from collections import deque

import numpy as np
import pytest

from iconmatting_core.eval import metrics as M


# ----------------------------------------------------------------- slow independent references


def slow_components(seg):
    """4-connected components by BFS: list of pixel lists, in raster order of first pixel."""
    h, w = seg.shape
    seen = np.zeros_like(seg, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if seg[y, x] and not seen[y, x]:
                q, comp = deque([(y, x)]), []
                seen[y, x] = True
                while q:
                    cy, cx = q.popleft()
                    comp.append((cy, cx))
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and seg[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            q.append((ny, nx))
                comps.append(comp)
    return comps


def slow_largest(seg, include_background=False):
    comps = slow_components(seg)
    out = np.zeros(seg.shape, dtype=bool)
    best = None
    for c in comps:  # strict '>' keeps the first of equal-sized components
        if best is None or len(c) > len(best):
            best = c
    if include_background and (best is None or (~seg).sum() >= len(best)):
        return ~seg
    for y, x in best or []:
        out[y, x] = True
    return out


def slow_conn(pred, gt, region=None):
    """Connectivity error (Rhemann et al. 2009) pixel by pixel, from its definition. Thresholds
    t = 0, 0.1, ..., 1; Omega(t) is the largest 4-connected component of the pixels where pred >= t
    and gt >= t. A pixel's level l is the last threshold before the first Omega that leaves it out
    (1 when every Omega holds it); phi(alpha) = 1 - (alpha - l) when alpha - l >= 0.15, else 1. The
    error is the sum of |phi(pred) - phi(gt)| over the region, / 1000."""
    thresholds = [k * 0.1 for k in range(11)]
    omegas = [slow_largest((pred >= t) & (gt >= t)) for t in thresholds]

    def phi(value, level):
        return 1 - (value - level) if value - level >= 0.15 else 1.0

    total = 0.0
    for y in range(pred.shape[0]):
        for x in range(pred.shape[1]):
            level = 1.0
            for k in range(1, len(thresholds)):
                if not omegas[k][y, x]:
                    level = thresholds[k - 1]
                    break
            if region is None or region[y, x]:
                total += abs(phi(pred[y, x], level) - phi(gt[y, x], level))
    return total / 1000


def slow_gaussgradient(im, sigma=1.4):
    """The gradient of the image smoothed by a Gaussian of standard deviation sigma, pixel by pixel:
    (gx, gy) = the image convolved with d/dx and d/dy of the 2-D Gaussian G(u, v) = g(u) g(v), with
    the image's border pixels repeated outside it. The kernel spans the offsets where the 1-D density
    g is above 0.01 (-4..4 for sigma 1.4) and is scaled to unit L2 norm, as the Grad metric fixes it."""
    def g(t):
        return np.exp(-t * t / (2 * sigma * sigma)) / (sigma * np.sqrt(2 * np.pi))

    def dg_du(u, v):  # d/du of g(u) g(v)
        return -u / sigma ** 2 * g(u) * g(v)

    reach = 0
    while g(reach) > 0.01:
        reach += 1
    offsets = range(-reach, reach + 1)
    norm = np.sqrt(sum(dg_du(u, v) ** 2 for u in offsets for v in offsets))
    h, w = im.shape
    gx, gy = np.zeros((h, w)), np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for v in offsets:  # vertical offset
                for u in offsets:  # horizontal offset
                    value = im[min(max(y - v, 0), h - 1), min(max(x - u, 0), w - 1)]
                    gx[y, x] += dg_du(u, v) / norm * value
                    gy[y, x] += dg_du(v, u) / norm * value
    return gx, gy


# ----------------------------------------------------------------- SAD / MSE


def test_sad_mse_hand_computed_4x4():
    gt = np.zeros((4, 4))
    gt[1:3, 1:3] = 1.0
    pred = gt.copy()
    pred[0, 0] = 0.5  # |err| 0.5
    pred[1, 1] = 0.0  # |err| 1.0
    pred[3, 3] = 0.25  # |err| 0.25
    assert M.sad(pred, gt) == pytest.approx(1.75 / 1000)
    assert M.mse(pred, gt) == pytest.approx((0.25 + 1.0 + 0.0625) / 16 * 1000)
    assert M.mse(pred, gt, scale=1) == pytest.approx((0.25 + 1.0 + 0.0625) / 16)
    # region: only the left column (contains the 0.5 error)
    mask = np.zeros((4, 4), bool)
    mask[:, 0] = True
    assert M.sad(pred, gt, mask) == pytest.approx(0.5 / 1000)
    assert M.mse(pred, gt, mask) == pytest.approx(0.25 / 4 * 1000)


def test_uint8_input_matches_float():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 30)).astype(np.uint8)
    b = rng.integers(0, 256, (20, 30)).astype(np.uint8)
    fa, fb = a / 255.0, b / 255.0
    assert M.sad(a, b) == pytest.approx(M.sad(fa, fb))
    assert M.compute_all(a, b) == pytest.approx(M.compute_all(fa, fb))
    assert M.sad(a, b) == pytest.approx(np.abs(fa - fb).sum() / 1000)


def test_identical_mattes_give_zero():
    rng = np.random.default_rng(1)
    a = rng.random((33, 17))
    assert M.compute_all(a, a) == {"sad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0}


def test_empty_region_is_zero():
    a, b = np.zeros((5, 5)), np.ones((5, 5))
    empty = np.zeros((5, 5), bool)
    assert M.sad(a, b, empty) == 0.0
    assert M.mse(a, b, empty) == 0.0
    assert M.gradient_error(a, b, empty) == 0.0
    assert M.connectivity_error(a, b, empty) == 0.0


# ----------------------------------------------------------------- Grad


def test_gaussian_gradient_matches_slow_2d_convolution():
    rng = np.random.default_rng(2)
    im = rng.random((12, 15))
    im[3:8, 4:11] += 1.0
    gx, gy = M.gaussian_gradient(im, 1.4)
    sx, sy = slow_gaussgradient(im, 1.4)
    np.testing.assert_allclose(gx, sx, atol=1e-12)
    np.testing.assert_allclose(gy, sy, atol=1e-12)


def test_gaussian_kernel_is_9_taps_for_sigma_1_4():
    g, dg = M._derivative_of_gaussian_taps(1.4)
    assert len(g) == len(dg) == 9
    # separable factors carry the unit L2 norm of the 2-D kernel
    assert np.sqrt((np.outer(g, dg) ** 2).sum()) == pytest.approx(1.0)


def test_gradient_error_zero_constant_positive_symmetric():
    flat = np.full((20, 20), 0.3)
    assert M.gradient_error(flat, np.full((20, 20), 0.8)) == pytest.approx(0.0, abs=1e-15)
    step = np.zeros((20, 20))
    step[:, 10:] = 1.0
    e1 = M.gradient_error(step, flat)
    e2 = M.gradient_error(flat, step)
    assert e1 > 0
    assert e1 == pytest.approx(e2)
    # value equals the direct formula with the slow filter
    sx, sy = slow_gaussgradient(step)
    assert e1 == pytest.approx((np.hypot(sx, sy) ** 2).sum() / 1000)
    # restricting to a region far from the edge removes the error
    far = np.zeros((20, 20), bool)
    far[:, :3] = True
    assert M.gradient_error(step, flat, far) == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------- Conn


@pytest.mark.parametrize("density", [0.3, 0.5, 0.6, 0.8])
@pytest.mark.parametrize("include_background", [False, True])
def test_largest_component_matches_bfs(density, include_background):
    rng = np.random.default_rng(int(density * 100))
    for _ in range(5):
        seg = rng.random((23, 31)) < density
        np.testing.assert_array_equal(
            M.largest_component(seg, include_background), slow_largest(seg, include_background)
        )


def test_largest_component_shapes():
    # a spiral-like snake is one component; diagonal contact does not connect (4-connectivity)
    seg = np.zeros((7, 7), bool)
    seg[0, :] = True
    seg[:, 6] = True
    seg[6, :] = True
    seg[2:, 0] = True
    seg[2, :5] = True
    seg[2:5, 4] = True
    assert M.largest_component(seg).sum() == seg.sum()
    diag = np.eye(4, dtype=bool)
    assert M.largest_component(diag).sum() == 1
    assert not M.largest_component(np.zeros((3, 3), bool)).any()
    assert M.largest_component(np.zeros((3, 3), bool), include_background=True).all()
    full = np.ones((3, 4), bool)
    assert M.largest_component(full).all()


def test_connectivity_hand_computed():
    # gt a bar of ones, pred with a hole in the middle: both thresholded maps are [1, 0, 1];
    # the largest component (tie -> first) is pixel 0, so l = [1, 0, 0];
    # phi(pred) = [1, 1, 0], phi(gt) = [1, 0, 0] -> error 1 -> 0.001
    gt = np.array([[1.0, 1.0, 1.0]])
    pred = np.array([[1.0, 0.0, 1.0]])
    assert M.connectivity_error(pred, gt) == pytest.approx(0.001)
    assert M.connectivity_error(pred, gt) == pytest.approx(slow_conn(pred, gt))
    # the reference Python port picks the background "component" here and sees no error
    assert M.connectivity_error(pred, gt, reference_compat=True) == 0.0


def test_connectivity_counts_a_pixel_at_exactly_the_threshold():
    # 0.5 is exactly the threshold 5 * 0.1. Both pixels are in the component up to t = 0.5 and
    # pixel 0 leaves it at 0.6, so its level is 0.5: phi(pred) = 1, phi(gt) = 1 - 0.5 -> 0.5 / 1000.
    # Comparing with '>' would lose it at 0.5 (level 0.4, phi(gt) = 0.4 -> 0.6 / 1000).
    pred = np.array([[0.5, 1.0]])
    gt = np.array([[1.0, 1.0]])
    assert M.connectivity_error(pred, gt) == pytest.approx(0.5 / 1000)


@pytest.mark.parametrize("alpha, expected", [(0.1, 0.0), (0.149, 0.0), (0.15, 0.15), (0.2, 0.2), (0.9, 0.9)])
def test_connectivity_counts_only_alpha_at_least_0_15_above_its_level(alpha, expected):
    # pixel 0 has pred 0, so it leaves the component at the first threshold: level 0, and
    # phi(gt) = 1 - alpha only when alpha >= 0.15; pixel 1 stays connected (level 1, phi 1)
    pred = np.array([[0.0, 1.0]])
    gt = np.array([[alpha, 1.0]])
    assert M.connectivity_error(pred, gt) == pytest.approx(expected / 1000, abs=1e-15)


def test_connectivity_matches_slow_reference_on_the_threshold_grid():
    # alphas k * 0.1 are the thresholds themselves, so every '>=' is decided at equality somewhere
    rng = np.random.default_rng(11)
    grid = np.arange(11) * 0.1
    for _ in range(30):
        h, w = rng.integers(1, 9, 2)
        gt = grid[rng.integers(0, 11, (h, w))]
        near = np.clip(np.rint(gt * 10).astype(int) + rng.integers(-2, 3, (h, w)), 0, 10)
        pred = grid[near] if rng.random() < 0.5 else grid[rng.integers(0, 11, (h, w))]
        region = rng.random((h, w)) < 0.6
        assert M.connectivity_error(pred, gt) == pytest.approx(slow_conn(pred, gt), abs=1e-15)
        assert M.connectivity_error(pred, gt, region) == pytest.approx(slow_conn(pred, gt, region), abs=1e-15)


def test_connectivity_matches_slow_reference():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:18, :22]
    gt = np.clip(1.6 - np.hypot(yy - 9, xx - 11) / 4.0, 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1)
    pred[2:5, 2:5] = 0.9  # a detached blob
    region = rng.random(gt.shape) < 0.7
    assert M.connectivity_error(pred, gt) == pytest.approx(slow_conn(pred, gt))
    assert M.connectivity_error(pred, gt, region) == pytest.approx(slow_conn(pred, gt, region))
    assert M.connectivity_error(pred, gt) > 0


# ----------------------------------------------------------------- regions


def test_unknown_region_masking():
    gt = np.zeros((6, 6))
    gt[:, 3:] = 1.0
    trimap = np.zeros((6, 6), np.uint8)
    trimap[:, 3:] = 255
    trimap[:, 2:4] = 128
    pred = gt.copy()
    pred[:, 0] = 1.0  # error only in the known background
    assert M.sad(pred, gt) == pytest.approx(6 / 1000)
    res = M.compute_all(pred, gt, trimap, region="unknown")
    assert res["sad"] == 0.0 and res["mse"] == 0.0 and res["conn"] == 0.0
    assert M.compute_all(pred, gt, trimap)["sad"] == pytest.approx(6 / 1000)  # default: all
    pred2 = gt.copy()
    pred2[:, 2] = 0.5  # error inside the unknown band
    res = M.compute_all(pred2, gt, trimap, region="unknown")
    assert res["sad"] == pytest.approx(3 / 1000)
    assert res["mse"] == pytest.approx(6 * 0.25 / 12 * 1000)
    # float [0, 1] trimaps and the reference's 85..169 band
    np.testing.assert_array_equal(M.unknown_region(trimap / 255.0), trimap == 128)
    assert M.unknown_region(np.array([[84, 85, 169, 170]], np.uint8)).tolist() == [[False, True, True, False]]


# ----------------------------------------------------------------- validation


def test_shape_mismatch_raises_clear_error():
    with pytest.raises(ValueError, match=r"pred has shape \(4, 5\) but gt has shape \(4, 6\)"):
        M.sad(np.zeros((4, 5)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match="mask has shape"):
        M.sad(np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="HxW"):
        M.mse(np.zeros((4, 5, 3)), np.zeros((4, 5, 3)))


@pytest.mark.parametrize("fn", [M.sad, M.mse, M.gradient_error, M.connectivity_error])
def test_nan_raises(fn):
    bad = np.zeros((4, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="gt contains NaN"):
        fn(np.zeros((4, 4)), bad)


def test_float_out_of_range_and_region_argument():
    with pytest.raises(ValueError, match=r"divide a 0..255 matte by 255"):
        M.sad(np.full((3, 3), 200.0), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="needs a trimap"):
        M.compute_all(np.zeros((3, 3)), np.zeros((3, 3)), region="unknown")
    with pytest.raises(ValueError, match="region must be"):
        M.compute_all(np.zeros((3, 3)), np.zeros((3, 3)), region="trimap")


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    a = torch.rand(8, 9)
    b = torch.rand(8, 9, 1)
    assert M.sad(a, b) == pytest.approx(np.abs(a.numpy() - b[..., 0].numpy()).sum() / 1000, rel=1e-6)
