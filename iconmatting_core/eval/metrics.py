"""Alpha-matte error metrics: SAD, MSE, Grad and Conn (pure numpy, float64, no scipy).

Grad and Conn are the gradient and connectivity errors of Rhemann et al. 2009 ("A Perceptually
Motivated Online Benchmark for Image Matting"); SAD and MSE are the plain sums and means. Each
function's docstring states its definition. Constants, scales and tie-breaks are those of the
Deep Image Matting evaluation code and of the Python version that the IconMatting reference
repository ships (``icm/criterion/matting_criterion_eval.py``), so our numbers compare with the
published ones; where that Python version departs from the definition it is said below.

Conventions (all functions):

* ``pred`` and ``gt`` are alpha mattes of shape ``[H, W]`` (``[H, W, 1]`` is accepted). Floating
  point input must lie in ``[0, 1]``; integer input is read as 8-bit (``uint8``, 0..255, divided by
  255) or 16-bit (``uint16``, divided by 65535). Floats outside ``[0, 1]`` are rejected (a matte in
  0..255 stored as float must be divided by 255 first, or passed as ``uint8``). NaN/inf and shape
  mismatches raise ``ValueError``. Torch CPU tensors work (anything ``np.asarray`` accepts).
* ``mask`` selects the pixels that are summed: ``None`` = the whole image, otherwise a boolean
  ``[H, W]`` array (use :func:`unknown_region` for the unknown band of a trimap). The gradient and
  connectivity maps are always computed on the whole image; only the summation is restricted.
* Reported scales, as in the matting literature and the reference code:

  - SAD  = sum |pred - gt| over the region, / 1000                   (reference ``compute_sad_loss``)
  - MSE  = mean (pred - gt)^2 over the region's pixels, x 1000 by default (``compute_mse_loss``
    returns the plain mean; the ``scale`` argument of :func:`mse` gives it with ``scale=1``).
    An empty region gives 0 (the reference divides by ``count + 1e-8``).
  - Grad = sum (|grad pred| - |grad gt|)^2 over the region, / 1000, where the gradients are first
    derivatives of a Gaussian with sigma = 1.4 (``gaussgradient``).
  - Conn = sum |phi(pred) - phi(gt)| over the region, / 1000, with thresholds 0, 0.1, ..., 1
    (reference ``compute_connectivity_error`` with ``step=0.1``). The reference's largest
    component can be the background; ``reference_compat=True`` of :func:`connectivity_error`
    reproduces that, the default follows the definition (see :func:`largest_component`).

``compute_all`` evaluates the whole image by default (the ICM-57 setting: the released data set
has no trimaps, see :mod:`iconmatting_core.eval`), or the trimap's unknown region with
``region="unknown"``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

__all__ = [
    "GRAD_SIGMA",
    "CONN_STEP",
    "as_alpha",
    "unknown_region",
    "sad",
    "mse",
    "gradient_error",
    "connectivity_error",
    "compute_all",
    "gaussian_gradient",
    "largest_component",
]

GRAD_SIGMA = 1.4
CONN_STEP = 0.1
_PHI_MARGIN = 0.15  # connectivity: how far alpha may exceed its connected level and still count as connected


# --------------------------------------------------------------------------- input handling


def as_alpha(a, what: str = "alpha") -> np.ndarray:
    """Any supported matte -> float64 ``[H, W]`` in ``[0, 1]`` (see the module docstring)."""
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu()
        if str(a.dtype) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        a = a.numpy()
    arr = np.asarray(a)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape HxW (or HxWx1), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint16:
            return arr.astype(np.float64) / 65535.0
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(
                f"{what} is an integer array with values outside 0..255 "
                f"(min {arr.min()}, max {arr.max()}); give uint8 (0..255) or float in [0, 1]"
            )
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} has unsupported dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"{what} has values in [{lo:g}, {hi:g}] but float mattes must lie in [0, 1]; "
            "divide a 0..255 matte by 255 (or pass it as uint8)"
        )
    return np.clip(out, 0.0, 1.0)


def _pair(pred, gt):
    p = as_alpha(pred, "pred")
    g = as_alpha(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(
            f"pred has shape {p.shape} but gt has shape {g.shape}; metrics are computed at the "
            "ground truth's resolution, so resize the prediction to the ground truth's size first"
        )
    return p, g


def _region(mask, shape) -> Optional[np.ndarray]:
    if mask is None:
        return None
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ValueError(f"mask has shape {m.shape} but the mattes have shape {tuple(shape)}")
    if m.dtype != np.bool_:
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
            raise ValueError("mask contains NaN or infinite values")
        m = m != 0
    return m


def unknown_region(trimap) -> np.ndarray:
    """Trimap -> boolean ``[H, W]`` map of its unknown (gray) band.

    Integer trimaps are 0..255: unknown is ``85 <= t < 170``, which is how the reference's
    ``ToTensor`` quantises trimaps before its evaluation selects ``trimap == 128`` (so exact-128
    trimaps, the usual convention, give the same region). Float trimaps with values in ``[0, 1]``
    are scaled by 255 first; other float trimaps are read as 0..255.
    """
    if hasattr(trimap, "detach"):
        trimap = trimap.detach().cpu().numpy()
    t = np.asarray(trimap)
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"trimap must have shape HxW, got {t.shape}")
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise ValueError("trimap contains NaN or infinite values")
    if not np.issubdtype(np.asarray(trimap).dtype, np.integer) and t.size and t.max() <= 1.0:
        t = t * 255.0
    return (t >= 85) & (t < 170)


# --------------------------------------------------------------------------- SAD / MSE


def _thousandths(err: np.ndarray, region: Optional[np.ndarray]) -> float:
    """Sum of a per-pixel error map over the region (None = all pixels), in thousandths."""
    total = err.sum() if region is None else err[region].sum()
    return float(total / 1000.0)


def sad(pred, gt, mask=None) -> float:
    """Sum of absolute differences / 1000.

    pred, gt: ``[H, W]`` mattes (float in [0, 1] or uint8 0..255); mask: optional bool ``[H, W]``
    region (None = whole image). Returns ``sum(|pred - gt|[mask]) / 1000`` with alpha in [0, 1].
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    return _thousandths(np.abs(p - g), m)


