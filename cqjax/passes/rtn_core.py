"""Round-to-nearest (RTN) baseline: asymmetric uniform quantization along K in blocks.

Each row of ``w [rows, K]`` is cut into blocks of ``block`` values along K; the last block is
simply shorter when ``block`` does not divide K (the stored layout: :mod:`cqjax.formats.rtn`). Per
(row, block), with ``lo = min``, ``hi = max`` of the block and ``L = 2**bits - 1``:

==========  ========================================================================
stored      value
==========  ========================================================================
scale       ``float16((hi − lo) / L)``; ``1`` when ``hi == lo`` (a constant block)
zero        ``float16(lo)`` (the block minimum, not an integer zero-point)
code        ``clip(round((w − zero) / scale), 0, L)`` as uint8, using the float16 values
==========  ========================================================================

Dequantization: ``ŵ = code · scale + zero`` in float32. Codes are computed against the
stored float16 scale and zero, so quantize and dequantize agree exactly; the error per
value is at most ``scale / 2`` plus float16 rounding of ``zero`` and ``scale``.
"""

from __future__ import annotations

import numpy as np

_F16_MAX = float(np.finfo(np.float16).max)


def _check(w: np.ndarray, bits: int, who: str) -> np.ndarray:
    if not 1 <= bits <= 8:
        raise ValueError(f"{who}: bits must be in 1..8, got {bits}")
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"{who}: expected w [rows, K], got shape {w.shape}")
    return w


def _padded(w: np.ndarray, block: int) -> np.ndarray:
    """``[rows, nblocks, block]`` view data; the tail is padded by repeating its last value."""
    rows, K = w.shape
    nb = -(-K // block)
    if nb * block != K:
        w = np.pad(w, [(0, 0), (0, nb * block - K)], mode="edge")
    return w.reshape(rows, nb, block)


def scale_zero(lo: np.ndarray, hi: np.ndarray, bits: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float16 ``(scale, zero)`` of blocks with minima ``lo`` and maxima ``hi``: ``zero = lo``,
    ``scale = (hi − lo) / (2^bits − 1)`` (1 for a constant block).

    Raises:
      ValueError: naming ``what`` when a minimum, maximum or scale overflows float16.
    """
    levels = (1 << bits) - 1
    if max(np.abs(lo).max(), np.abs(hi).max(), ((hi - lo) / levels).max()) > _F16_MAX:
        raise ValueError(f"{what}: a block min/max/scale overflows float16 (max {_F16_MAX})")
    scale = ((hi - lo) / levels).astype(np.float16)
    return np.where(scale > 0, scale, np.float16(1)), lo.astype(np.float16)


def rtn_quantize(w: np.ndarray, bits: int, block: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize rows of ``w [rows, K]`` with per-(row, block) float16 scale and zero.

    Args:
      w: float weights ``[rows, K]``.
      bits: 1..8.
      block: block length along K (the last block may be shorter).

    Returns:
      ``(codes uint8 [rows, K], scales float16 [rows, nblocks], zeros float16 [rows, nblocks])``.

    Raises:
      ValueError: on bad shapes/bits or non-finite weights, or if a scale or zero overflows float16.
    """
    w = _check(w, bits, "rtn_quantize").astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("rtn_quantize: w has non-finite values")
    levels = (1 << bits) - 1
    rows, K = w.shape
    wb = _padded(w, block)  # edge padding does not change min/max
    scale, zero = scale_zero(wb.min(axis=2), wb.max(axis=2), bits, "rtn_quantize")
    q = np.rint((wb - zero[..., None].astype(np.float32)) / scale[..., None].astype(np.float32))
    codes = np.clip(q, 0, levels).astype(np.uint8).reshape(rows, -1)[:, :K]
    return np.ascontiguousarray(codes), scale, zero


def rtn_dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int = 128) -> np.ndarray:
    """Inverse of :func:`rtn_quantize`: ``float32 [rows, K]`` from codes, scales and zeros."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"rtn_dequantize: codes must be [rows, K], got shape {codes.shape}")
    rows, K = codes.shape
    nb = -(-K // block)
    scales, zeros = np.asarray(scales), np.asarray(zeros)
    if scales.shape != (rows, nb) or zeros.shape != (rows, nb):
        raise ValueError(
            f"rtn_dequantize: scales/zeros must be [{rows}, {nb}] for K={K}, block={block}, "
            f"got {scales.shape} and {zeros.shape}"
        )
    cb = _padded(codes, block).astype(np.float32)
    out = cb * scales[..., None].astype(np.float32) + zeros[..., None].astype(np.float32)
    return out.reshape(rows, -1)[:, :K]
