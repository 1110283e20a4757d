"""A quantized KV cache: each key and value head vector stored as the CQ recipe stores a weight row.

``runtime.kv_bits=8|4`` (:func:`cqjax.runtime.empty_caches`) replaces the float cache of every
attention layer by a :class:`QuantizedKVCache`:

==============  ===================================================================================
step            what
==============  ===================================================================================
rotate          one randomized Walsh–Hadamard rotation ``R`` per model over the head dim (padded to
                a power of two ``P``), applied to each new key / value vector after RoPE
store           its L2 norm (float32) and, per coordinate of the unit vector, the index of the
                nearest level: at 4 bits the 16 Lloyd–Max levels for a coordinate of a random unit
                vector in R^P (:func:`cqjax.passes.codebook_core.analytic_codebook`), codes two per
                byte, decoded by a tree of selects; at 8 bits 256 evenly spaced levels spanning
                the Lloyd–Max range (as good at that width, and decoded by a multiply-add instead
                of a 256-entry lookup)
center          the first write (the prompt) fixes a per-head mean key ``μ_k`` and value ``μ_v``
                (rotated); what is quantized is ``R k − μ_k`` and ``R v − μ_v`` (a shared offset,
                such as an attention sink's, costs no code range)
attend          in the rotated basis: the query is rotated (``(Rq)·(Rk) = q·k``); the scores use the
                centered keys (``q·μ_k`` is the same for every key, and softmax ignores it; not
                done under a score softcap, which does not), the weighted sum uses the centered
                values and adds ``μ_v`` back (the weights sum to 1), and the output is rotated back
                once (``Rᵀ (Σ p (R v − μ_v) + μ_v)``): no key or value is ever rotated back
==============  ===================================================================================

Bytes per cached head vector: ``P·bits/8 + 4`` (float32: ``4·head_dim``): 3.8x smaller at
8 bits and 7.1x at 4 bits for ``head_dim = 64``. An attention layer talks to its cache through
``query``, ``update`` and ``output``; the float :class:`cqjax.runtime.KVCache` has the same three
(``query`` and ``output`` are the identity there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cqjax.formats.rotation import make_rotation, rotate_jnp, unrotate_jnp
from cqjax.kernels.qarrays import select_levels

#: The widths a quantized cache supports.
KV_BITS = (4, 8)
#: Every ``runtime.kv_bits`` but null (float32): 16 is a bfloat16 cache
#: (:class:`cqjax.runtime.KVCache`), 8 and 4 the quantized caches of this module.
KV_WIDTHS = (16, *KV_BITS)


def _levels(P: int, bits: int) -> np.ndarray:
    """The sorted float32 levels of a unit vector's coordinate in R^P (module table)."""
    from cqjax.passes.codebook_core import analytic_codebook

    lm = analytic_codebook(P, bits)
    if bits == 4:
        return lm
    return np.linspace(lm[0], lm[-1], 256).astype(np.float32)


