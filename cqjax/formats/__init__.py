"""Stored formats: the single Python source of truth for layouts, encodings and byte counts.

Passes, kernels and io read these modules; nothing here imports the rest of cqjax (only its
compiled extension, the fast rotation and packing).

=====================  ========================================================================
module                 what
=====================  ========================================================================
``cq``                 the CQ layout: block plan along K, packed codes (layout v1), byte count,
                       :data:`SUPPORTED_BITS` (the widths every packed layout stores)
``rotation``           the CQ rotation (block-local randomized Hadamard): its arrays, applying
                       it to rows (NumPy) and activations (JAX)
``rtn``                the RTN layout: blocks along K, padded code width, byte count
``encoding``           how a quantized leaf's arrays are stored and what they cost in bytes
=====================  ========================================================================

Re-exported from :mod:`cqjax.formats.cq`: ``LAYOUT_VERSION``, ``SUPPORTED_BITS``, ``block_plan``,
``block_offsets``, ``row_bytes``, ``stored_bytes``, ``pack_codes``, ``unpack_codes``,
``unpack_codes_jnp``.
"""

from __future__ import annotations

from cqjax.formats.cq import (
    LAYOUT_VERSION,
    SUPPORTED_BITS,
    block_offsets,
    block_plan,
    pack_codes,
    row_bytes,
    stored_bytes,
    unpack_codes,
    unpack_codes_jnp,
)

__all__ = [
    "LAYOUT_VERSION",
    "SUPPORTED_BITS",
    "block_offsets",
    "block_plan",
    "pack_codes",
    "row_bytes",
    "stored_bytes",
    "unpack_codes",
    "unpack_codes_jnp",
]
