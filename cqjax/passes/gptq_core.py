"""GPTQ / OBS error feedback over the input dim with a pluggable group quantizer (pure NumPy).

A linear layer computes ``y = x · wᵀ`` for weight rows ``w [N, K]``; with the calibration
Hessian ``H = E[x xᵀ] [K, K]`` its output error is ``E‖x (W − Ŵ)ᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)``.
GPTQ quantizes the columns of ``W`` left to right and, after each group of columns, moves that
group's error onto the columns not yet quantized, in the direction that the remaining columns
can best absorb (the optimal-brain-surgeon update):

=====================  ===================================================================
step                   what (``U``: upper Cholesky factor of ``H_d⁻¹``, ``H_d⁻¹ = Uᵀ U``)
=====================  ===================================================================
dead inputs            ``H_kk = 0`` → ``H_kk := 1`` and weight column ``k := 0`` (as GPTQ)
damping                ``H_d = H + percdamp · mean(diag H) · I``
blocks                 the quantizer's parameter blocks (widths summing to K); at a block's
                       start ``begin(j, W[:, block])`` sees its fully updated values
groups                 ``group`` consecutive columns of a block (``None``: the whole block)
                       quantized jointly by ``quantize(j, state, c0, values) -> (ŵ, aux)``
feedback               ``err = (W_G − Ŵ_G) · U_GG⁻¹``; later columns ``W_R −= err · U_GR``
lazy batches           runs of whole blocks up to ``lazy`` columns: the update reaches the
                       rest of the batch at once and the columns after it at the batch end
loss                   ``‖err‖²`` summed = ``tr((W − Ŵ) H_d (W − Ŵ)ᵀ)`` exactly
=====================  ===================================================================

With ``group=1`` this is the standard column-by-column GPTQ (``err = (w − ŵ) / U_kk``);
with ``group=None`` each block is quantized jointly (its values fixed before its own feedback)
and the feedback is the exact block OBS update. A diagonal ``H`` gives no feedback at all, so
the result is the quantizer applied to ``W`` as is.

>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 8))
>>> H = x.T @ x / 512
>>> w = rng.standard_normal((4, 8))
>>> rnd = lambda j, state, c0, v: (np.round(v * 2) / 2, None)  # a 0.5 grid
>>> res = error_feedback(w, H, (4, 4), rnd, group=1)
>>> plain = np.round(w * 2) / 2
>>> out_err = lambda q: np.einsum("ij,jk,ik->", w - q, H, w - q)
>>> bool(out_err(res.q) < out_err(plain))
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg

#: ``begin(j, block_values [N, b]) -> state``: fits block ``j``'s parameters (e.g. a norm).
BeginFn = Callable[[int, np.ndarray], Any]
#: ``quantize(j, state, c0, values [N, g]) -> (dequantized [N, g], aux)``; must not modify
#: ``values`` (a view of the working matrix).
QuantizeFn = Callable[[int, Any, int, np.ndarray], tuple[np.ndarray, Any]]


@dataclasses.dataclass(frozen=True)
class Result:
    """What :func:`error_feedback` made.

    Attributes:
      q: float64 ``[N, K]`` the dequantized weights (the quantizer's ``ŵ`` of every group).
      aux: what ``quantize`` returned per group, in order.
      states: what ``begin`` returned per block (``None`` entries without ``begin``).
      loss: ``tr((W₀ − Ŵ) H_d (W₀ − Ŵ)ᵀ)`` (``W₀``: the input with dead columns zeroed).
      base: ``tr(W₀ H_d W₀ᵀ)``, so ``loss / base`` is the relative (damped) output error.
      dead: bool ``[K]``, the inputs with ``H_kk = 0``.
    """

    q: np.ndarray
    aux: list
    states: list
    loss: float
    base: float
    dead: np.ndarray

    @property
    def relative_error(self) -> float:
        return self.loss / self.base if self.base > 0 else 0.0


def damped(hessian: np.ndarray, percdamp: float = 0.01, *, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(H_d, dead)``: dead diagonal entries set to 1, then ``percdamp · mean diag`` added.

    Args:
      hessian: ``[K, K]`` symmetric positive semi-definite (not modified unless ``overwrite``).
      percdamp: damping as a fraction of the mean diagonal (after the dead fix), ``>= 0``.
      overwrite: damp a float64 ``hessian`` in place (no ``[K, K]`` copy).
    """
    H = hessian if overwrite and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"gptq: hessian must be square [K, K], got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("gptq: hessian has non-finite values")
    if not percdamp >= 0:
        raise ValueError(f"gptq: percdamp must be >= 0, got {percdamp}")
    diag = np.einsum("ii->i", H)  # a writable view of the diagonal
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * float(np.mean(diag))
    return H, dead


def inverse_cholesky(H: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """The upper triangular ``U`` with ``H⁻¹ = Uᵀ U`` (GPTQ's ``Hinv``).

    With ``J`` the order reversal and ``J H J = L Lᵀ`` (Cholesky), ``U = J L⁻¹ J``: one
    Cholesky and one triangular inverse (``2K³/3`` flops instead of inverting ``H`` and
    factoring again). ``overwrite``: ``H`` (symmetric, C-contiguous float64) becomes ``U``,
    reversed, factored and inverted in place: no ``[K, K]`` copy (a 8960-wide Hessian is 642 MB).

    Raises:
      ValueError: when ``H`` is not positive definite (raise the damping).
    """
    if not (overwrite and H.dtype == np.float64 and H.flags.c_contiguous):
        H = np.array(H, dtype=np.float64, order="C")
    _reverse(H)
    try:  # Hᵀ = H is Fortran-ordered: LAPACK works in its memory
        L = scipy.linalg.cholesky(H.T, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise ValueError("gptq: the damped Hessian is not positive definite; raise percdamp") from None
    A, info = scipy.linalg.lapack.dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise ValueError("gptq: the damped Hessian is singular; raise percdamp")
    _reverse(A)
    return A


def _reverse(A: np.ndarray) -> None:
    """``A := J A J`` in place (both axes reversed), one pair of rows at a time."""
    n = A.shape[0]
    for i in range((n + 1) // 2):
        j = n - 1 - i
        top = A[i, ::-1].copy()
        A[i] = A[j, ::-1]
        A[j] = top


def lazy_batches(blocks: Sequence[int], lazy: int) -> list[tuple[int, int, int, int]]:
    """Runs of whole blocks of at most ``lazy`` columns (a wider block is its own run):
    ``[(first block, end block, lo column, hi column)]``."""
    out, j, lo = [], 0, 0
    while j < len(blocks):
        k, hi = j + 1, lo + blocks[j]
        while k < len(blocks) and hi + blocks[k] <= lazy:
            hi += blocks[k]
            k += 1
        out.append((j, k, lo, hi))
        j, lo = k, hi
    return out


def error_feedback(
    w: np.ndarray,
    hessian: np.ndarray,
    blocks: Sequence[int],
    quantize: QuantizeFn,
    *,
    begin: BeginFn | None = None,
    group: int | None = 1,
    percdamp: float = 0.01,
    lazy: int = 128,
    overwrite_hessian: bool = False,
) -> Result:
    """Quantizes ``w`` group by group with GPTQ error feedback (see the module table).

    Args:
      w: float weights ``[N, K]`` (rows = outputs, K = inputs, Hessian basis); not modified.
      hessian: ``[K, K]``, ``E[x xᵀ]`` of the layer's input (any positive scale).
      blocks: the quantizer's block widths along K (sum K).
      quantize: ``quantize(j, state, c0, values [N, g]) -> (ŵ [N, g], aux)`` for the group
        starting ``c0`` columns into block ``j``; ``state`` is ``begin``'s for that block.
      begin: optional ``begin(j, values [N, b]) -> state`` called at each block's start with
        the block's updated values.
      group: columns quantized jointly (1: column by column, the GPTQ default); ``None``: each
        whole block at once. Groups never cross block boundaries.
      percdamp: damping, a fraction of the mean Hessian diagonal.
      lazy: lazy-batch width in columns (a speed knob; results agree to rounding).
      overwrite_hessian: ``hessian`` (float64) may be damped, factored and inverted in place.

    Returns:
      A :class:`Result`.

    Raises:
      ValueError: on bad shapes, non-finite input, a block plan that does not sum to K, or a
        Hessian that stays singular after damping.
    """
    W = np.array(w, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"gptq: w must be [N, K], got shape {W.shape}")
    N, K = W.shape
    blocks = tuple(int(b) for b in blocks)
    if sum(blocks) != K or any(b < 1 for b in blocks):
        raise ValueError(f"gptq: blocks {blocks} must be positive and sum to K={K}")
    if group is not None and group < 1:
        raise ValueError(f"gptq: group must be >= 1 or None, got {group}")
    if not np.all(np.isfinite(W)):
        raise ValueError("gptq: w has non-finite values")
    H = np.asarray(hessian)
    if H.shape != (K, K):
        raise ValueError(f"gptq: hessian must be [{K}, {K}] for w {W.shape}, got {H.shape}")
    H, dead = damped(H, percdamp, overwrite=overwrite_hessian)
    W[:, dead] = 0.0
    base = float(np.einsum("ij,ij->", W @ H, W))
    U = inverse_cholesky(H, overwrite=True)  # H is this call's own (damped copies unless told)
    del H

    Q = np.empty_like(W)
    aux: list = []
    states: list = []
    loss = 0.0
    starts = np.concatenate([[0], np.cumsum(blocks)])
    for j0, j1, blo, bhi in lazy_batches(blocks, lazy):
        Wb = W[:, blo:bhi]  # a view: updates land in W
        Ub = U[blo:bhi, blo:bhi]
        err = np.zeros((N, bhi - blo))
        for j in range(j0, j1):
            lo, hi = starts[j] - blo, starts[j + 1] - blo
            state = begin(j, Wb[:, lo:hi]) if begin is not None else None
            states.append(state)
            step = hi - lo if group is None else group
            for c0 in range(lo, hi, step):
                c1 = min(c0 + step, hi)
                values = Wb[:, c0:c1]
                q, a = quantize(j, state, c0 - lo, values)
                q = np.asarray(q, dtype=np.float64).reshape(N, c1 - c0)
                aux.append(a)
                Q[:, blo + c0 : blo + c1] = q
                e = values - q
                if c1 - c0 == 1:
                    e /= Ub[c0, c0]
                else:  # e · U_GG = W_G − Ŵ_G, U_GG upper triangular
                    e = scipy.linalg.solve_triangular(Ub[c0:c1, c0:c1], e.T, trans="T", lower=False,
                                                      check_finite=False).T
                err[:, c0:c1] = e
                if c1 < bhi:
                    Wb[:, c1:] -= e @ Ub[c0:c1, c1:]
        if bhi < K:
            W[:, bhi:] -= err @ U[blo:bhi, bhi:]
        loss += float(np.sum(err * err))
    return Result(q=Q, aux=aux, states=states, loss=loss, base=base, dead=dead)
