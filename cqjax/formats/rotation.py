"""Block-local randomized Walsh–Hadamard rotations along K: the stored rotation of the CQ format.

Per block of size ``b`` (a power of two, from :func:`cqjax.formats.cq.block_plan`) the rotation
is ``R_b = diag(s1) · H_b / sqrt(b) · diag(s2) · P``, and ``R = blockdiag(R_b)`` acts on the
zero-padded axis of length ``Kpad = sum(blocks)``. ``R`` is orthogonal, so rotating both the
weight rows and the activation preserves the matmul: ``(R w) · (R x) == w · x``.

=========  ===========  =====================================================================
array      dtype/shape  meaning
=========  ===========  =====================================================================
s1, s2     int8 [Kpad]  random signs ±1 (after / before the Hadamard transform)
perm       int32 [Kpad] permutation, global indices staying inside each block:
                        ``(P v)[j] = v[perm[j]]`` with ``perm[j]`` in j's own block
H_b        —            Sylvester Hadamard matrix (natural order, ``H_2b = [[H, H], [H, -H]]``)
=========  ===========  =====================================================================

What depends on the seed: one ``numpy.random.default_rng(seed)`` draws, in this order,
``s1`` (Kpad signs), ``s2`` (Kpad signs), then one ``permutation(b)`` per block in K order.
So ``(seed, blocks)`` determines everything; changing any block changes all draws. Artifacts
should store the arrays themselves, not only the seed (NumPy may change its streams).

Applying ``R`` to ``v``: gather by ``perm``, multiply by ``s2``, Hadamard per block, scale by
``1/sqrt(b)``, multiply by ``s1``. ``R^T`` runs the same steps in reverse with the inverse
permutation. NumPy versions (:func:`rotate_rows_np`) use explicit Hadamard matrices in
float64 as the reference; the fast float32 :func:`rotate_rows` (C++) and the JAX versions
(:func:`rotate_jnp`, jittable) use a fast Walsh–Hadamard transform (``log2(b)`` butterfly
stages). :func:`block_matrices` gives each block's ``R_b`` as an explicit matrix (for error
feedback in the rotated basis).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cqjax import _xla_ext
from cqjax.formats.cq import block_offsets


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """A block-local randomized Hadamard rotation (see the module docstring).

    Attributes:
      blocks: block sizes (powers of two); ``Kpad = sum(blocks)``.
      seed: the seed the arrays were drawn from.
      s1: int8 [Kpad] signs applied after the Hadamard transform.
      s2: int8 [Kpad] signs applied before the Hadamard transform.
      perm: int32 [Kpad] gather indices, each inside its own block.
    """

    blocks: tuple[int, ...]
    seed: int
    s1: np.ndarray
    s2: np.ndarray
    perm: np.ndarray

    @property
    def Kpad(self) -> int:
        return int(sum(self.blocks))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s1, s2, perm)``: the ``rot_arrays`` argument of :func:`rotate_jnp`."""
        return self.s1, self.s2, self.perm


def _check_blocks(blocks: Sequence[int]) -> tuple[int, ...]:
    blocks = tuple(int(b) for b in blocks)
    if not blocks or any(b <= 0 or b & (b - 1) for b in blocks):
        raise ValueError(f"rotation: blocks must be a non-empty list of powers of two, got {blocks}")
    return blocks


def make_rotation(K: int, blocks: Sequence[int], seed: int) -> Rotation:
    """Draw a rotation for rows of length K split into ``blocks``.

    Args:
      K: the unpadded length (checked: ``K <= sum(blocks)``).
      blocks: block sizes, powers of two, e.g. ``block_plan(K)``.
      seed: a non-negative int for ``numpy.random.default_rng``.

    Returns:
      A :class:`Rotation`; identical arguments give identical arrays.
    """
    blocks = _check_blocks(blocks)
    Kpad = sum(blocks)
    if not 0 < K <= Kpad:
        raise ValueError(f"make_rotation: K={K} must be in [1, sum(blocks)={Kpad}]")
    rng = np.random.default_rng(seed)
    s1 = (rng.integers(0, 2, size=Kpad) * 2 - 1).astype(np.int8)
    s2 = (rng.integers(0, 2, size=Kpad) * 2 - 1).astype(np.int8)
    offs = block_offsets(blocks)
    perm = np.concatenate([off + rng.permutation(b) for off, b in zip(offs[:-1], blocks)])
    return Rotation(blocks=blocks, seed=int(seed), s1=s1, s2=s2, perm=perm.astype(np.int32))


