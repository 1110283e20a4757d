"""Stored bits per weight: the one definition used by reports, the API and benchmarks.

=====================  ========================================================================
figure                 definition
=====================  ========================================================================
eligible tensors       linears, embeddings, LM head, per-layer embeddings (2-D):
                       :data:`ELIGIBLE`
bytes of a tensor      quantized: every array of the leaf exactly as the artifact stores it
                       (packed codes incl. padding, fp16 norms/scales, codebooks, rotation
                       signs and permutation, fp16 ``in_scale`` (16 bits per input channel)
                       when present: :func:`cqjax.formats.encoding.stored_nbytes`);
                       float: 2 bytes per parameter (16-bit), whatever its dtype in memory
bits/weight            ``8 * bytes / parameters``, over the eligible tensors
                       (``quantized_tensors``) and over the whole model (``model``)
rel_error              ``‖w − ŵ‖² / ‖w‖²`` of a quantized tensor against the float IR
=====================  ========================================================================

Worked example (a 40x72 kernel, K = 40, blocks (32, 16), 3 bits, CQ): codes
``72 * 48 * 3 / 8 = 1296`` B, norms ``72 * 2 * 2 = 288`` B, codebooks ``2 * 8 * 2 = 32`` B,
signs ``2 * 48 / 8 = 12`` B, permutation ``48`` B (uint8, block-local): 1676 B, i.e.
``1676 * 8 / 2880 = 4.656`` bits/weight (the padding and the per-block side data of a narrow
tensor are not free).
"""

from __future__ import annotations

import functools

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cqjax import select
from cqjax.formats.encoding import stored_nbytes
from cqjax.ir import ELIGIBLE_ROLES, IR, TensorMeta, materialize
from cqjax.kernels.qarrays import is_quantized

FLOAT_BYTES = 2  # float tensors are counted at 16 bits
#: The eligible tensors: what recipes quantize and what bits/weight is counted over.
ELIGIBLE = select.All(select.Any(*(f"role:{r}" for r in ELIGIBLE_ROLES)), lambda path, meta: len(meta.shape) == 2)


def is_eligible(path: str, meta: TensorMeta) -> bool:
    return select.to_predicate(ELIGIBLE)(path, meta)


def tensor_bytes(leaf: Any, numel: int) -> int:
    """Stored bytes of one tensor (see the module table)."""
    return stored_nbytes(leaf) if is_quantized(leaf) else FLOAT_BYTES * numel


def error_sums(w: Any, w_hat: Any) -> tuple[float, float]:
    """``(‖w − ŵ‖², ‖w‖²)``; summed over several tensors, their ratio is the pooled relative
    error. float32 with NumPy's pairwise summation (relative error ~1e-7, ~10x faster than
    float64 copies of both tensors)."""
    w = np.asarray(w, np.float32)
    d = np.ravel(np.subtract(w, np.asarray(w_hat, np.float32)), order="K")  # a new array: contiguous
    d = np.square(d, out=d)
    return float(np.sum(d)), float(np.sum(np.square(np.ravel(w, order="K"))))


def pooled_rel_error(sums: Iterable[tuple[float, float]]) -> float:
    """``Σ‖w − ŵ‖² / Σ‖w‖²`` over several tensors' (or row blocks') :func:`error_sums` (0 when
    both are zero)."""
    sums = list(sums)
    num, den = sum(s[0] for s in sums), sum(s[1] for s in sums)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def rel_error(w: Any, w_hat: Any) -> float:
    """``‖w − ŵ‖² / ‖w‖²`` in float64 (0 when both are zero)."""
    return pooled_rel_error([error_sums(w, w_hat)])


@functools.cache
def dequantizer(transpose: bool = False):
    """A jitted ``leaf -> float array`` (``transpose``: its transpose, e.g. a kernel's output
    rows), compiled once per leaf shape and format (one function per process, so its
    compilations are shared by every caller).

    ``seed`` (a static field of CQ leaves that only records how the rotation was drawn; the
    rotation itself is in the leaf's arrays) is zeroed first, or every tensor would compile
    anew; op-by-op dispatch would be ~10x slower still.
    """
    import jax

    run = jax.jit(lambda leaf: leaf.dequantize().T if transpose else leaf.dequantize())
    return lambda leaf: run(leaf.replace(seed=0) if getattr(leaf, "seed", 0) else leaf)