def mse(pred, gt, mask=None, scale: float = 1e3) -> float:
    """Mean squared error over the region's pixels, times ``scale`` (default 1000).

    pred, gt: ``[H, W]`` mattes; mask: optional bool ``[H, W]`` region (None = whole image).
    Returns ``scale * mean((pred - gt)^2 over the region)`` (alpha in [0, 1]); 0 for an empty
    region. ``scale=1`` gives the plain mean that the reference's ``compute_mse_loss`` returns.
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    err = (p - g) ** 2
    if m is not None:
        err = err[m]
    if err.size == 0:
        return 0.0
    return float(err.mean() * scale)


# --------------------------------------------------------------------------- Grad


def _derivative_of_gaussian_taps(sigma: float):
    """The Grad filter as its two 1-D factors: (Gaussian density G, its derivative G').

    The 2-D filter is ``G(y) * G'(x)`` over offsets ``-r..r``, where ``r`` is where the density
    has fallen to 0.01 (rounded up): ``G(r) = 0.01`` gives ``r = sigma * sqrt(2 ln(G(0) / 0.01))``,
    4 for sigma 1.4. The filter is scaled to unit L2 norm; being an outer product, its norm is
    ``|G| * |G'|``, so G' alone carries the scaling.
    """
    area = sigma * np.sqrt(2.0 * np.pi)  # G(u) = exp(-u^2 / (2 sigma^2)) / area
    reach = int(np.ceil(sigma * np.sqrt(2.0 * np.log(1.0 / (0.01 * area)))))
    variance = sigma ** 2
    offsets = np.arange(-reach, reach + 1, dtype=np.float64)
    density = np.exp(-(offsets * offsets) / (2.0 * variance)) / area
    slope = -offsets * density / variance  # G'(u) = -u G(u) / sigma^2
    l2 = np.sqrt((density * density).sum() * (slope * slope).sum())
    return density, slope / l2


def _convolve1d_nearest(im: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """True convolution (kernel flipped, as ``scipy.ndimage.convolve``) along ``axis`` with
    edge-replicating ('nearest') borders."""
    half = len(taps) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (half, half)
    padded = np.pad(im, pad, mode="edge")
    n = im.shape[axis]
    out = np.zeros_like(im)
    for k, w in enumerate(taps[::-1]):  # out[x] = sum_k taps[k] * im[x + half - k]
        if w == 0.0:
            continue
        sl = [slice(None), slice(None)]
        sl[axis] = slice(k, k + n)
        out += w * padded[tuple(sl)]
    return out


def gaussian_gradient(im, sigma: float = GRAD_SIGMA):
    """``[H, W]`` float image -> (gx, gy), its Gaussian-derivative gradients.

    Same filter as the DIM/reference ``gaussgradient``: 2-D kernel ``g(y) * dg(x)`` (size
    ``2 * ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma 0.01))) + 1``, 9x9 for sigma 1.4), unit L2 norm,
    convolution with replicated borders; gy uses the transposed kernel.
    """
    im = np.asarray(im, dtype=np.float64)
    density, slope = _derivative_of_gaussian_taps(sigma)
    gx = _convolve1d_nearest(_convolve1d_nearest(im, density, 0), slope, 1)
    gy = _convolve1d_nearest(_convolve1d_nearest(im, slope, 0), density, 1)
    return gx, gy


def _gradient_magnitude(a: np.ndarray, sigma: float) -> np.ndarray:
    gx, gy = gaussian_gradient(a, sigma)
    return np.sqrt(gx * gx + gy * gy)


def gradient_error(pred, gt, mask=None, sigma: float = GRAD_SIGMA) -> float:
    """Gradient error / 1000.

    pred, gt: ``[H, W]`` mattes; mask: optional bool ``[H, W]`` region (None = whole image).
    Definition: ``sum over the region of (|grad pred| - |grad gt|)^2``, / 1000, where ``grad`` is
    :func:`gaussian_gradient` (first derivatives of a Gaussian, sigma 1.4) of the mattes in [0, 1].
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    gap = _gradient_magnitude(p, sigma) - _gradient_magnitude(g, sigma)
    return _thousandths(gap * gap, m)


