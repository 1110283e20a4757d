"""A Pallas kernel for the CQ lookup-matmul (accelerators), checked in interpret mode on CPU.

``y = xr @ W`` for the rotated activation ``xr [M, Kpad]`` and a CQ weight in the column layout
(:mod:`cqjax.kernels.columns`: codes ``[row_bytes, N]``, norms ``[nblocks, N]``): the grid runs
over tiles of ``tile_n`` output columns; each program unpacks its tile's codes, picks the levels
and scales them by the norms (:func:`cqjax.kernels.qarrays.decode_columns`) in on-chip memory and
multiplies, so the float weight never reaches device memory.

Tests run it with ``interpret=True`` against the plain reference on CPU; it is not on the CPU
runtime path (XLA fusions are faster there) and has not yet been measured on a GPU or TPU.

>>> y = cq_matmul(xr, codes_t, norms_t, codebooks, bits=4, blocks=(128,), interpret=True)  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cqjax.kernels.qarrays import decode_columns


@functools.partial(jax.jit, static_argnames=("bits", "blocks", "tile_n", "interpret"))
def cq_matmul(xr: jax.Array, codes_t: jax.Array, norms_t: jax.Array, codebooks: jax.Array, *, bits: int,
              blocks: tuple[int, ...], tile_n: int = 128, interpret: bool = False) -> jax.Array:
    """``xr [M, Kpad] @ W [Kpad, N]`` (float32) for a CQ weight's transposed codes ``[row_bytes, N]``,
    norms ``[nblocks, N]`` and codebooks ``[nblocks, 2**bits]``; ``N`` need not divide ``tile_n``."""
    m, n = xr.shape[0], codes_t.shape[1]
    tile_n = min(tile_n, n)
    pad = -n % tile_n
    if pad:
        codes_t = jnp.pad(codes_t, ((0, 0), (0, pad)))
        norms_t = jnp.pad(norms_t, ((0, 0), (0, pad)))

    def kernel(x_ref, c_ref, n_ref, cb_ref, o_ref):
        w = decode_columns(c_ref[...], n_ref[...], cb_ref[...], bits, blocks)
        o_ref[...] = jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)

    full = lambda shape: pl.BlockSpec(shape, lambda j: (0, 0))
    tiled = lambda rows: pl.BlockSpec((rows, tile_n), lambda j: (0, j))
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n + pad), jnp.float32),
        grid=((n + pad) // tile_n,),
        in_specs=[full(xr.shape), tiled(codes_t.shape[0]), tiled(norms_t.shape[0]), full(codebooks.shape)],
        out_specs=tiled(m),
        interpret=interpret,
    )(xr.astype(jnp.float32), codes_t, norms_t, codebooks.astype(jnp.float32))
    return y[:, :n]
