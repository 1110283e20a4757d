"""Straight-through re-assignment of CQ codes while a block is tuned (``Tune.recode_lr > 0``).

The block stage of :class:`cqjax.passes.tune.Tune` holds codes fixed unless asked. With
``recode_lr > 0`` each CQ kernel of the block gets a latent ``u [rows, Kpad]`` (float32, in the
units of its levels) started at its decoded levels ``c[code]``. The forward pass uses
``c[nearest(u)]``, the nearest level of ``u`` under the leaf's current (tuned) codebook, and the
gradient reaches ``u`` as if that rounding were the identity (the straight-through estimator);
the codebook gets the gradient of the positions that pick each level, the norms theirs as
before. A latent is ``u0 + rms(c) · t`` and Adam moves ``t`` by about ``recode_lr`` per step,
so a code changes only where the gradient keeps pushing its latent past the midpoint to a
neighbouring level. At the end the codes are the latents' nearest levels under the stored
(fp16) codebook, packed as before: the format and the kernels do not change.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cqjax.formats import cq as fmt
from cqjax.kernels import backend
from cqjax.kernels.qarrays import CQArray, expand_blocks
from cqjax.passes.tune_core import leaf_name


def _is_cq(x) -> bool:
    return isinstance(x, CQArray)


def _position_levels(leaf: CQArray) -> jax.Array:
    """float32 ``[Kpad, 2**bits]``: the levels each position of a row chooses from."""
    return expand_blocks(leaf.codebooks.astype(jnp.float32), leaf.blocks, axis=0)


def nearest(u: jax.Array, leaf: CQArray) -> jax.Array:
    """int32 ``[rows, Kpad]``: the index of each latent's nearest level under ``leaf``'s codebook."""
    return jnp.argmin(jnp.abs(u[..., None] - _position_levels(leaf)), axis=-1).astype(jnp.int32)


@struct.dataclass
class Relaxed:
    """A CQ kernel whose codes follow a latent (a linear's ``matmul`` sees it as a kernel).

    Attributes:
      leaf: the CQ leaf (its norms and codebooks possibly tuned; its codes are not read).
      u: float32 ``[rows, Kpad]`` latent levels.
    """

    leaf: CQArray
    u: jax.Array

    def matmul(self, x):
        leaf = self.leaf
        levels = _position_levels(leaf)
        idx = nearest(jax.lax.stop_gradient(self.u), leaf)
        hard = jnp.take_along_axis(jnp.broadcast_to(levels, idx.shape + levels.shape[-1:]), idx[..., None], -1)[..., 0]
        rows = (hard + self.u - jax.lax.stop_gradient(self.u)) * expand_blocks(leaf.norms.astype(jnp.float32), leaf.blocks)
        xr = leaf.rotate_activation(leaf.scale_input(x.astype(jnp.float32)))
        return backend.dot(xr, rows.T).astype(x.dtype)


def latents(state, choose: Callable[[str, str | None], bool], prefix: str) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{path in state: (u0 [rows, Kpad], scale)}`` for each CQ kernel in ``state`` (a block's,
    at IR path ``prefix + path``) whose codebook ``choose`` tunes: its decoded levels and their
    rms. Paths are relative so that blocks of one structure share one compiled step."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_cq)[0]:
        path = leaf_name(kp)[0]
        if _is_cq(leaf) and leaf.transposed and choose(prefix + path, "codebooks"):
            u0 = leaf.decode_rows(leaf.codes, jnp.ones_like(leaf.norms))
            out[path] = (u0, jnp.sqrt(jnp.mean(leaf.codebooks.astype(jnp.float32) ** 2)))
    return out


def relax(state, lat: dict, t: dict):
    """``state`` with each CQ kernel of ``lat`` as a :class:`Relaxed` at offsets ``t`` (differentiable)."""

    def one(kp, leaf):
        path = leaf_name(kp)[0]
        if _is_cq(leaf) and path in lat:
            u0, scale = lat[path]
            return Relaxed(leaf, u0 + scale * t[path])
        return leaf

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_cq)


def harden(state, lat: dict, t: dict) -> tuple:
    """``(state, codes, changed)``: ``state`` with each CQ kernel of ``lat`` re-coded to its
    latent's nearest stored (fp16) level; ``{path: packed uint8 codes}``; the fraction of codes
    that changed."""
    codes, counts = {}, [0, 0]

    def one(kp, leaf):
        path = leaf_name(kp)[0]
        if not (_is_cq(leaf) and path in lat):
            return leaf
        u0, scale = lat[path]
        stored = leaf.replace(codebooks=leaf.codebooks.astype(jnp.float16))
        new = np.asarray(nearest(u0 + scale * t[path], stored), np.uint8)
        old = fmt.unpack_codes(np.asarray(leaf.codes), leaf.bits, sum(leaf.blocks))
        counts[0] += int(np.count_nonzero(new != old))
        counts[1] += new.size
        codes[path] = fmt.pack_codes(new, leaf.bits)
        return leaf.replace(codes=jnp.asarray(codes[path]))

    state = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_cq)
    return state, codes, counts[0] / max(counts[1], 1)
