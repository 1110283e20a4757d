"""GPTQ-style error feedback passes: CQ packing and the RTN grid, from calibration Hessians.

Each pass quantizes a linear kernel with :func:`cqjax.passes.gptq_core.error_feedback`, using
``ctx.calibration[path]["hessian"]`` (``E[x xᵀ]`` of the layer input, float ``[K, K]``, in the
original unrotated basis). A path without that entry (embeddings, the LM head, missing stats)
gets the plain recipe instead, with one log line per pass run naming those paths.

===================  =======================================================================
pass                 rewrite of each eligible tensor
===================  =======================================================================
ErrorFeedbackPack    drop-in for :class:`cqjax.passes.cq.Pack` (after Rotate → FitCodebook):
                     ``basis="rotated"``: coordinate by coordinate in the rotated basis with
                     ``H_rot = R H Rᵀ`` (padding: zero rows/cols, damped); each (row, block)
                     norm is fixed when its block starts, from the updated rotated values;
                     ``basis="unrotated"``: one rotation block at a time in the original
                     basis, quantized jointly by the plain CQ quantizer, block OBS feedback.
                     Output: the same :class:`CQArray` as Pack.
GPTQRoundToNearest   drop-in for :class:`cqjax.passes.rtn.RoundToNearest`: GPTQ on the RTN
                     grid (no rotation), column by column; each block's fp16 scale and zero
                     fixed at its start from the updated weights. Output: :class:`RTNArray`.
===================  =======================================================================

``meta.info`` gets what the plain pass records plus ``error_feedback`` (``"rotated"``,
``"unrotated"``, ``"gptq"``, or ``"none"`` for a fallback), ``percdamp`` and
``ef_rel_error`` (the damped output error ``tr(ΔW H_d ΔWᵀ) / tr(W H_d Wᵀ)``) and ``ef_base``
(the denominator, so that row blocks of one tensor pool to its error).

Hydra: swap one step of a pipeline config, e.g.
``pipeline.pack._target_=cqjax.passes.gptq.ErrorFeedbackPack`` (then
``+pipeline.pack.basis=unrotated``) or ``pipeline.rtn._target_=cqjax.passes.gptq.GPTQRoundToNearest``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cqjax.formats import cq as fmt
from cqjax.formats import rtn
from cqjax.formats.rotation import block_matrices
from cqjax.kernels.qarrays import RTNArray
from cqjax.passes import codebook_core, gptq_core, rtn_core
from cqjax.passes.common import bits_for, calibration_hessian, rows_of
from cqjax.passes.cq import Pack, Rotated, require_rotated
from cqjax.passes.rtn import RoundToNearest
from cqjax.pipeline import Context, Needs, Pass
from cqjax.quant_stats import ELIGIBLE
from cqjax.select import Rules

BASES = ("rotated", "unrotated")
_F16_MAX = float(np.finfo(np.float16).max)


def _apply_blocks(rows: np.ndarray, mats: list[np.ndarray], transpose: bool) -> np.ndarray:
    """``rows [N, Kpad] @ blockdiag(M_j)`` (or ``M_jᵀ``), float64."""
    out = np.empty(rows.shape, np.float64)
    lo = 0
    for m in mats:
        hi = lo + m.shape[0]
        out[:, lo:hi] = rows[:, lo:hi] @ (m.T if transpose else m)
        lo = hi
    return out


def rotate_hessian(H: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """``Mᵀ H_pad M``: the Hessian of the rotated coordinates (``H`` zero-padded to Kpad), one
    new float64 ``[Kpad, Kpad]`` array rotated in place a block of columns, then of rows, at a time."""
    Kpad = sum(m.shape[0] for m in mats)
    Hp = np.zeros((Kpad, Kpad))
    Hp[: H.shape[0], : H.shape[1]] = H
    lo = 0
    for m in mats:  # H_pad M
        hi = lo + m.shape[0]
        Hp[:, lo:hi] = Hp[:, lo:hi] @ m
        lo = hi
    lo = 0
    for m in mats:  # Mᵀ (H_pad M)
        hi = lo + m.shape[0]
        Hp[lo:hi] = m.T @ Hp[lo:hi]
        lo = hi
    return Hp


def _norms_f16(n: np.ndarray, path: str) -> np.ndarray:
    big = float(np.max(n, initial=0.0))
    if not np.isfinite(big) or big > _F16_MAX:
        raise ValueError(f"{path}: a block norm {big:.4g} is non-finite or overflows float16")
    return n.astype(np.float16)


def cq_rotated(r: Rotated, H: np.ndarray, percdamp: float = 0.01, path: str = "w"
               ) -> tuple[np.ndarray, np.ndarray, gptq_core.Result]:
    """CQ codes and fp16 norms with coordinate-wise error feedback in the rotated basis.

    At each block start the (row, block) norm ``n`` is computed from the updated rotated values
    exactly as :func:`codebook_core.quantize_rows` does (float32 values, float64 sum of
    squares); a coordinate's code is the nearest level of ``value / n`` (float32, ties to the
    lower level) and its reconstruction ``float16(n) · level``. Inputs with ``H_kk = 0`` are
    zeroed in the original basis first.

    Returns:
      ``(codes uint8 [N, Kpad], norms float16 [N, nblocks], core result in the rotated basis)``.
    """
    rot, blocks = r.rotation, r.rotation.blocks
    mats = block_matrices(rot)
    rows = r.rows.astype(np.float64)
    dead = np.diag(H) == 0
    if dead.any():
        orig = _apply_blocks(rows, mats, transpose=True)
        orig[:, : r.K][:, dead] = 0.0
        rows = _apply_blocks(orig, mats, transpose=False)
    books = r.stored_levels()
    mids = {d: 0.5 * (c[:-1] + c[1:]) for d, c in books.items()}

    def begin(j, values):
        x = values.astype(np.float32)
        n = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1))
        ns = _norms_f16(n, path)
        return np.where(n > 0, n, 1.0).astype(np.float32), ns, ns.astype(np.float32)

    def quantize(j, state, c0, values):
        n32, _, ns32 = state
        u = values[:, 0].astype(np.float32) / n32
        q = np.searchsorted(mids[blocks[j]], u, side="left").astype(np.uint8)  # midpoints < u
        return books[blocks[j]][q] * ns32, q

    res = gptq_core.error_feedback(rows, rotate_hessian(H, mats), blocks, quantize, begin=begin,
                                   group=1, percdamp=percdamp, overwrite_hessian=True)
    codes = np.stack(res.aux, axis=1)
    norms = np.stack([s[1] for s in res.states], axis=1)
    return codes, norms, res


def cq_unrotated(r: Rotated, H: np.ndarray, percdamp: float = 0.01, path: str = "w"
                 ) -> tuple[np.ndarray, np.ndarray, gptq_core.Result]:
    """CQ codes and fp16 norms with block error feedback in the original basis.

    Group ``j`` is rotation block ``j``'s original columns (the last one without its padding):
    its updated values are rotated, quantized by :func:`codebook_core.quantize_rows`,
    dequantized and rotated back; the difference is the group error fed forward.

    Returns:
      ``(codes uint8 [N, Kpad], norms float16 [N, nblocks], core result in the original basis)``.
    """
    rot, blocks, K = r.rotation, r.rotation.blocks, r.K
    mats = block_matrices(rot)
    w = _apply_blocks(r.rows.astype(np.float64), mats, transpose=True)[:, :K]
    books = r.stored_levels()
    offs = fmt.block_offsets(blocks)
    widths = [min(hi, K) - lo for lo, hi in zip(offs[:-1], offs[1:])]

    def quantize(j, state, c0, values):
        b = blocks[j]
        v = np.zeros((values.shape[0], b))
        v[:, : values.shape[1]] = values
        x = (v @ mats[j]).astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: non-finite values during error feedback")
        codes, norms = codebook_core.quantize_rows(x, (b,), [books[b]])
        deq = codebook_core.dequantize_rows(codes, norms, (b,), [books[b]]).astype(np.float64)
        return (deq @ mats[j].T)[:, : values.shape[1]], (codes, norms)

    res = gptq_core.error_feedback(w, H, widths, quantize, group=None, percdamp=percdamp)
    codes = np.concatenate([a[0] for a in res.aux], axis=1)
    norms = np.concatenate([a[1] for a in res.aux], axis=1)
    return codes, norms, res


def rtn_gptq(rows: np.ndarray, H: np.ndarray, bits: int, block: int = 128, percdamp: float = 0.01,
             path: str = "w") -> tuple[np.ndarray, np.ndarray, np.ndarray, gptq_core.Result]:
    """GPTQ on the RTN grid (:mod:`cqjax.passes.rtn_core`), column by column.

    Each block's scale and zero come from its updated values at the block start, computed as
    :func:`rtn_core.rtn_quantize` does (:func:`rtn_core.scale_zero`: fp16 scale and zero); a column's code
    is ``clip(rint((w − zero) / scale), 0, 2**bits − 1)``.

    Returns:
      ``(codes uint8 [N, K], scales float16 [N, nblocks], zeros float16 [N, nblocks], result)``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"{path}: bits must be in 1..8, got {bits}")
    levels = (1 << bits) - 1

    def begin(j, values):
        x = values.astype(np.float32)
        scale, zero = rtn_core.scale_zero(x.min(axis=1), x.max(axis=1), bits, f"{path} (error feedback)")
        return scale, zero, scale.astype(np.float32), zero.astype(np.float32)

    def quantize(j, state, c0, values):
        _, _, s32, z32 = state
        q = np.clip(np.rint((values[:, 0].astype(np.float32) - z32) / s32), 0, levels).astype(np.uint8)
        return q * s32 + z32, q

    res = gptq_core.error_feedback(rows, H, rtn.blocks(rows.shape[1], block), quantize,
                                   begin=begin, group=1, percdamp=percdamp)
    codes = np.stack(res.aux, axis=1)
    scales = np.stack([s[0] for s in res.states], axis=1)
    zeros = np.stack([s[1] for s in res.states], axis=1)
    return codes, scales, zeros, res