# --------------------------------------------------------------------------- Conn


def _runs(seg: np.ndarray):
    """Horizontal runs of True pixels: (row, start, end_exclusive), in raster order."""
    h, w = seg.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = seg
    d = np.diff(padded, axis=1)
    rs, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rs, starts, ends


def _run_labels(rows, starts, ends, width):
    """Connected components (4-connectivity) of runs -> root index per run (the smallest run
    index of its component, so roots follow raster order of the components' first pixels)."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    stride = width + 1
    start_key = rows * stride + starts
    end_key = rows * stride + ends
    # runs of row r+1 overlapping runs of row r: [lo, hi) in the global raster-ordered list
    prev_base = (rows - 1) * stride
    lo = np.searchsorted(end_key, prev_base + starts, side="right")
    hi = np.searchsorted(start_key, prev_base + ends, side="left")
    counts = np.maximum(hi - lo, 0)
    counts[rows == 0] = 0
    total = int(counts.sum())
    parent = np.arange(n, dtype=np.int64)
    if total == 0:
        return parent
    b = np.repeat(np.arange(n, dtype=np.int64), counts)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(lo, counts).astype(np.int64) + offsets
    # union-find by hooking roots onto the smaller root, then pointer jumping
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            break
        small = np.minimum(ra[diff], rb[diff])
        big = np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, big, small)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def largest_component(seg, include_background: bool = False) -> np.ndarray:
    """Boolean ``[H, W]`` -> the largest 4-connected component of its True pixels (bool map).

    Ties go to the component whose first pixel comes first in raster order. An all-False input
    gives an all-False map. ``include_background=True`` reproduces the reference Python
    ``getLargestCC`` (``argmax(bincount(label(seg)))``), which also counts the background label 0:
    when there are at least as many False pixels as pixels in the largest component, it returns
    the background (``~seg``) instead.
    """
    seg = np.asarray(seg, dtype=bool)
    h, w = seg.shape
    rows, starts, ends = _runs(seg)
    out = np.zeros((h, w), dtype=bool)
    if len(rows) == 0:
        return ~seg if include_background else out
    roots = _run_labels(rows, starts, ends, w)
    sizes = np.bincount(roots, weights=(ends - starts).astype(np.float64), minlength=len(rows))
    best = int(np.argmax(sizes))
    if include_background and seg.size - int(seg.sum()) >= sizes[best]:
        return ~seg
    sel = roots == best
    edges = np.zeros((h, w + 1), dtype=np.int32)
    edges[rows[sel], starts[sel]] = 1
    edges[rows[sel], ends[sel]] = -1
    out[:] = np.cumsum(edges, axis=1)[:, :w] > 0
    return out


def _connected_levels(p: np.ndarray, g: np.ndarray, step: float, reference_compat: bool) -> np.ndarray:
    """Per pixel, the highest threshold up to which it stays connected (``l`` of Rhemann et al.).

    Thresholds ``t_k = k * step`` (k = 0..n, ``n = round(1 / step)``); ``Omega_k`` is the largest
    4-connected component of ``(p >= t_k) & (g >= t_k)``. A pixel lying in ``Omega_1..Omega_j`` but
    not in ``Omega_{j+1}`` gets ``t_j``; one lying in all of them gets 1. So ``l`` is indexed by
    the length ``j`` of the run of components, from the first, that hold the pixel.
    """
    n = int(round(1.0 / step))
    # for a step that divides 1, the same floats as the reference's np.arange(0, 1 + step, step)
    thresholds = np.arange(n + 1) * step
    held = np.ones(p.shape, dtype=bool)  # in every component so far
    run = np.zeros(p.shape, dtype=np.int64)
    for t in thresholds[1:]:
        held &= largest_component((p >= t) & (g >= t), include_background=reference_compat)
        if not held.any():
            break
        run += held
    return np.append(thresholds[:n], 1.0)[run]


def _phi(alpha: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Rhemann et al.'s degree of connectivity: with ``d = alpha - level``, ``1 - d`` where
    ``d >= 0.15`` and 1 elsewhere (alpha within 0.15 above the connected level counts as
    fully connected)."""
    d = alpha - level
    return np.where(d >= _PHI_MARGIN, 1.0 - d, 1.0)


