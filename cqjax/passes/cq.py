"""The CQ recipe as three passes: rotate, fit codebook, pack.

=============  ===============================================================================
pass           rewrite of each eligible tensor
=============  ===============================================================================
Rotate         float ``[K, N]`` / ``[V, D]`` → :class:`Rotated` rows ``R·w`` (block-local
               randomized Walsh–Hadamard over the input dim, blocks from ``block_plan``)
FitCodebook    attaches per-block-size Lloyd–Max levels for its bit width (``analytic`` for a
               random unit vector's coordinate, ``fitted`` to the tensor's own values, or
               ``hessian``: fitted to them weighted by block norm² × the rotated calibration
               Hessian's diagonal; ``fitted`` where a tensor has no Hessian)
Pack           nearest level per weight, one fp16 norm per (row, block) (optionally scaled by
               a least-squares or norm-preserving gain), bit-packed → :class:`CQArray`
=============  ===============================================================================

``meta.info`` records ``bits``, ``block``, ``seed``, ``codebook`` and ``gain``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cqjax.formats import cq as fmt
from cqjax.formats import rotation
from cqjax.kernels.qarrays import CQArray
from cqjax.passes import codebook_core
from cqjax.passes.common import bits_for, calibration_hessian, rows_of
from cqjax.pipeline import Needs, Pass
from cqjax.quant_stats import ELIGIBLE
from cqjax.select import Rules

CODEBOOK_MODES = ("analytic", "fitted", "hessian")
GAINS = ("none", "ls", "norm")


@dataclasses.dataclass(frozen=True)
class Rotated:
    """An intermediate leaf: rotated rows ``[rows, Kpad]`` and, after FitCodebook, levels."""

    rows: np.ndarray
    rotation: rotation.Rotation
    K: int
    transposed: bool
    bits: int | None = None
    codebooks: dict[int, np.ndarray] | None = None

    @property
    def logical_shape(self) -> tuple[int, int]:
        return (self.K, self.rows.shape[0]) if self.transposed else (self.rows.shape[0], self.K)

    def stored_levels(self) -> dict[int, np.ndarray]:
        """The levels per block size as stored (fp16), in float32: what codes are assigned against."""
        return {d: np.asarray(c, np.float16).astype(np.float32) for d, c in self.codebooks.items()}

    def pack(self, codes: np.ndarray, norms: np.ndarray) -> CQArray:
        """The :class:`CQArray` of ``codes`` uint8 ``[rows, Kpad]`` and fp16 ``norms``."""
        return CQArray.pack(codes, norms, self.stored_levels(), self.rotation, bits=self.bits, K=self.K,
                            transposed=self.transposed)


def require_rotated(leaf, path: str, who: str, need_codebooks: bool = False) -> Rotated:
    """``leaf`` as a :class:`Rotated` (with codebooks if asked); an error names the missing pass."""
    if not isinstance(leaf, Rotated) or (need_codebooks and leaf.codebooks is None):
        what = "rotate and codebook passes" if need_codebooks else "rotate pass"
        raise ValueError(f"{who}: {path} must first go through the {what} (got {type(leaf).__name__})")
    return leaf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rotate(Pass):
    """Block-local randomized Hadamard rotation of each row along the input dim."""

    default_where = ELIGIBLE
    row_separable = True
    block: int = 128
    min_block: int = 16
    seed: int = 0

    def rewrite(self, path, leaf, meta, ctx):
        rows, transposed = rows_of(leaf, meta)
        K = rows.shape[1]
        seed = (self.seed + ctx.seed_for(path)) % (2**31)
        rot = rotation.make_rotation(K, fmt.block_plan(K, self.block, self.min_block), seed)
        info = {**meta.info, "block": self.block, "blocks": list(rot.blocks), "seed": seed,
                "padding": rot.Kpad - K}
        return Rotated(rotation.rotate_rows(rows, rot), rot, K, transposed), meta.replace(info=info)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitCodebook(Pass):
    """Chooses each tensor's bit width (``bits``: an int or rules) and its Lloyd–Max levels."""

    default_where = ELIGIBLE
    bits: Any = 3
    mode: str = "analytic"
    iters: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in CODEBOOK_MODES:
            raise ValueError(f"codebook.mode={self.mode!r}; allowed: {CODEBOOK_MODES}")
        object.__setattr__(self, "bits", Rules.of(self.bits))

    @property
    def needs(self) -> Needs:
        return Needs(statistics={"hessian"}) if self.mode == "hessian" else Needs()

    @property
    def row_separable(self) -> bool:  # type: ignore[override]
        return self.mode == "analytic"  # fitted levels depend on all rows

    def rewrite(self, path, leaf, meta, ctx):
        r = require_rotated(leaf, path, self.name)
        bits = bits_for(self.bits, path, meta)
        if bits not in fmt.SUPPORTED_BITS:
            raise ValueError(f"{path}: bits={bits}; supported: {fmt.SUPPORTED_BITS}")
        mode, weights = self.mode, None
        if mode == "hessian":
            H = calibration_hessian(ctx, path, r.K)
            if H is None:
                mode = "fitted"
            else:
                weights = rotation.rotated_diagonal(H, r.rotation)
        if mode == "analytic":
            books = {d: codebook_core.analytic_codebook(d, bits) for d in set(r.rotation.blocks)}
        else:
            books = codebook_core.fit_codebooks(r.rows, r.rotation.blocks, bits, self.iters, weights)
        info = {**meta.info, "bits": bits, "codebook": mode}
        return dataclasses.replace(r, bits=bits, codebooks=books), meta.replace(info=info)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pack(Pass):
    """Assigns nearest levels, stores fp16 norms (× optional gain) and bit-packs the codes."""

    default_where = ELIGIBLE
    row_separable = True  # codes, norms and gains are per (row, block)
    gain: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.gain not in GAINS:
            raise ValueError(f"pack.gain={self.gain!r}; allowed: {GAINS}")

    def rewrite(self, path, leaf, meta, ctx):
        r = require_rotated(leaf, path, self.name, need_codebooks=True)
        # fp16 levels are what is stored, so assign against exactly those.
        codes, norms = codebook_core.quantize_rows(r.rows, r.rotation.blocks, r.stored_levels(), gain=self.gain)
        return r.pack(codes, norms), meta.replace(info={**meta.info, "gain": self.gain, "format": "cq",
                                     "layout_version": fmt.LAYOUT_VERSION})
