"""How a quantized leaf's arrays are stored: which fields, in which encoding, how many bytes.

A quantized leaf (:mod:`cqjax.kernels.qarrays`) is a dataclass whose array fields (pytree
nodes) are stored and whose other fields are static (bits, blocks, K, ...). Every stored
array has an encoding; everything not listed below is ``raw`` (the array as it is):

==============  ===========================================================================
encoding        stored as
==============  ===========================================================================
``signs``       an int8 ±1 vector as ``np.packbits(s < 0)`` (1 bit per entry; ``s1``, ``s2``)
``block_local`` a block-local permutation as ``perm - block_start``, uint8 if every block is
                ≤ 256 wide, else uint16
==============  ===========================================================================

:func:`stored_nbytes` is what a leaf costs as stored: the one byte count behind the
artifact's ``bytes``, the bits/weight of :mod:`cqjax.quant_stats` and the allocator's sizes
(:func:`cqjax.formats.cq.stored_bytes` and :func:`cqjax.formats.rtn.stored_bytes` give the
same count from the shapes alone).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cqjax.formats.cq import block_offsets

ENCODINGS = ("raw", "signs", "block_local")


def array_fields(leaf: Any) -> list[str]:
    """The leaf's array fields that are present (an optional one, ``in_scale``, may be None)."""
    return [f.name for f in dataclasses.fields(leaf)
            if f.metadata.get("pytree_node", True) and getattr(leaf, f.name) is not None]


def static_fields(leaf: Any) -> dict[str, Any]:
    """The leaf's static fields (``bits``, ``blocks``, ``K``, ...) except its ``format`` name."""
    return {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)
            if not f.metadata.get("pytree_node", True) and f.name != "format"}


def block_starts(blocks) -> np.ndarray:
    """``[Kpad]``: the start offset of each coordinate's block."""
    return np.repeat(block_offsets(blocks)[:-1], blocks).astype(np.int64)


def encode_array(field: str, a: np.ndarray, blocks) -> tuple[np.ndarray, str]:
    """``(stored array, encoding)`` of the leaf array ``field`` (see the module table)."""
    if field in ("s1", "s2") and a.dtype == np.int8 and a.ndim == 1 and np.all(np.abs(a) == 1):
        return np.packbits(a < 0), "signs"
    if field == "perm" and a.ndim == 1 and a.size == sum(blocks):
        local = a.astype(np.int64) - block_starts(blocks)
        if local.min(initial=0) >= 0 and np.all(local < np.repeat(blocks, blocks)):
            return local.astype(np.uint8 if max(blocks) <= 256 else np.uint16), "block_local"
    return a, "raw"


def decode_array(stored: np.ndarray, encoding: str, dtype: np.dtype, shape: tuple[int, ...], blocks) -> np.ndarray:
    """Inverse of :func:`encode_array`: the leaf array of ``dtype`` and ``shape``."""
    if encoding == "raw":
        return np.asarray(stored)
    if encoding == "signs":
        n = int(np.prod(shape))
        return np.where(np.unpackbits(np.asarray(stored), count=n).astype(bool), -1, 1).astype(dtype).reshape(shape)
    if encoding == "block_local":
        return (np.asarray(stored).astype(np.int64) + block_starts(blocks)).astype(dtype).reshape(shape)
    raise ValueError(f"unknown array encoding {encoding!r}; known: {ENCODINGS}")


def encode(leaf: Any) -> dict[str, tuple[np.ndarray, str, np.ndarray]]:
    """``{field: (stored array, encoding, leaf array)}`` of a quantized leaf: exactly what an
    artifact writes for it."""
    out = {}
    for field in array_fields(leaf):
        a = np.asarray(getattr(leaf, field))
        stored, encoding = encode_array(field, a, leaf.blocks)
        out[field] = (np.ascontiguousarray(stored), encoding, a)
    return out


def stored_nbytes(leaf: Any) -> int:
    """Bytes a quantized leaf takes as stored (every array in its encoding)."""
    return sum(int(s.nbytes) for s, _, _ in encode(leaf).values())