class _FallbackLog:
    """Mixin: one ``ctx.log`` line per run for the paths that got the plain recipe."""

    leafwise = True  # __call__ only adds that line: the pass still rewrites leaf by leaf

    def __call__(self, ir, ctx: Context | None = None):
        ctx = Context() if ctx is None else ctx
        out = Pass.__call__(self, ir, ctx)
        paths = self.selected(ir)
        plain = [p for p in paths if out.meta[p].info.get("error_feedback") == "none"]
        if plain:
            ctx.log(f"{self.name}: no calibration Hessian for {len(plain)} of {len(paths)} tensors "
                    f"({', '.join(plain[:4])}{', ...' if len(plain) > 4 else ''}): plain recipe")
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorFeedbackPack(_FallbackLog, Pass):
    """Pack with GPTQ error feedback from ``ctx.calibration`` (a drop-in for ``Pack``).

    Attributes:
      basis: ``"rotated"`` (coordinate-wise feedback in the rotated basis, norms fixed at each
        block start) or ``"unrotated"`` (block-wise feedback in the original basis).
      percdamp: Hessian damping, a fraction of its mean diagonal.
      gain: only ``"none"`` (kept so a Pack config converts by changing ``_target_``).
    """

    needs = Needs(statistics={"hessian"})
    # each row's feedback reads only that row and the Hessian (in the same rows, the same
    # result up to the last bit of BLAS sums)
    row_separable = True

    default_where = ELIGIBLE
    basis: str = "rotated"
    percdamp: float = 0.01
    gain: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.basis not in BASES:
            raise ValueError(f"{self.name}.basis={self.basis!r}; allowed: {BASES}")
        if self.gain != "none":
            raise ValueError(f"{self.name}.gain={self.gain!r}: error feedback supports only 'none'")
        if not self.percdamp >= 0:
            raise ValueError(f"{self.name}.percdamp={self.percdamp!r}: must be >= 0")

    def rewrite(self, path, leaf, meta, ctx):
        r = require_rotated(leaf, path, self.name, need_codebooks=True)
        H = calibration_hessian(ctx, path, r.K)
        if H is None:
            q, m = Pack(gain="none").rewrite(path, leaf, meta, ctx)
            return q, m.replace(info={**m.info, "error_feedback": "none"})
        fn = cq_rotated if self.basis == "rotated" else cq_unrotated
        codes, norms, res = fn(r, H, self.percdamp, path)
        q = r.pack(codes, norms)
        info = {**meta.info, "gain": "none", "format": "cq", "layout_version": fmt.LAYOUT_VERSION,
                "error_feedback": self.basis, "percdamp": self.percdamp,
                "ef_rel_error": res.relative_error, "ef_base": res.base}
        return q, meta.replace(info=info)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQRoundToNearest(_FallbackLog, Pass):
    """GPTQ on the RTN grid (a drop-in for ``RoundToNearest``; no rotation).

    Attributes:
      bits: an int or rules (as RoundToNearest).
      block: the RTN block along the input dim (fp16 scale + zero each).
      percdamp: Hessian damping, a fraction of its mean diagonal.
    """

    needs = Needs(statistics={"hessian"})

    name = "gptq_round_to_nearest"
    row_separable = True  # as ErrorFeedbackPack: each row's feedback reads only that row and H
    default_where = ELIGIBLE
    bits: Any = 3
    block: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "bits", Rules.of(self.bits))
        if not self.percdamp >= 0:
            raise ValueError(f"{self.name}.percdamp={self.percdamp!r}: must be >= 0")

    def rewrite(self, path, leaf, meta, ctx):
        rows, transposed = rows_of(leaf, meta)
        K = rows.shape[1]
        H = calibration_hessian(ctx, path, K)
        if H is None:
            q, m = RoundToNearest(bits=self.bits, block=self.block).rewrite(path, leaf, meta, ctx)
            return q, m.replace(info={**m.info, "error_feedback": "none"})
        bits = bits_for(self.bits, path, meta)
        codes, scales, zeros, res = rtn_gptq(rows, H, bits, self.block, self.percdamp, path)
        q = RTNArray.pack(codes, scales, zeros, bits=bits, block=self.block, K=K, transposed=transposed)
        info = {**meta.info, "bits": bits, "block": self.block, "format": "rtn", "error_feedback": "gptq",
                "percdamp": self.percdamp, "ef_rel_error": res.relative_error, "ef_base": res.base}
        return q, meta.replace(info=info)
