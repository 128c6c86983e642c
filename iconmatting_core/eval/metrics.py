"""Alpha-matte error metrics: SAD, MSE, Grad and Conn (pure numpy, float64, no scipy).

The definitions follow the Deep Image Matting MATLAB evaluation code (``DIM_evaluation_code``) and
its Python port that the IconMatting reference repository ships as
``icm/criterion/matting_criterion_eval.py`` (``compute_sad_loss``, ``compute_mse_loss``,
``compute_gradient_loss``, ``compute_connectivity_error``).

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

  - SAD  = sum |pred - gt| over the region, / 1000                       (``compute_sad_loss``)
  - MSE  = mean (pred - gt)^2 over the region's pixels, x 1000 by default (``compute_mse_loss``
    returns the plain mean; the ``scale`` argument of :func:`mse` gives it with ``scale=1``).
    An empty region gives 0 (the reference divides by ``count + 1e-8``).
  - Grad = sum (|grad pred| - |grad gt|)^2 over the region, / 1000, where the gradients are first
    derivatives of a Gaussian with sigma = 1.4 (``gaussgradient``).
  - Conn = sum |phi(pred) - phi(gt)| over the region, / 1000, with thresholds 0, 0.1, ..., 1
    (``compute_connectivity_error`` with ``step=0.1``).

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


def sad(pred, gt, mask=None) -> float:
    """Sum of absolute differences / 1000.

    pred, gt: ``[H, W]`` mattes (float in [0, 1] or uint8 0..255); mask: optional bool ``[H, W]``
    region (None = whole image). Returns ``sum(|pred - gt|[mask]) / 1000`` with alpha in [0, 1].
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    err = np.abs(p - g)
    return float((err.sum() if m is None else err[m].sum()) / 1000.0)


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


def _gauss(x, sigma):
    return np.exp(-(x ** 2) / (2.0 * sigma ** 2)) / (sigma * np.sqrt(2.0 * np.pi))


def _gauss_kernels(sigma: float):
    """1-D Gaussian and derivative-of-Gaussian taps of the DIM ``gaussgradient`` filter.

    The 2-D filter is ``hx[i, j] = g(i - h) * dg(j - h)`` normalised to unit L2 norm; it is
    separable, so the two 1-D factors carry the normalisation ``1 / (|g| * |dg|)``.
    """
    eps = 1e-2
    half = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(np.sqrt(2.0 * np.pi) * sigma * eps))))
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = _gauss(u, sigma)
    dg = -u * g / sigma ** 2
    norm = np.sqrt((g ** 2).sum() * (dg ** 2).sum())
    return g, dg / norm


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
    g, dg = _gauss_kernels(sigma)
    gx = _convolve1d_nearest(_convolve1d_nearest(im, g, 0), dg, 1)
    gy = _convolve1d_nearest(_convolve1d_nearest(im, dg, 0), g, 1)
    return gx, gy


def gradient_error(pred, gt, mask=None, sigma: float = GRAD_SIGMA) -> float:
    """Gradient error / 1000.

    pred, gt: ``[H, W]`` mattes; mask: optional bool ``[H, W]`` region (None = whole image).
    Returns ``sum((|grad pred| - |grad gt|)^2 over the region) / 1000`` with Gaussian first
    derivatives (sigma 1.4) of the mattes in [0, 1].
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    px, py = gaussian_gradient(p, sigma)
    gx, gy = gaussian_gradient(g, sigma)
    err = (np.sqrt(px ** 2 + py ** 2) - np.sqrt(gx ** 2 + gy ** 2)) ** 2
    return float((err.sum() if m is None else err[m].sum()) / 1000.0)


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


def _phi(alpha: np.ndarray, l_map: np.ndarray) -> np.ndarray:
    d = alpha - l_map
    return 1.0 - d * (d >= 0.15)


def connectivity_error(
    pred, gt, mask=None, step: float = CONN_STEP, reference_compat: bool = False
) -> float:
    """Connectivity error / 1000.

    pred, gt: ``[H, W]`` mattes; mask: optional bool ``[H, W]`` region (None = whole image).
    For thresholds ``t_i = i * step`` (i = 1..1/step), Omega_i is the largest 4-connected component
    of ``(pred >= t_i) & (gt >= t_i)``; each pixel's level ``l`` is the threshold before the first
    one whose Omega_i excludes it (1 if none does). With ``d = alpha - l``,
    ``phi = 1 - d * [d >= 0.15]`` and the error is ``sum |phi(pred) - phi(gt)|`` over the region
    / 1000. This is the DIM MATLAB definition; ``reference_compat=True`` instead reproduces the
    reference Python port's ``getLargestCC``, which can pick the background as "largest
    component" (see :func:`largest_component`).
    """
    p, g = _pair(pred, gt)
    m = _region(mask, p.shape)
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    n = int(round(1.0 / step))
    thresholds = np.arange(n + 1) * step  # same values as the reference's np.arange(0, 1 + step, step)
    l_map = np.full(p.shape, -1.0)
    for i in range(1, len(thresholds)):
        both = (p >= thresholds[i]) & (g >= thresholds[i])
        omega = largest_component(both, include_background=reference_compat)
        flag = (l_map == -1) & ~omega
        l_map[flag] = thresholds[i - 1]
    l_map[l_map == -1] = 1.0
    err = np.abs(_phi(p, l_map) - _phi(g, l_map))
    return float((err.sum() if m is None else err[m].sum()) / 1000.0)


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
