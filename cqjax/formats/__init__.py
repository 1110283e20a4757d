"""Packed weight formats: the single Python source of truth for layouts.

Public API (re-exported from :mod:`cqjax.formats.cq`):

=====================  ===========================================================
name                   what
=====================  ===========================================================
LAYOUT_VERSION         version of the CQ packed layout (bumped on any byte change)
block_plan             block sizes along K (full blocks, power-of-two tail, padding)
block_offsets          start offsets of the blocks along the padded K axis
row_bytes              bytes of one packed row
stored_bytes           bytes of codes plus float16 norms for a weight
pack_codes             uint8 codes [rows, Kpad] -> packed bytes [rows, row_bytes]
unpack_codes           packed bytes -> codes (NumPy)
unpack_codes_jnp       packed bytes -> codes (JAX, jittable)
=====================  ===========================================================
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
