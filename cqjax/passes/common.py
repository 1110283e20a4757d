"""What the quantization passes share: which tensors are eligible, their rows, their bits."""

from __future__ import annotations

from typing import Any

import numpy as np

from cqjax import select
from cqjax.ir import TensorMeta, materialize

#: Roles whose tensors the recipe quantizes (the "eligible" tensors of bits/weight).
ELIGIBLE_ROLES = ("linear", "embedding", "per_layer_embedding", "lm_head")
#: Roles stored as [in, out] kernels: their quantized rows are the kernel's columns.
KERNEL_ROLES = ("linear", "lm_head")
EMBED_ROLES = ("embedding", "per_layer_embedding", "lm_head")

ELIGIBLE = select.All(select.Any(*(f"role:{r}" for r in ELIGIBLE_ROLES)),
                      lambda path, meta: len(meta.shape) == 2)


def is_eligible(path: str, meta: TensorMeta) -> bool:
    return select.to_predicate(ELIGIBLE)(path, meta)


def rows_of(leaf: Any, meta: TensorMeta) -> tuple[np.ndarray, bool]:
    """The float32 rows to quantize and whether they are a kernel's columns (``transposed``)."""
    w = np.asarray(materialize(leaf), dtype=np.float32)
    transposed = meta.role in KERNEL_ROLES
    return (np.ascontiguousarray(w.T) if transposed else w), transposed


def bits_rules(bits: int, embed_bits: int | None, overrides: Any = None) -> select.Rules:
    """``overrides`` first (a mapping filter → bits), then embeddings/LM head, then the rest."""
    rules = list(select.Rules.of(overrides).rules) if overrides else []
    if embed_bits is not None:
        rules += [(select.Any(*(f"role:{r}" for r in EMBED_ROLES)), embed_bits)]
    return select.Rules(rules + [(True, bits)])


def bits_for(rules: select.Rules, path: str, meta: TensorMeta) -> int:
    """The width an allocation pass chose (``meta.info["allocated_bits"]``), else the one the
    first matching rule gives ``path``; an error names a path none match."""
    if "allocated_bits" in meta.info:
        return int(meta.info["allocated_bits"])
    bits = rules.get(path, meta)
    if bits is None:
        raise ValueError(f"{path}: no bits rule matches (role {meta.role}); rules: {rules}")
    return int(bits)
