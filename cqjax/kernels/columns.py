"""The pure-JAX runtime layout of CQ weights: the packed codes column-major, in tiles.

:class:`~cqjax.kernels.qarrays.CQArray` keeps codes row by row (``[rows, row_bytes]``, the
artifact layout the C++ kernel reads). The pure-JAX path (TPU, GPU, ``CQJAX_KERNEL=jax``)
decodes a weight on every call, and XLA's CPU dot reads a ``[K, N]`` weight ~19x faster than
``[N, K]`` at batch 1; transposing the codes on every call costs as much as the decode.
:class:`CQColumns` holds the same bytes transposed once, tiled over output columns:

==========  ==========================  ====================================================
field       shape                       what
==========  ==========================  ====================================================
codes       ``[tiles, row_bytes, tile]``  packed codes of columns ``t*tile .. (t+1)*tile``
norms       ``[tiles, nblocks, tile]``    their per-block norms (zero on padding columns)
==========  ==========================  ====================================================

A matmul decodes one tile at a time, so a wide weight, such as a tied output head
of 49k-262k rows, never materializes its whole float decode. :func:`to_columns` builds it from
a ``CQArray``; it is a runtime form only (artifacts and passes keep rows), made by
:func:`cqjax.runtime.prepare` for the leaves that run in pure JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cqjax.formats import rotation
from cqjax.kernels import backend
from cqjax.kernels.qarrays import CQArray, InputScaleMixin, decode_columns, decode_rows, tied_to

TILE = 4096
"""Output columns per tile: a tile's float decode (``Kpad x TILE``) stays within the L3 cache."""


@struct.dataclass
class CQColumns(InputScaleMixin):
    """A CQ leaf in the column-tiled layout (see the module docstring); the other fields are
    :class:`~cqjax.kernels.qarrays.CQArray`'s."""

    codes: jax.Array
    norms: jax.Array
    codebooks: jax.Array
    s1: jax.Array
    s2: jax.Array
    perm: jax.Array
    bits: int = struct.field(pytree_node=False)
    blocks: tuple[int, ...] = struct.field(pytree_node=False)
    K: int = struct.field(pytree_node=False)
    rows: int = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False)
    in_scale: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.K, self.rows) if self.transposed else (self.rows, self.K)

    @property
    def tile(self) -> int:
        return self.codes.shape[-1]

    def _dot(self, x):
        xr = rotation.rotate_jnp(self.scale_input(x.astype(jnp.float32)), (self.s1, self.s2, self.perm), self.blocks)
        outs, after = [], xr
        for t in range(self.codes.shape[0]):
            # Each tile's decode waits for the previous tile's product (and the first for the
            # activation), so one tile's float decode is live at a time. Unrolled: XLA's CPU
            # backend runs a lax.map over tiles ~9x slower.
            w = decode_columns(tied_to(self.codes[t], after), self.norms[t], self.codebooks, self.bits, self.blocks)
            after = backend.dot(xr, w)
            outs.append(after)
        y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
        return y[..., : self.rows]

    def matmul(self, x):
        assert self.transposed, "matmul is for kernels [K, N]; use attend for tables"
        return self._dot(x).astype(x.dtype)

    def attend(self, x):
        return self._dot(x).astype(x.dtype)

    def take_rows(self, ids):
        """Decoded rows ``T[ids]`` (float32): only the gathered columns' codes are read."""
        ids = jnp.asarray(ids)
        t, c = ids // self.tile, ids % self.tile
        rows = decode_rows(self.codes[t, :, c], self.norms[t, :, c], self.codebooks, self.bits, self.blocks)
        return self.unscale_rows(rotation.unrotate_jnp(rows, (self.s1, self.s2, self.perm), self.blocks)[..., : self.K])


def to_columns(q: CQArray, tile: int = TILE) -> CQColumns:
    """``q`` in the column-tiled layout (tiles of ``min(tile, rows)`` columns; the last one
    zero-padded)."""
    rows = q.codes.shape[0]
    tile = min(tile, rows)
    tiles = -(-rows // tile)
    pad = tiles * tile - rows

    def tiled(a):  # [rows, m] -> [tiles, m, tile]
        a = jnp.pad(a, ((0, pad), (0, 0)))
        return jnp.transpose(a.reshape(tiles, tile, a.shape[1]), (0, 2, 1))

    return CQColumns(codes=tiled(q.codes), norms=tiled(q.norms), codebooks=q.codebooks, s1=q.s1, s2=q.s2,
                     perm=q.perm, bits=q.bits, blocks=q.blocks, K=q.K, rows=rows, transposed=q.transposed,
                     in_scale=q.in_scale)