def tensors(ir: IR, float_ir: IR | None = None, *, progress: bool = False,
            external: Mapping[str, int] | None = None) -> list[dict]:
    """One row per tensor: ``{path, role, tower, eligible, kind, bits, params, bytes, bits_per_weight}``
    plus ``rel_error`` for quantized tensors when ``float_ir`` (the unquantized IR) is given
    (with a progress line on stderr if ``progress``).

    ``bits`` is the nominal bit width (16 for float tensors). ``external`` gives the stored bytes
    of tensors that another tool quantized (``ir`` holds their decoded float copies; their rows
    say ``kind: "external"``), e.g. a peer in the benchmarks."""
    from cqjax.progress import Progress

    rows = []
    dequantize = dequantizer()
    bar = Progress("relative error", total=len(ir.meta), unit="tensors", every_s=10.0,
                   enabled=progress and float_ir is not None, tag="cqjax")
    for path, meta in ir.meta.items():
        leaf, n = ir.params[path], int(np.prod(meta.shape))
        q = is_quantized(leaf)
        ext = external is not None and path in external
        nbytes = external[path] if ext else tensor_bytes(leaf, n)
        row = {"path": path, "role": meta.role, "tower": meta.tower, "eligible": is_eligible(path, meta),
               "kind": leaf.format if q else "external" if ext else "float", "bits": int(leaf.bits) if q else 16, "params": n,
               "bytes": nbytes, "bits_per_weight": 8 * nbytes / n if n else 0.0}
        if q and float_ir is not None and path in float_ir.params:
            row["rel_error"] = rel_error(materialize(float_ir.params[path]), dequantize(leaf))
        rows.append(row)
        bar.update(1)
    bar.close()
    return rows


def storage(ir: IR, rows: list[dict] | None = None) -> dict:
    """Bits per weight and bytes of ``ir`` as stored (see the module table).

    Returns:
      ``{"bits_per_weight": {"quantized_tensors", "model"}, "bytes": {"float", "quantized",
      "eligible"}, "params": {"eligible", "quantized", "model"}}``: ``bytes.float`` is the whole
      model at 16 bits, ``bytes.quantized`` the whole model as stored, ``bytes.eligible`` the
      eligible tensors as stored.
    """
    rows = tensors(ir) if rows is None else rows
    elig = [r for r in rows if r["eligible"]]
    p_elig, p_all = sum(r["params"] for r in elig), sum(r["params"] for r in rows)
    b_elig, b_all = sum(r["bytes"] for r in elig), sum(r["bytes"] for r in rows)
    return {"bits_per_weight": {"quantized_tensors": 8 * b_elig / p_elig if p_elig else 0.0,
                                "model": 8 * b_all / p_all if p_all else 0.0},
            "bytes": {"float": FLOAT_BYTES * p_all, "quantized": b_all, "eligible": b_elig},
            "params": {"eligible": p_elig, "quantized": sum(r["params"] for r in rows if r["kind"] != "float"),
                       "model": p_all}}


def by_tower(rows: list[dict]) -> dict[str, dict]:
    """``{tower: {"params", "bytes", "bits_per_weight", "rel_error"}}`` of :func:`tensors` rows:
    stored bits per weight of each tower's tensors, and the parameter-weighted mean relative
    error of its quantized tensors (None where none was measured)."""
    out: dict[str, dict] = {}
    for tower in dict.fromkeys(r.get("tower", "text") for r in rows):
        mine = [r for r in rows if r.get("tower", "text") == tower]
        params, nbytes = sum(r["params"] for r in mine), sum(r["bytes"] for r in mine)
        measured = [r for r in mine if r.get("rel_error") is not None]
        weight = sum(r["params"] for r in measured)
        out[tower] = {"params": params, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params if params else 0.0,
                      "rel_error": sum(r["rel_error"] * r["params"] for r in measured) / weight if weight else None}
    return out
