"""The RTN (round-to-nearest) stored layout: blocks along K, packed codes, fp16 scale and zero.

A weight ``w [rows, K]`` is cut along K into ``K // block`` full blocks and a shorter last one
(no padding of the blocks, :func:`blocks`). Codes are uint8 in ``[0, 2**bits)``, packed with
the CQ bit layout (:func:`cqjax.formats.cq.pack_codes`) over ``Kpad = ceil8(K)``
(:func:`kpad`; the pad codes are zero). Per (row, block) a float16 ``scale`` and ``zero``:

==========  ====================================================================
stored      value
==========  ====================================================================
codes       uint8 ``[rows, row_bytes(Kpad, bits)]``
scales      float16 ``[rows, nblocks]``
zeros       float16 ``[rows, nblocks]`` (the block minimum, not an integer zero-point)
in_scale    optional float16 ``[K]`` input scales (see :mod:`cqjax.formats.encoding`)
==========  ====================================================================

Decoding: ``ŵ = code · scale + zero`` in float32.
"""

from __future__ import annotations

from cqjax.formats.cq import row_bytes


def blocks(K: int, block: int = 128) -> tuple[int, ...]:
    """Block sizes for RTN: ``K // block`` full blocks, then a shorter last block if any.

    >>> blocks(300, 128)
    (128, 128, 44)
    """
    if K < 1 or block < 1:
        raise ValueError(f"rtn blocks: need K >= 1 and block >= 1, got K={K}, block={block}")
    return (block,) * (K // block) + ((K % block,) if K % block else ())


def kpad(K: int) -> int:
    """RTN codes are packed over K rounded up to a multiple of 8 (the packer's unit)."""
    return -(-K // 8) * 8


def stored_bytes(rows: int, K: int, bits: int, block: int = 128, *, in_scale: bool = False) -> int:
    """Bytes an RTN weight stores: packed codes, fp16 scales and zeros (and ``in_scale``).

    >>> stored_bytes(4, 300, 3, 128)   # codes 4 * 114 + scales/zeros 2 * 4 * 3 * 2
    504
    """
    nb = len(blocks(K, block))
    return rows * (row_bytes(kpad(K), bits) + 2 * 2 * nb) + (2 * K if in_scale else 0)
