"""The CQ recipe as three passes: rotate, fit codebook, pack.

=============  ===============================================================================
pass           rewrite of each eligible tensor
=============  ===============================================================================
Rotate         float ``[K, N]`` / ``[V, D]`` → :class:`Rotated` rows ``R·w`` (block-local
               randomized Walsh–Hadamard over the input dim, blocks from ``block_plan``)
FitCodebook    attaches per-block-size Lloyd–Max levels for its bit width (``analytic`` for a
               random unit vector's coordinate, or ``fitted`` to the tensor's own values)
Pack           nearest level per weight, one fp16 norm per (row, block) (optionally scaled by
               a least-squares or norm-preserving gain), bit-packed → :class:`CQArray`
=============  ===============================================================================

``meta.info`` records ``bits``, ``block``, ``seed``, ``codebook`` and ``gain``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from cqjax.formats import cq as fmt
from cqjax.kernels.qarrays import CQArray
from cqjax.passes import codebook_core, rotate_core
from cqjax.passes.common import ELIGIBLE, bits_for, rows_of
from cqjax.pipeline import Pass
from cqjax.select import Rules

CODEBOOK_MODES = ("analytic", "fitted")
GAINS = ("none", "ls", "norm")


@dataclasses.dataclass(frozen=True)
class Rotated:
    """An intermediate leaf: rotated rows ``[rows, Kpad]`` and, after FitCodebook, levels."""

    rows: np.ndarray
    rotation: rotate_core.Rotation
    K: int
    transposed: bool
    bits: int | None = None
    codebooks: dict[int, np.ndarray] | None = None

    @property
    def logical_shape(self) -> tuple[int, int]:
        return (self.K, self.rows.shape[0]) if self.transposed else (self.rows.shape[0], self.K)


def _rotate_rows_fast(rows: np.ndarray, rot: rotate_core.Rotation) -> np.ndarray:
    """``rotate_core.rotate_rows_np`` in float32 with the signs and permutation folded into one
    ``[b, b]`` matrix per block (one single-threaded BLAS matmul per block written straight
    into the output, no gather); equal to the float64 reference within float32 rounding
    (~1e-6 relative)."""
    K = rows.shape[1]
    out = np.empty((rows.shape[0], rot.Kpad), np.float32)
    offs = fmt.block_offsets(rot.blocks)
    with rotate_core.single_thread_blas():
        for lo, hi, b in zip(offs[:-1], offs[1:], rot.blocks):
            if lo >= K:
                out[:, lo:hi] = 0.0
                continue
            # (R v)_j = s1_j sum_i H_ji s2_i v[perm_i]  =>  out_blk = v_blk @ M, M[perm_i - lo, j] = s1_j H_ji s2_i
            # (built in float32: the signs are exact, so this equals float32 of the float64 product)
            m = np.empty((b, b), np.float32)
            m[rot.perm[lo:hi] - lo] = (rotate_core._hadamard_f32(b) * rot.s1[lo:hi][:, None]).T * rot.s2[lo:hi][:, None]
            if hi <= K:
                np.matmul(rows[:, lo:hi], m, out=out[:, lo:hi])
            else:
                out[:, lo:hi] = rows[:, lo:K] @ m[: K - lo]
    return out


def _require(leaf, path: str, who: str, need_codebooks: bool = False) -> Rotated:
    if not isinstance(leaf, Rotated) or (need_codebooks and leaf.codebooks is None):
        what = "rotate and codebook passes" if need_codebooks else "rotate pass"
        raise ValueError(f"{who}: {path} must first go through the {what} (got {type(leaf).__name__})")
    return leaf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rotate(Pass):
    """Block-local randomized Hadamard rotation of each row along the input dim."""

    default_where = ELIGIBLE
    block: int = 128
    min_block: int = 16
    seed: int = 0

    def rewrite(self, path, leaf, meta, ctx):
        rows, transposed = rows_of(leaf, meta)
        K = rows.shape[1]
        seed = (self.seed + ctx.seed_for(path)) % (2**31)
        rot = rotate_core.make_rotation(K, fmt.block_plan(K, self.block, self.min_block), seed)
        info = {**meta.info, "block": self.block, "blocks": list(rot.blocks), "seed": seed,
                "padding": rot.Kpad - K}
        return Rotated(_rotate_rows_fast(rows, rot), rot, K, transposed), meta.replace(info=info)


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

    def rewrite(self, path, leaf, meta, ctx):
        r = _require(leaf, path, self.name)
        bits = bits_for(self.bits, path, meta)
        if bits not in fmt.SUPPORTED_BITS:
            raise ValueError(f"{path}: bits={bits}; supported: {fmt.SUPPORTED_BITS}")
        if self.mode == "fitted":
            books = codebook_core.fit_codebooks(r.rows, r.rotation.blocks, bits, self.iters)
        else:
            books = {d: codebook_core.analytic_codebook(d, bits) for d in set(r.rotation.blocks)}
        info = {**meta.info, "bits": bits, "codebook": self.mode}
        return dataclasses.replace(r, bits=bits, codebooks=books), meta.replace(info=info)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pack(Pass):
    """Assigns nearest levels, stores fp16 norms (× optional gain) and bit-packs the codes."""

    default_where = ELIGIBLE
    gain: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.gain not in GAINS:
            raise ValueError(f"pack.gain={self.gain!r}; allowed: {GAINS}")

    def rewrite(self, path, leaf, meta, ctx):
        r = _require(leaf, path, self.name, need_codebooks=True)
        blocks = r.rotation.blocks
        # fp16 levels are what is stored, so assign against exactly those.
        books = {d: np.asarray(c, np.float16).astype(np.float32) for d, c in r.codebooks.items()}
        codes, norms = codebook_core.quantize_rows(r.rows, blocks, books, gain=self.gain)
        s1, s2, perm = r.rotation.arrays()
        q = CQArray(codes=jnp.asarray(fmt.pack_codes(codes, r.bits)), norms=jnp.asarray(norms),
                    codebooks=jnp.asarray(np.stack([books[d] for d in blocks]).astype(np.float16)),
                    s1=jnp.asarray(s1), s2=jnp.asarray(s2), perm=jnp.asarray(perm), bits=r.bits,
                    blocks=tuple(blocks), K=r.K, transposed=r.transposed, seed=r.rotation.seed)
        return q, meta.replace(info={**meta.info, "gain": self.gain, "format": "cq",
                                     "layout_version": fmt.LAYOUT_VERSION})
