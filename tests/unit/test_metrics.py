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


def slow_conn(pred, gt, region=None, step=0.1):
    """Direct transcription of the DIM MATLAB compute_connectivity_error."""
    l_map = -np.ones(pred.shape)
    th = [i * step for i in range(int(round(1 / step)) + 1)]
    for i in range(1, len(th)):
        omega = slow_largest((pred >= th[i]) & (gt >= th[i]))
        for y in range(pred.shape[0]):
            for x in range(pred.shape[1]):
                if l_map[y, x] == -1 and not omega[y, x]:
                    l_map[y, x] = th[i - 1]
    l_map[l_map == -1] = 1
    total = 0.0
    for y in range(pred.shape[0]):
        for x in range(pred.shape[1]):
            if region is not None and not region[y, x]:
                continue
            dp, dg = pred[y, x] - l_map[y, x], gt[y, x] - l_map[y, x]
            php = 1 - dp if dp >= 0.15 else 1.0
            phg = 1 - dg if dg >= 0.15 else 1.0
            total += abs(php - phg)
    return total / 1000


def slow_gaussgradient(im, sigma=1.4):
    """2-D kernel built pixel by pixel, convolved with clamped ('nearest') borders."""
    eps = 1e-2
    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * eps))))
    size = 2 * half + 1

    def gauss(x):
        return np.exp(-x ** 2 / (2 * sigma ** 2)) / (sigma * np.sqrt(2 * np.pi))

    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            hx[i, j] = gauss(i - half) * (-(j - half) * gauss(j - half) / sigma ** 2)
    hx /= np.sqrt((hx ** 2).sum())
    hy = hx.T
    h, w = im.shape
    gx, gy = np.zeros_like(im), np.zeros_like(im)
    for y in range(h):
        for x in range(w):
            sx = sy = 0.0
            for i in range(size):
                for j in range(size):
                    v = im[min(max(y + half - i, 0), h - 1), min(max(x + half - j, 0), w - 1)]
                    sx += hx[i, j] * v
                    sy += hy[i, j] * v
            gx[y, x], gy[y, x] = sx, sy
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
    g, dg = M._gauss_kernels(1.4)
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