def connectivity_error(
    pred, gt, mask=None, step: float = CONN_STEP, reference_compat: bool = False
) -> float:
    """Connectivity error / 1000.

    pred, gt: ``[H, W]`` mattes; mask: optional bool ``[H, W]`` region (None = whole image).
    Definition (Rhemann et al. 2009): thresholds in steps of ``step`` (0.1); at each threshold
    ``t``, the largest 4-connected component of the pixels where both pred and gt are ``>= t``;
    ``l_i`` = the last threshold at which pixel ``i`` still belonged to that component, before
    the first one where it was lost (1 if never lost; :func:`_connected_levels`);
    ``d_i = alpha_i - l_i``, ``phi_i = 1 - d_i * [d_i >= 0.15]``; the error is
    ``sum |phi(pred) - phi(gt)|`` over the region, / 1000. ``reference_compat=True`` takes the
    largest component as the reference Python version does, which may be the background (see
    :func:`largest_component`).
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    level = _connected_levels(p, g, step, reference_compat)
    return _thousandths(np.abs(_phi(p, level) - _phi(g, level)), m)


# --------------------------------------------------------------------------- all four


def compute_all(pred, gt, trimap=None, region: str = "all", mse_scale: float = 1e3) -> Dict[str, float]:
    """All four metrics -> ``{"sad", "mse", "grad", "conn"}`` (scales as in the module docstring).

    region: ``"all"`` (default) sums over the whole image; ``"unknown"`` over the trimap's unknown
    band (:func:`unknown_region`; requires ``trimap``, ``[H, W]`` uint8 0..255 or float [0, 1]).
    mse_scale: factor on the MSE (1 gives the plain mean, the unit of the paper's tables).
    """
    if region not in ("all", "unknown"):
        raise ValueError(f"region must be 'all' or 'unknown', got {region!r}")
    p, g = _pair(pred, gt)
    mask = None
    if region == "unknown":
        if trimap is None:
            raise ValueError("region='unknown' needs a trimap")
        mask = unknown_region(trimap)
        if mask.shape != p.shape:
            raise ValueError(f"trimap has shape {mask.shape} but the mattes have shape {p.shape}")
    return {
        "sad": sad(p, g, mask),
        "mse": mse(p, g, mask, scale=mse_scale),
        "grad": gradient_error(p, g, mask),
        "conn": connectivity_error(p, g, mask),
    }
