"""Scalar codebooks for unit-norm blocks: Lloyd–Max levels, quantize and dequantize rows.

The CQ recipe quantizes each (row, block) of a rotated weight as ``norm · codebook[codes]``:

=====================  ==============================================================
step                   what
=====================  ==============================================================
norm                   ``n = ‖w_block‖₂`` (float64), stored as float16 (times a gain)
unit vector            ``u = w_block / n`` (``u = 0`` for an all-zero block)
code                   index of the nearest level of the block size's codebook
                       (boundaries are level midpoints; a tie goes to the lower level)
gain ``"none"``        stored norm ``n``
gain ``"ls"``          stored norm ``n · ⟨u, ĉ⟩ / ‖ĉ‖²`` (least-squares; ĉ = chosen levels)
gain ``"norm"``        stored norm ``n · ‖u‖ / ‖ĉ‖`` (the reconstruction keeps the norm)
dequantize             ``ŵ_block = float32(stored norm) · codebook[codes]``
=====================  ==============================================================

After a random rotation each block's unit vector is close to uniform on the sphere, so one
coordinate has density ``∝ (1 − t²)^((d−3)/2)`` on ``[−1, 1]`` (``d`` = block size);
:func:`analytic_codebook` gives its Lloyd–Max levels, and :func:`fit_codebook` fits levels
to data instead. Codebooks are float32, sorted ascending, ``2**bits`` levels, one per
distinct block size.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from cqjax import _xla_ext

from cqjax.formats.cq import block_offsets

Gain = Literal["none", "ls", "norm"]
GAINS: tuple[str, ...] = ("none", "ls", "norm")
_GRID = 1 << 16
_F16_MAX = float(np.finfo(np.float16).max)


@functools.lru_cache(maxsize=64)
def _analytic_levels(d: int, bits: int) -> np.ndarray:
    k = 1 << bits
    L = min(1.0, 12.0 / np.sqrt(d))  # beyond 12 sigma the density is < e^-70
    edges = np.linspace(-L, L, _GRID + 1)
    t = 0.5 * (edges[:-1] + edges[1:])
    logp = 0.5 * (d - 3) * np.log1p(-t * t)
    p = np.exp(logp - logp.max())
    # Cumulative mass and first moment at the grid edges (piecewise linear in between).
    M = np.concatenate([[0.0], np.cumsum(p)])
    F = np.concatenate([[0.0], np.cumsum(p * t)])
    M, F = M / M[-1], F / M[-1]
    c = np.interp((np.arange(k) + 0.5) / k, M, edges)  # quantile init
    for _ in range(20000):
        b = np.concatenate([[-L], 0.5 * (c[:-1] + c[1:]), [L]])
        Mb, Fb = np.interp(b, edges, M), np.interp(b, edges, F)
        new = np.diff(Fb) / np.diff(Mb)
        new = 0.5 * (new - new[::-1])  # the density is symmetric
        done = np.max(np.abs(new - c)) < 1e-13 * L
        c = new
        if done:
            break
    c = c.astype(np.float32)
    c.setflags(write=False)
    return c


def analytic_codebook(d: int, bits: int) -> np.ndarray:
    """Lloyd–Max levels for one coordinate of a uniformly random unit vector in R^d.

    Lloyd iterations on a fine grid (65,536 cells) of the density ``∝ (1 − t²)^((d−3)/2)``;
    deterministic and cached by ``(d, bits)``.

    Args:
      d: the block size (vector dimension), ``d >= 2``.
      bits: 1..8; the codebook has ``2**bits`` levels.

    Returns:
      float32 ``[2**bits]``, sorted ascending and symmetric about 0 (a fresh copy).

    >>> [round(float(x), 4) for x in analytic_codebook(128, 1)]  # ±sqrt(2/pi)/sqrt(d) roughly
    [-0.0707, 0.0707]
    """
    if d < 2 or not 1 <= bits <= 8:
        raise ValueError(f"analytic_codebook: need d >= 2 and 1 <= bits <= 8, got d={d}, bits={bits}")
    return _analytic_levels(int(d), int(bits)).copy()


def fit_codebook(
    values: np.ndarray, bits: int, iters: int = 100, init: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Lloyd–Max (1-D k-means) levels fitted to data; deterministic.

    Args:
      values: any array of finite samples (e.g. the unit-vector coordinates of one block size).
      bits: 1..8; ``2**bits`` levels.
      iters: maximum Lloyd iterations (stops early when the levels no longer move).
      init: initial levels ``[2**bits]``; default: the data quantiles at ``(i + 0.5) / k``
        (evenly spaced between min and max if those collide).
      weights: optional non-negative weight per value (same size): the levels then minimize
        ``Σ weight · (value − level)²`` (each level is its cell's weighted mean; the default
        init uses weighted quantiles).

    Returns:
      float32 ``[2**bits]`` sorted ascending. A level whose cell is empty (or weightless) keeps
      its value.
    """
    k = 1 << bits
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"fit_codebook: values must be non-empty and finite (size {v.size})")
    if weights is None:
        v = np.sort(v)
        wt = None
    else:
        wt = np.asarray(weights, dtype=np.float64).ravel()
        if wt.shape != v.shape or not np.all(np.isfinite(wt)) or np.any(wt < 0) or not wt.sum() > 0:
            raise ValueError(f"fit_codebook: weights must be finite, non-negative, not all zero and "
                             f"one per value ({v.size}), got shape {wt.shape}")
        order = np.argsort(v, kind="stable")
        v, wt = v[order], wt[order]
    if init is not None:
        c = np.sort(np.asarray(init, dtype=np.float64).ravel())
        if c.shape != (k,):
            raise ValueError(f"fit_codebook: init must have {k} levels for bits={bits}, got {c.shape}")
    else:
        if wt is None:
            c = np.quantile(v, (np.arange(k) + 0.5) / k)
        else:
            cw = np.cumsum(wt)
            c = v[np.minimum(np.searchsorted(cw, (np.arange(k) + 0.5) / k * cw[-1]), v.size - 1)]
        if np.any(np.diff(c) <= 0):
            c = np.linspace(v[0], v[-1], k)
    w1 = np.ones_like(v) if wt is None else wt
    W = np.concatenate([[0.0], np.cumsum(w1)])
    S = np.concatenate([[0.0], np.cumsum(w1 * v)])
    for _ in range(iters):
        idx = np.concatenate([[0], np.searchsorted(v, 0.5 * (c[:-1] + c[1:])), [v.size]])
        cnt = W[idx[1:]] - W[idx[:-1]]
        sums = S[idx[1:]] - S[idx[:-1]]
        new = np.where(cnt > 0, sums / np.where(cnt > 0, cnt, 1.0), c)
        done = np.array_equal(new, c)
        c = np.sort(new)
        if done:
            break
    return c.astype(np.float32)