def _pow2(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


@struct.dataclass
class QuantizedKVCache:
    """One attention layer's keys and values, ``size`` positions, as codes and norms.

    ``pos`` / ``valid`` / ``index`` mean what they mean in :class:`cqjax.runtime.KVCache`.
    """

    k_codes: jax.Array   # uint8 [B·KV, S, P·bits/8] (heads-major, as attention reads it)
    k_norm: jax.Array    # float32 [B·KV, S]
    v_codes: jax.Array
    v_norm: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array
    k_mean: jax.Array    # float32 [B, KV, P], fixed by the first write
    v_mean: jax.Array
    levels: jax.Array    # float32 [2^bits]
    rot: tuple           # (s1, s2, perm) of the rotation over P
    bits: int = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)
    center_keys: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, bits: int, seed: int = 0,
              center_keys: bool = True) -> QuantizedKVCache:
        """An empty cache; ``bits`` in :data:`KV_BITS`; ``center_keys=False`` where the scores go
        through a softcap (a shift of the scores then matters)."""
        if bits not in KV_BITS:
            raise ValueError(f"runtime.kv_bits={bits!r}: supported {KV_BITS} (or null for a float cache)")
        P = _pow2(head_dim)
        r = make_rotation(P, (P,), seed)
        width = P * bits // 8
        codes = lambda: jnp.zeros((batch * kv_heads, size, width), jnp.uint8)  # noqa: E731
        norm = lambda: jnp.zeros((batch * kv_heads, size), jnp.float32)  # noqa: E731
        return cls(k_codes=codes(), k_norm=norm(), v_codes=codes(), v_norm=norm(),
                   pos=jnp.zeros((batch, size), jnp.int32), valid=jnp.zeros((batch, size), bool),
                   index=jnp.zeros((), jnp.int32), k_mean=jnp.zeros((batch, kv_heads, P), jnp.float32),
                   v_mean=jnp.zeros((batch, kv_heads, P), jnp.float32), levels=jnp.asarray(_levels(P, bits)),
                   rot=tuple(jnp.asarray(a) for a in (r.s1, r.s2, r.perm)), bits=bits, head_dim=head_dim,
                   center_keys=center_keys)

    @property
    def padded_dim(self) -> int:
        """``P``: the head dim padded to a power of two (the rotation's one block)."""
        return _pow2(self.head_dim)

    @property
    def _blocks(self) -> tuple[int, ...]:
        return (self.padded_dim,)

    def query(self, q: jax.Array) -> jax.Array:
        """``R q`` (``[..., head_dim] -> [..., P]``): what attends to the rotated keys."""
        return rotate_jnp(q, self.rot, self._blocks)

    def output(self, out: jax.Array) -> jax.Array:
        """``Rᵀ (out + μ_v)`` back to ``[B, T, H, head_dim]`` (``out [B, T, H, P]``)."""
        groups = out.shape[2] // self.v_mean.shape[1]
        mean = jnp.repeat(self.v_mean, groups, axis=1)[:, None]  # [B, 1, H, P]
        return unrotate_jnp(out + mean, self.rot, self._blocks, self.head_dim).astype(out.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(codes uint8 [..., P·bits/8], norms float32 [...])`` of head vectors ``x [..., head_dim]``
        (uncentered: :meth:`update` centers)."""
        return self._encode_rotated(self.query(x.astype(jnp.float32)))

    def _encode_rotated(self, xr: jax.Array) -> tuple[jax.Array, jax.Array]:
        norm = jnp.sqrt(jnp.sum(xr * xr, axis=-1))
        u = xr / jnp.where(norm > 0, norm, 1.0)[..., None]
        mids = 0.5 * (self.levels[1:] + self.levels[:-1])
        codes = jnp.searchsorted(mids, u, side="left").astype(jnp.uint8)
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return codes, norm

    def decode(self, codes: jax.Array, norm: jax.Array) -> jax.Array:
        """Rotated head vectors ``float32 [..., P]`` of :meth:`encode`'s output."""
        if self.bits == 8:  # evenly spaced: level(c) = levels[0] + c·step
            step = (self.levels[-1] - self.levels[0]) / 255.0
            return (self.levels[0] + codes.astype(jnp.float32) * step) * norm[..., None]
        codes = jnp.stack((codes & 15, codes >> 4), axis=-1).reshape(*codes.shape[:-1], -1)
        unit = select_levels(codes.reshape(1, -1), self.levels[None]).reshape(codes.shape)
        return unit * norm[..., None]

    def update(self, k, v, positions, valid):
        """Writes ``T`` new entries ``k/v [B, T, KV, head_dim]`` at ``index``; returns every slot's
        decoded rotated, centered keys ``[B·KV, P, S]`` and values ``[B·KV, S, P]`` (as
        :func:`cqjax.models.layers.dot_product_attention` reads them), positions, validity, and
        the new cache."""
        i = self.index
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=1)  # noqa: E731

        def per_head(buf, new):  # [B, T, KV, ...] -> [B·KV, T, ...]
            new = new.swapaxes(1, 2)
            return upd(buf, new.reshape(-1, *new.shape[2:]))

        kr, vr = self.query(k.astype(jnp.float32)), self.query(v.astype(jnp.float32))
        w = valid.astype(jnp.float32)[:, :, None, None]
        mean = lambda x: jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # noqa: E731
        first = i == 0
        k_mean = jnp.where(first, mean(kr), self.k_mean) if self.center_keys else self.k_mean
        v_mean = jnp.where(first, mean(vr), self.v_mean)
        kc, kn = self._encode_rotated(kr - k_mean[:, None])
        vc, vn = self._encode_rotated(vr - v_mean[:, None])
        new = self.replace(k_codes=per_head(self.k_codes, kc), k_norm=per_head(self.k_norm, kn),
                           v_codes=per_head(self.v_codes, vc), v_norm=per_head(self.v_norm, vn),
                           pos=upd(self.pos, positions), valid=upd(self.valid, valid),
                           index=i + k.shape[1], k_mean=k_mean, v_mean=v_mean)
        keys = new.decode(new.k_codes, new.k_norm).swapaxes(1, 2)
        return keys, new.decode(new.v_codes, new.v_norm), new.pos, new.valid, new

    def nbytes_per_token(self) -> int:
        """Stored bytes of one position of this layer (keys and values, all heads)."""
        heads = self.k_codes.shape[0] // self.pos.shape[0]
        return 2 * heads * (self.k_codes.shape[2] + 4)  # the means are per head, not per position


def cache_bytes_per_token(caches) -> int:
    """Bytes one position takes in a list of caches (float or quantized)."""
    return sum(c.nbytes_per_token() for c in caches)
