"""The CQ packed format: block plan along K and the bit layout of packed codes.

This module is the single Python source of truth for the CQ layout; the C++ header
``xla_ext/include/cqjax/formats.h`` mirrors it and ``tests/golden/cq_pack_v1.json`` pins
the bytes for both.

A weight is a matrix ``w [rows, K]``; every row is quantized along its length K (linear
layer: rows = output features, K = input features; embedding: rows = tokens, K = hidden).

Block plan (:func:`block_plan`, defaults ``block=128, min_block=16``)
====================================================================
As many full ``block`` as fit, then the tail decomposed greedily into smaller powers of two
down to ``min_block``; a last remainder ``< min_block`` becomes one more ``min_block`` block
padded with zeros. ``Kpad = sum(blocks)``, ``padding = Kpad - K`` (always ``< min_block``).

=====  ==============================  =====  =======
K      blocks                          Kpad   padding
=====  ==============================  =====  =======
576    128, 128, 128, 128, 64          576    0
640    128 x 5                         640    0
100    64, 32, 16                      112    12
8      16                              16     8
=====  ==============================  =====  =======

Packed codes, ``LAYOUT_VERSION = 1`` (:func:`pack_codes`)
========================================================
Codes are uint8 in ``[0, 2**bits)``, one per padded coordinate, ``codes [rows, Kpad]``.

=========  ==========================================================================
item       layout
=========  ==========================================================================
rows       row-major: row r occupies bytes ``[r*row_bytes, (r+1)*row_bytes)``
row_bytes  ``Kpad * bits / 8``; ``Kpad`` must be a multiple of 8 (plans give 16)
1/2/4 bit  codes in K order, little-endian within a byte: code k lives in bits
           ``(k % per_byte)*bits .. +bits`` of byte ``k // per_byte``, ``per_byte = 8/bits``
3 bit      two planes, each packed as above: first the low 2 bits of every code
           (2-bit plane, ``Kpad/4`` bytes), then the high bit (1-bit plane, ``Kpad/8`` bytes);
           code = low | (high << 2)
8 bit      identity: byte k = code k
=========  ==========================================================================

Example (2 bits): codes ``[1, 2, 3, 0]`` pack to the byte ``0b00_11_10_01 = 0x39``.

Per (row, block) a float16 norm is stored beside the codes, ``[rows, nblocks]``, and per block
a float16 codebook of ``2**bits`` levels; the rotation (:mod:`cqjax.formats.rotation`) is
stored as its arrays. :func:`stored_bytes` counts all of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cqjax import _xla_ext

LAYOUT_VERSION = 1
#: Bit widths the packed layouts (CQ and RTN) store; the C++ header mirrors it (``kSupportedBits``).
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def block_plan(K: int, block: int = 128, min_block: int = 16) -> tuple[int, ...]:
    """Block sizes along K (see the table in the module docstring).

    Args:
      K: the length of each row (input features), ``K >= 1``.
      block: the main block size, a power of two.
      min_block: the smallest block, a power of two ``<= block``; a remainder shorter than
        this is padded up to it.

    Returns:
      The block sizes in K order; all are powers of two and ``sum(blocks) - K < min_block``.

    >>> block_plan(576)
    (128, 128, 128, 128, 64)
    >>> block_plan(100)
    (64, 32, 16)
    """
    if not (_is_pow2(block) and _is_pow2(min_block) and min_block <= block):
        raise ValueError(
            f"block_plan: block={block} and min_block={min_block} must be powers of two "
            "with min_block <= block"
        )
    if K < 1:
        raise ValueError(f"block_plan: K must be >= 1, got {K}")
    blocks = [block] * (K // block)
    tail = K % block
    size = block // 2
    while size >= min_block:
        if tail >= size:
            blocks.append(size)
            tail -= size
        size //= 2
    if tail:
        blocks.append(min_block)
    return tuple(blocks)


def block_offsets(blocks: Sequence[int]) -> np.ndarray:
    """Start offsets of each block along the padded K axis, plus the end: ``[nblocks + 1]``."""
    return np.concatenate([[0], np.cumsum(np.asarray(blocks, dtype=np.int64))]).astype(np.int64)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"CQ layout: bits must be one of {SUPPORTED_BITS}, got {bits}")


def row_bytes(Kpad: int, bits: int) -> int:
    """Bytes of one packed row: ``Kpad * bits / 8``; ``Kpad`` must be a multiple of 8."""
    _check_bits(bits)
    if Kpad <= 0 or Kpad % 8:
        raise ValueError(f"CQ layout: Kpad must be a positive multiple of 8, got {Kpad}")
    return Kpad * bits // 8


def stored_bytes(rows: int, K: int, bits: int, blocks: Sequence[int], *, in_scale: bool = False) -> int:
    """Bytes a CQ weight stores, every array as the artifact encodes it
    (:mod:`cqjax.formats.encoding`).

    ==========  ==============================================================
    array       bytes
    ==========  ==============================================================
    codes       ``rows * row_bytes(Kpad, bits)``
    norms       ``rows * nblocks * 2`` (float16)
    codebooks   ``nblocks * 2**bits * 2`` (float16, one row per block)
    s1, s2      ``2 * ceil(Kpad / 8)`` (one bit per sign)
    perm        ``Kpad`` (block-local uint8; ``2 * Kpad`` if a block is > 256 wide)
    in_scale    ``2 * K`` when present (float16)
    ==========  ==============================================================

    Worked example (a 40x72 kernel stored as 72 rows of K = 40, blocks (32, 16), 3 bits):
    codes ``72 * 48 * 3 / 8 = 1296``, norms ``288``, codebooks ``32``, signs ``12``, perm ``48``.

    >>> stored_bytes(72, 40, 3, (32, 16))
    1676
    """
    Kpad = int(sum(blocks))
    if Kpad < K:
        raise ValueError(f"stored_bytes: blocks {tuple(blocks)} cover {Kpad} < K={K}")
    nb = len(blocks)
    perm = Kpad * (1 if max(blocks) <= 256 else 2)
    return (rows * (row_bytes(Kpad, bits) + 2 * nb) + nb * (1 << bits) * 2 + 2 * (-(-Kpad // 8)) + perm
            + (2 * K if in_scale else 0))


def _pack_plane(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack a [rows, Kpad] plane at 1, 2 or 4 bits, little-endian within each byte."""
    per = 8 // bits
    rows, Kpad = codes.shape
    c = codes.reshape(rows, Kpad // per, per).astype(np.uint8)
    out = np.zeros((rows, Kpad // per), dtype=np.uint8)
    for j in range(per):
        out |= (c[:, :, j] << np.uint8(j * bits)).astype(np.uint8)
    return out


def _unpack_plane(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``uint8 [rows, Kpad]`` into ``uint8 [rows, row_bytes]`` (layout v1).

    Args:
      codes: integer codes in ``[0, 2**bits)``, shape ``[rows, Kpad]``, Kpad % 8 == 0.
      bits: 1, 2, 3, 4 or 8.

    Returns:
      The packed bytes, ``[rows, Kpad * bits // 8]``.

    >>> pack_codes(np.array([[1, 2, 3, 0, 0, 0, 0, 0]], np.uint8), 2).tolist()
    [[57, 0]]
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_codes: codes must be [rows, Kpad], got shape {codes.shape}")
    row_bytes(codes.shape[1], bits)  # validates bits and Kpad
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(
            f"pack_codes: codes must lie in [0, {1 << bits}) for bits={bits}, "
            f"got range [{codes.min()}, {codes.max()}]"
        )
    if codes.dtype == np.uint8:  # the C++ loop (xla_ext/include/cqjax/quantize.h)
        return _xla_ext.pack_codes(np.ascontiguousarray(codes), bits)
    return pack_codes_reference(codes.astype(np.uint8), bits)


def pack_codes_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """NumPy :func:`pack_codes` of valid uint8 codes (the reference of the C++ packer)."""
    if bits == 8:
        return codes.copy()
    if bits == 3:
        return np.concatenate([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], axis=1)
    return _pack_plane(codes, bits)


def unpack_codes(packed: np.ndarray, bits: int, Kpad: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``uint8 [rows, row_bytes] -> uint8 [rows, Kpad]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb = row_bytes(Kpad, bits)
    if packed.ndim != 2 or packed.shape[1] != nb:
        raise ValueError(
            f"unpack_codes: expected packed [rows, {nb}] for Kpad={Kpad}, bits={bits}, "
            f"got shape {packed.shape}"
        )
    if bits == 8:
        return packed.copy()
    if bits == 3:
        low = _unpack_plane(packed[:, : Kpad // 4], 2)
        high = _unpack_plane(packed[:, Kpad // 4 :], 1)
        return (low | (high << np.uint8(2))).astype(np.uint8)
    return _unpack_plane(packed, bits)


def _unpack_plane_jnp(packed, bits: int, axis: int):
    # Broadcast each byte over its ``per`` codes and shift: index arithmetic that XLA fuses into
    # the consumer (a stack or concatenate of shifted copies is materialized instead).
    import jax.numpy as jnp

    per = 8 // bits
    shape = list(packed.shape)
    wide = shape[: axis + 1] + [per] + shape[axis + 1 :]
    b = jnp.broadcast_to(jnp.expand_dims(packed, axis + 1), wide)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)).reshape([per] + [1] * (len(shape) - axis - 1))
    shape[axis] *= per
    return ((b >> shifts) & jnp.uint8((1 << bits) - 1)).reshape(shape)


def unpack_codes_jnp(packed, bits: int, Kpad: int, axis: int = -1):
    """JAX version of :func:`unpack_codes`, jittable (``bits``, ``Kpad`` and ``axis`` static).

    Args:
      packed: ``uint8`` with the ``row_bytes`` of each row along ``axis`` (any other dims).
      bits: 1, 2, 3, 4 or 8.
      Kpad: the padded row length.
      axis: the byte axis. ``-1`` (rows ``[..., row_bytes]``); ``0`` unpacks the transposed
        layout ``[row_bytes, ...]`` to ``[Kpad, ...]`` without transposing the codes, the
        orientation XLA's CPU dot reads fastest (see :meth:`CQArray.decode_kn`).

    Returns:
      ``uint8`` codes with ``Kpad`` along ``axis``, bit-identical to :func:`unpack_codes`.
    """
    import jax.numpy as jnp
    from jax import lax

    nb = row_bytes(Kpad, bits)
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    if packed.dtype != jnp.uint8 or packed.shape[axis] != nb:
        raise ValueError(
            f"unpack_codes_jnp: expected uint8 with {nb} bytes along axis {axis} for Kpad={Kpad}, "
            f"bits={bits}, got {packed.dtype} {packed.shape}"
        )
    if bits == 8:
        return packed
    if bits == 3:
        low = _unpack_plane_jnp(lax.slice_in_dim(packed, 0, Kpad // 4, axis=axis), 2, axis)
        high = _unpack_plane_jnp(lax.slice_in_dim(packed, Kpad // 4, nb, axis=axis), 1, axis)
        return low | (high << jnp.uint8(2))
    return _unpack_plane_jnp(packed, bits, axis)