def _per_block(codebooks, blocks: Sequence[int]) -> list[np.ndarray]:
    if isinstance(codebooks, Mapping):
        missing = sorted({b for b in blocks if b not in codebooks})
        if missing:
            raise ValueError(f"codebooks: no codebook for block sizes {missing} (have {sorted(codebooks)})")
        cbs = [codebooks[b] for b in blocks]
    else:
        cbs = list(codebooks)
        if len(cbs) != len(blocks):
            raise ValueError(f"codebooks: got {len(cbs)} codebooks for {len(blocks)} blocks")
    out = [np.asarray(cb, dtype=np.float32) for cb in cbs]
    for cb in out:
        if cb.ndim != 1 or cb.size < 2 or cb.size > 256 or np.any(np.diff(cb) < 0):
            raise ValueError(f"codebooks: each must be a sorted 1-D array of 2..256 levels, got {cb}")
    return out


def unit_blocks(w_rot: np.ndarray, blocks: Sequence[int]) -> dict[int, np.ndarray]:
    """The unit vectors of every nonzero (row, block), grouped by block size: ``{d: [n, d]}``."""
    return {d: u for d, (u, _) in _unit_blocks(w_rot, blocks, "unit_blocks").items()}


def _unit_blocks(w_rot, blocks, who: str, column_weights=None
                 ) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """``{d: (unit vectors [n, d], weights n² · column weight [n, d], or None without
    column weights)}`` of the nonzero (row, block)s, grouped by block size."""
    w_rot = _check_rows(w_rot, blocks, who)
    h = None
    if column_weights is not None:
        h = np.asarray(column_weights, dtype=np.float64).ravel()
        if h.shape != (w_rot.shape[1],) or not np.all(np.isfinite(h)) or np.any(h < 0):
            raise ValueError(f"{who}: column_weights must be {w_rot.shape[1]} finite non-negative "
                             f"values, got shape {h.shape}")
    units: dict[int, list] = {}
    wts: dict[int, list] = {}
    offs = block_offsets(blocks)
    for lo, hi, d in zip(offs[:-1], offs[1:], blocks):
        seg = w_rot[:, lo:hi].astype(np.float32)
        n = np.sqrt(np.sum(np.square(seg, dtype=np.float64), axis=1))
        keep = n > 0
        units.setdefault(d, []).append(seg[keep] / n[keep, None].astype(np.float32))
        if h is not None:
            wts.setdefault(d, []).append(np.square(n[keep])[:, None] * h[None, lo:hi])
    return {d: (np.concatenate(parts), np.concatenate(wts[d]) if h is not None else None)
            for d, parts in units.items()}