@functools.lru_cache(maxsize=16)
def _hadamard(b: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(b)
    h.setflags(write=False)
    return h


def _out_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _hadamard_blocks_np(v: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    out = np.empty_like(v)
    offs = block_offsets(blocks)
    for lo, hi, b in zip(offs[:-1], offs[1:], blocks):
        out[:, lo:hi] = v[:, lo:hi] @ _hadamard(b)  # H is symmetric
    return out


def rotate_rows_np(w: np.ndarray, rot: Rotation) -> np.ndarray:
    """Apply ``R`` along K to each row: ``w [rows, K] -> [rows, Kpad]`` (reference).

    K is zero-padded to ``Kpad``. Computed in float64; returns float64 for float64 input,
    float32 otherwise.
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] > rot.Kpad:
        raise ValueError(f"rotate_rows_np: w must be [rows, K<={rot.Kpad}], got shape {w.shape}")
    v = np.zeros((w.shape[0], rot.Kpad), dtype=np.float64)
    v[:, : w.shape[1]] = w
    v = v[:, rot.perm] * rot.s2
    v = _hadamard_blocks_np(v, rot.blocks) * rot.s1
    return v.astype(_out_dtype(w.dtype))


def unrotate_rows_np(w_rot: np.ndarray, rot: Rotation, K: int | None = None) -> np.ndarray:
    """Apply ``R^T`` along the last axis: ``[rows, Kpad] -> [rows, K]`` (crops the padding)."""
    w_rot = np.asarray(w_rot)
    if w_rot.ndim != 2 or w_rot.shape[1] != rot.Kpad:
        raise ValueError(f"unrotate_rows_np: expected [rows, {rot.Kpad}], got shape {w_rot.shape}")
    v = w_rot.astype(np.float64) * rot.s1
    v = _hadamard_blocks_np(v, rot.blocks) * rot.s2
    out = np.empty_like(v)
    out[:, rot.perm] = v
    return out[:, : rot.Kpad if K is None else K].astype(_out_dtype(w_rot.dtype))


def block_matrices(rot: Rotation, dtype=np.float64) -> list[np.ndarray]:
    """Per block ``j``, ``M_j [b, b]`` with ``rotated_block = v_block @ M_j`` (``v``: the
    zero-padded original row); each is orthogonal, so ``v_block = rotated_block @ M_jᵀ``.

    Built in float64 and cast: the signs are exact, so a float32 ``M_j`` is the float32
    rounding of the float64 one entry by entry.
    """
    out = []
    offs = block_offsets(rot.blocks)
    s1, s2 = rot.s1.astype(np.float64), rot.s2.astype(np.float64)
    for lo, hi, b in zip(offs[:-1], offs[1:], rot.blocks):
        m = np.empty((b, b))
        # (R v)_j = s1_j sum_i H_ji s2_i v[perm_i]  =>  M[perm_i - lo, j] = s1_j H_ji s2_i
        m[rot.perm[lo:hi] - lo] = (_hadamard(b) * s1[lo:hi, None]).T * s2[lo:hi, None]
        out.append(m.astype(dtype))
    return out


def rotated_diagonal(H: np.ndarray, rot: Rotation) -> np.ndarray:
    """The diagonal of ``Mᵀ H_pad M`` (``M = blockdiag(M_j)``, ``H_pad``: ``H [K, K]`` zero-padded
    to ``Kpad``), float64 ``[Kpad]``: e.g. each rotated input's second moment when ``H = E[x xᵀ]``.
    Reads only the diagonal blocks of ``H``."""
    H = np.asarray(H, dtype=np.float64)
    K = H.shape[0]
    out = np.zeros(rot.Kpad)
    offs = block_offsets(rot.blocks)
    for lo, hi, m in zip(offs[:-1], offs[1:], block_matrices(rot)):
        top = min(hi, K)
        if lo < top:
            mk = m[: top - lo]
            out[lo:hi] = np.sum((H[lo:top, lo:top] @ mk) * mk, axis=0)
    return out


def rotate_rows(rows: np.ndarray, rot: Rotation) -> np.ndarray:
    """:func:`rotate_rows_np` in float32 through the C++ fast Walsh–Hadamard transform the CQ
    kernels rotate activations with (``xla_ext/include/cqjax/rotate.h``): ``log2(b)`` butterfly
    stages per block instead of a ``[b, b]`` product, the GIL released, and one fixed rounding
    whatever the thread count or machine, row by row (so a row's result does not depend on the
    rows beside it). Equal to the float64 reference within float32 rounding (~1e-6 relative).
    ``rows [n, K]`` float32 → ``[n, Kpad]``."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] > rot.Kpad:
        raise ValueError(f"rotate_rows: rows must be [n, K<={rot.Kpad}], got shape {rows.shape}")
    s1, s2 = (np.ascontiguousarray(s, dtype=np.int8) for s in (rot.s1, rot.s2))
    return _xla_ext.rotate_rows(rows, s1, s2, np.ascontiguousarray(rot.perm, dtype=np.int32), list(rot.blocks))


# ----------------------------------------------------------------------------- JAX


def _fwht_jnp(x, b: int):
    """Unnormalized Walsh–Hadamard transform over the last axis (length b), natural order."""
    lead = x.shape[:-1]
    h = 1
    while h < b:
        y = x.reshape(*lead, b // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        x = jnp.stack((a + c, a - c), axis=-2).reshape(*lead, b)
        h *= 2
    return x


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal block size: ``[(start, block, count)]``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for b in blocks:
        if runs and runs[-1][1] == b:
            s, _, n = runs[-1]
            runs[-1] = (s, b, n + 1)
        else:
            runs.append((start, b, 1))
        start += b
    return runs


def _hadamard_blocks_jnp(v, blocks: tuple[int, ...]):
    lead = v.shape[:-1]
    parts = []
    for start, b, n in _runs(blocks):
        seg = v[..., start : start + b * n].reshape(*lead, n, b)
        seg = _fwht_jnp(seg, b) * (1.0 / np.sqrt(b))
        parts.append(seg.reshape(*lead, b * n))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def rotate_jnp(x, rot_arrays, blocks: Sequence[int]):
    """Apply ``R`` along the last axis of an activation: ``x [..., K] -> [..., Kpad]``.

    Jittable with ``blocks`` static; works for any leading dims and mixed block sizes.

    Args:
      x: activations ``[..., K]``, ``K <= sum(blocks)`` (zero-padded to Kpad).
      rot_arrays: ``(s1, s2, perm)`` as from :meth:`Rotation.arrays` (NumPy or JAX arrays).
      blocks: the block sizes (static).

    Returns:
      ``[..., Kpad]`` in ``promote_types(x.dtype, float32)``.
    """
    blocks = _check_blocks(blocks)
    s1, s2, perm = rot_arrays
    Kpad = sum(blocks)
    x = jnp.asarray(x)
    dt = _compute_dtype(x)
    K = x.shape[-1]
    if K > Kpad:
        raise ValueError(f"rotate_jnp: x has K={K} > sum(blocks)={Kpad}")
    v = x.astype(dt)
    if K < Kpad:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, Kpad - K)])
    v = jnp.take(v, jnp.asarray(perm), axis=-1) * jnp.asarray(s2).astype(dt)
    return _hadamard_blocks_jnp(v, blocks) * jnp.asarray(s1).astype(dt)


def unrotate_jnp(y, rot_arrays, blocks: Sequence[int], K: int | None = None):
    """Apply ``R^T`` along the last axis: ``y [..., Kpad] -> [..., K]`` (jittable).

    Args:
      y: ``[..., Kpad]``.
      rot_arrays: ``(s1, s2, perm)``.
      blocks: the block sizes (static).
      K: crop the result to the first K entries (default: keep Kpad).
    """
    blocks = _check_blocks(blocks)
    s1, s2, perm = rot_arrays
    y = jnp.asarray(y)
    if y.shape[-1] != sum(blocks):
        raise ValueError(f"unrotate_jnp: expected last axis {sum(blocks)}, got shape {y.shape}")
    dt = _compute_dtype(y)
    v = y.astype(dt) * jnp.asarray(s1).astype(dt)
    v = _hadamard_blocks_jnp(v, blocks) * jnp.asarray(s2).astype(dt)
    v = jnp.take(v, jnp.argsort(jnp.asarray(perm)), axis=-1)
    return v if K is None else v[..., :K]
