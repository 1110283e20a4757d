"""What the quantization passes share: the rows of a tensor, the bit width of a path and a
tensor's calibration Hessian.

(Which tensors are eligible is :data:`cqjax.quant_stats.ELIGIBLE`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cqjax import select
from cqjax.ir import EMBED_ROLES, KERNEL_ROLES, TensorMeta, materialize
from cqjax.pipeline import Context


def rows_of(leaf: Any, meta: TensorMeta) -> tuple[np.ndarray, bool]:
    """The float32 rows to quantize and whether they are a kernel's columns (``transposed``)."""
    w = materialize(leaf)
    transposed = meta.role in KERNEL_ROLES
    # A lazily imported kernel is a transposed view of its [out, in] source: cast its transpose
    # (the source's own order) in one contiguous pass.
    return np.ascontiguousarray(np.asarray(w.T if transposed else w, dtype=np.float32)), transposed


def width_rules(bits: int, embed_bits: int | None, overrides: Any = None, roles: Any = None
                ) -> list[tuple[Any, int, str]]:
    """``(filter, bits, source)`` in the order they are tried: ``overrides`` (a mapping
    filter → bits), ``roles`` (a bundle's), one rule per embedding role at ``embed_bits``, then
    everything at ``bits``; ``source`` names the ``quant`` key each came from."""
    out = [(f, b, "quant.overrides") for f, b in select.Rules.of(overrides).rules] if overrides else []
    out += [(f, b, "quant.roles") for f, b in select.Rules.of(roles).rules] if roles else []
    if embed_bits is not None:
        out += [(f"role:{r}", embed_bits, "quant.embed_bits") for r in EMBED_ROLES]
    return out + [(True, bits, "quant.bits")]


def bits_rules(bits: int, embed_bits: int | None, overrides: Any = None, roles: Any = None) -> select.Rules:
    """The :func:`width_rules` as :class:`cqjax.select.Rules` (first match wins)."""
    return select.Rules([(f, b) for f, b, _ in width_rules(bits, embed_bits, overrides, roles)])


def bits_for(rules: select.Rules, path: str, meta: TensorMeta) -> int:
    """The width an allocation pass chose (``meta.info["allocated_bits"]``), else the one the
    first matching rule gives ``path``; an error names a path none match."""
    if "allocated_bits" in meta.info:
        return int(meta.info["allocated_bits"])
    bits = rules.get(path, meta)
    if bits is None:
        raise ValueError(f"{path}: no bits rule matches (role {meta.role}); rules: {rules}")
    return int(bits)


def calibration_hessian(ctx: Context, path: str, K: int) -> np.ndarray | None:
    """``ctx.calibration[path]["hessian"]`` as float64 ``[K, K]``, or None when absent.

    Raises:
      ValueError: naming the path when the entry has the wrong shape or non-finite values.
    """
    entry = ctx.calibration.get(path)
    if entry is None or entry.get("hessian") is None:
        return None
    H = np.asarray(entry["hessian"], dtype=np.float64)
    if H.shape != (K, K):
        raise ValueError(f"calibration[{path!r}]['hessian']: expected [{K}, {K}] (the input "
                         f"features), got {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError(f"calibration[{path!r}]['hessian'] has non-finite values")
    return H