def fit_codebooks(w_rot: np.ndarray, blocks: Sequence[int], bits: int, iters: int = 100,
                  column_weights: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """One data-fitted codebook per block size, on that size's unit-vector coordinates.

    Starts from :func:`analytic_codebook` (falls back to it for a size with no nonzero block).

    Args:
      column_weights: optional ``[Kpad]`` non-negative weight per rotated input column (e.g. the
        diagonal of the rotated calibration Hessian). Given, each unit coordinate ``u[r, k]`` of
        a block with norm ``n`` weighs ``n² · column_weights[k]``: the levels then minimize the
        (diagonal-)Hessian-weighted squared error of the reconstruction ``n · level`` rather
        than of the unit vectors.
    """
    out = {}
    for d, (u, wt) in _unit_blocks(w_rot, blocks, "fit_codebooks", column_weights).items():
        init = analytic_codebook(d, bits)
        ok = u.size and (wt is None or wt.sum() > 0)
        out[d] = fit_codebook(u, bits, iters, init=init, weights=wt) if ok else init
    return out


def _check_rows(w: np.ndarray, blocks: Sequence[int], who: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != sum(blocks):
        raise ValueError(f"{who}: expected [rows, sum(blocks)={sum(blocks)}], got shape {w.shape}")
    return w


def quantize_rows(
    w_rot: np.ndarray,
    blocks: Sequence[int],
    codebooks: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    gain: Gain = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize each (row, block) as a float16 norm times codebook levels (module table).

    A code is the number of level midpoints strictly below the unit value (so a tie goes to
    the lower level). float32 rows with ``gain="none"`` and equal-length codebooks (every
    weight quantizer's case) go through C++ loops (``xla_ext/include/cqjax/quantize.h``, the GIL
    released); the rest through the NumPy reference, which works on chunks of rows (sized to
    stay in cache) and, within a chunk, on each run of consecutive blocks sharing a size and
    codebook. Both give the same bits (tests/test_codebook_core.py).

    Args:
      w_rot: float ``[rows, Kpad]`` (rotated and zero-padded), ``Kpad = sum(blocks)``.
      blocks: the block plan.
      codebooks: ``{block size: levels}`` or one codebook per block (sorted float levels).
      gain: ``"none"``, ``"ls"`` or ``"norm"``.

    Returns:
      ``(codes uint8 [rows, Kpad], norms float16 [rows, nblocks])``.

    Raises:
      ValueError: on bad shapes, an unknown gain, non-finite input, or a norm that overflows
        float16.
    """
    if gain not in GAINS:
        raise ValueError(f"quantize_rows: gain must be one of {GAINS}, got {gain!r}")
    w_rot = _check_rows(w_rot, blocks, "quantize_rows")
    # float32 input: a non-finite value shows up as a non-finite block norm (the float64 sum of
    # squares of finite float32 values cannot overflow), so no separate pass over the input.
    fold_check = w_rot.dtype == np.float32
    if not fold_check and not np.all(np.isfinite(w_rot)):
        raise ValueError("quantize_rows: w_rot has non-finite values")
    try:
        cbs = _per_block(codebooks, blocks)
    except ValueError:
        if fold_check and not np.all(np.isfinite(w_rot)):
            raise ValueError("quantize_rows: w_rot has non-finite values") from None
        raise
    if gain == "none" and fold_check and len({cb.size for cb in cbs}) == 1:
        # The C++ loops (xla_ext/include/cqjax/quantize.h): the same arithmetic, bit for bit.
        mids = np.stack([0.5 * (cb[:-1] + cb[1:]) for cb in cbs])
        codes, norms, finite = _xla_ext.quantize_rows(np.ascontiguousarray(w_rot), list(blocks), mids)
        if not finite:
            raise ValueError("quantize_rows: w_rot has non-finite values")
    else:
        codes, norms = _quantize_reference(w_rot, blocks, cbs, gain, fold_check)
    big = np.abs(norms).max(initial=0.0)
    if big > _F16_MAX:
        raise ValueError(f"quantize_rows: a block norm {big:.4g} overflows float16 (max {_F16_MAX})")
    return codes, norms.astype(np.float16)


def _quantize_reference(w_rot, blocks, cbs, gain, fold_check) -> tuple[np.ndarray, np.ndarray]:
    """NumPy :func:`quantize_rows`: codes and float64 norms (every gain)."""
    rows, Kpad = w_rot.shape
    codes = np.empty((rows, Kpad), dtype=np.uint8)
    norms = np.empty((rows, len(blocks)), dtype=np.float64)
    groups = _block_groups(blocks, cbs)
    step = max(1, _CHUNK_ELEMS // max(Kpad, 1))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        for j, cnt, lo, b, mid, cb in groups:
            ok = _quantize_group(w_rot[r0:r1, lo : lo + cnt * b], cnt, b, mid, cb, gain,
                                 codes[r0:r1, lo : lo + cnt * b], norms[r0:r1, j : j + cnt])
            if fold_check and not ok:
                raise ValueError("quantize_rows: w_rot has non-finite values")
    return codes, norms


_CHUNK_ELEMS = 1 << 18  # weights per row chunk (fastest measured: temporaries stay in cache)


def _block_groups(blocks: Sequence[int], cbs: Sequence[np.ndarray]) -> list[tuple]:
    """Runs of consecutive blocks with the same size and codebook:
    ``[(first block index, count, start column, size, midpoints, levels)]``."""
    groups: list[list] = []
    lo = 0
    for j, (b, cb) in enumerate(zip(blocks, cbs)):
        g = groups[-1] if groups else None
        if g is not None and g[3] == b and np.array_equal(g[5], cb):
            g[1] += 1
        else:
            groups.append([j, 1, lo, b, 0.5 * (cb[:-1] + cb[1:]), cb])
        lo += b
    return [tuple(g) for g in groups]


def _quantize_group(seg, cnt, b, mid, cb, gain, codes_out, norms_out) -> bool:
    """Quantize ``seg [r, cnt*b]`` (``cnt`` blocks of size ``b`` sharing ``cb``) into the views
    ``codes_out [r, cnt*b]`` and ``norms_out [r, cnt]``; returns whether every norm is finite.

    Bit-identical to the per-block definition: float64 sums of squares reduced over each
    block's contiguous axis, ``u`` divided in float32, codes compared in float32."""
    r = seg.shape[0]
    x = seg.reshape(r, cnt, b)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    n = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=2))
    finite = bool(np.isfinite(n).all())
    u = x / np.where(n > 0, n, 1.0)[:, :, None].astype(np.float32)
    q = np.greater(u, mid[0]).view(np.uint8)  # count the midpoints below u (contiguous)
    above = np.empty(u.shape, np.bool_)
    for t in mid[1:]:
        np.greater(u, t, out=above)
        np.add(q, above.view(np.uint8), out=q)
    codes_out.reshape(r, cnt, b)[...] = q
    if gain != "none":
        c = cb[q].astype(np.float64)
        cc = np.sum(c * c, axis=2)
        if gain == "ls":
            num = np.sum(u.astype(np.float64) * c, axis=2)
        else:
            num = np.sqrt(np.sum(np.square(u, dtype=np.float64), axis=2))
            cc = np.sqrt(cc)
        n = n * np.where(cc > 0, num / np.where(cc > 0, cc, 1.0), 1.0)
    norms_out[...] = n
    return finite


def dequantize_rows(
    codes: np.ndarray,
    norms: np.ndarray,
    blocks: Sequence[int],
    codebooks: Mapping[int, np.ndarray] | Sequence[np.ndarray],
) -> np.ndarray:
    """Reconstruct ``float32 [rows, Kpad]`` (still rotated) from codes and float16 norms."""
    codes = _check_rows(codes, blocks, "dequantize_rows")
    norms = np.asarray(norms)
    if norms.shape != (codes.shape[0], len(blocks)):
        raise ValueError(f"dequantize_rows: norms must be [{codes.shape[0]}, {len(blocks)}], got {norms.shape}")
    cbs = _per_block(codebooks, blocks)
    out = np.empty(codes.shape, dtype=np.float32)
    offs = block_offsets(blocks)
    for j, (lo, hi, cb) in enumerate(zip(offs[:-1], offs[1:], cbs)):
        out[:, lo:hi] = cb[codes[:, lo:hi]] * norms[:, j : j + 1].astype(np.float32)
    return out


def relative_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    """``‖w − ŵ‖² / ‖w‖²`` in float64 (0 when both are zero)."""
    w, w_hat = np.asarray(w, np.float64), np.asarray(w_hat, np.float64)
    den = float(np.sum(w * w))
    num = float(np.sum((w - w_hat) ** 2))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
