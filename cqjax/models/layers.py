"""Building blocks shared by the model families: linear, embedding, RMSNorm, LayerNorm, RoPE, attention.

Every parameter is an ``nnx.Param`` whose metadata carries its IR ``role`` (see
:mod:`cqjax.ir`), so importers and passes read roles from the model instead of guessing them
from names. Linear kernels are stored ``[in, out]``: XLA's CPU matmul is ~19x faster at batch 1
in that layout than with ``[out, in]``.

The matmul and the embedding lookup go through :func:`matmul` and :func:`embed_lookup`, the
single places where later quantized leaf types are dispatched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.kernels import backend

_NEG_INF = float(np.finfo(np.float32).min)


def matmul(x: jax.Array, kernel: Any) -> jax.Array:
    """``x @ kernel`` for a kernel stored ``[in, out]`` (a float array or a quantized leaf)."""
    if hasattr(kernel, "matmul"):
        return kernel.matmul(x)
    if backend.dot_dtype() != "float32":
        return backend.dot(x, kernel).astype(x.dtype)
    return jnp.matmul(x, kernel.astype(x.dtype))


def embed_lookup(table: Any, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``table[ids]`` (a float array or a quantized leaf that decodes only those rows)."""
    if hasattr(table, "take_rows"):
        return table.take_rows(ids).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def _zeros(shape, dtype):
    return jnp.zeros(shape, dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel`` stored ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 role: str = "linear", dtype=jnp.float32):
        self.kernel = nnx.Param(_zeros((in_features, out_features), dtype), role=role)
        self.bias = nnx.Param(_zeros((out_features,), dtype), role="bias") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """A token table ``[vocab, dim]``; also usable as a tied output head via :meth:`attend`."""

    def __init__(self, num_embeddings: int, features: int, *, role: str = "embedding",
                 dtype=jnp.float32):
        self.embedding = nnx.Param(_zeros((num_embeddings, features), dtype), role=role)

    def __call__(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        return embed_lookup(self.embedding.get_value(), ids, dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x @ table.T``: logits of a tied output head."""
        table = self.embedding.get_value()
        if hasattr(table, "attend"):
            return table.attend(x)
        if backend.dot_dtype() != "float32":
            return backend.dot(x, table, "...d,vd->...v").astype(x.dtype)
        return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype))


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + scale)``, computed in float32.

    Llama/Qwen use ``offset=0`` (the stored weight is the scale); Gemma uses ``offset=1`` (the
    stored weight is a delta from one).
    """

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, dtype=jnp.float32):
        self.scale = nnx.Param(_zeros((dim,), dtype), role="norm")
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rms(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a weight (Gemma 4's value norms, router norm and multimodal embedder), in float32."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale (+ bias)`` over the last axis, in float32."""

    def __init__(self, dim: int, *, eps: float, bias: bool = True, dtype=jnp.float32):
        self.scale = nnx.Param(_zeros((dim,), dtype), role="norm")
        self.bias = nnx.Param(_zeros((dim,), dtype), role="bias") if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        xf = xf * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            xf = xf + self.bias[...].astype(jnp.float32)
        return xf.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class GatedMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, *, act: str, bias: bool = False, dtype=jnp.float32):
        self.gate_proj = Linear(dim, hidden, bias=bias, dtype=dtype)
        self.up_proj = Linear(dim, hidden, bias=bias, dtype=dtype)
        self.down_proj = Linear(hidden, dim, bias=bias, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3", "proportional", "longrope")


def rope_inv_freq(params: Mapping[str, Any], head_dim: int, *, long: bool = False) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` for one layer type, as transformers computes them.

    Args:
      params: a transformers ``rope_parameters`` entry (``rope_type``, ``rope_theta``, and the
        type's own keys).
      head_dim: the rotated size of a head (all of it, or its rotated part: ``rotary_dim``).
      long: for ``longrope``, the ``long_factor`` set (used once a sequence is longer than
        ``original_max_position_embeddings``) instead of ``short_factor``.

    Raises:
      ValueError: for a rope type this module does not implement.
    """
    rope_type = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    if rope_type == "longrope":
        ext = np.asarray(params["long_factor" if long else "short_factor"], np.float32)
        shape = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        return (1.0 / (ext * base ** shape)).astype(np.float32)
    if rope_type == "proportional":
        # Only the first ``partial_rotary_factor`` of the head is rotated; the rest get
        # frequency 0 (cos = 1, sin = 0), exponent still taken over the whole head.
        angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv = 1.0 / base ** (np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim)
        inv = np.concatenate([inv, np.zeros(head_dim // 2 - angles, np.float32)])
        return (inv / float(params.get("factor", 1.0))).astype(np.float32)
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    inv = inv.astype(np.float32)
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return (inv / float(params["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")


def rope_attention_factor(params: Mapping[str, Any]) -> float:
    """The factor transformers multiplies ``cos`` and ``sin`` by (``longrope``'s
    ``attention_factor``, which the family importer resolves; 1 for every other type)."""
    if params.get("rope_type", "default") == "longrope":
        return float(params["attention_factor"])
    return 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotates ``x [B, T, H, D]`` by ``positions [B, T]`` (half-split layout, as transformers).

    Only the first ``2 * len(inv_freq)`` features of a head are rotated (all of them unless the
    family rotates part of the head, as phi3's ``partial_rotary_factor``); the rest pass
    through. ``scale`` multiplies ``cos`` and ``sin`` (:func:`rope_attention_factor`).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    rot = emb.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array,
                   window: int | None) -> jax.Array:
    """Boolean ``[B, T, S]``: causal, key is a real token, and (if ``window``) within it.

    A key is visible to a query when ``k_pos <= q_pos`` and, for sliding layers,
    ``q_pos - k_pos < window`` (transformers' convention).
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & k_valid[:, None, :]
    if window is not None:
        mask &= (qp - kp) < window
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          scale: float, softcap: float | None = None) -> jax.Array:
    """Grouped-query attention. ``q [B,T,H,D]``, keys ``k [B·KV,D,S]`` and values
    ``v [B·KV,S,D]`` (the layout of a KV cache: :func:`kv_layout`), ``mask [B,T,S]``.

    Both products are plain ``[rows, K] @ [K, cols]`` matmuls batched over ``B·KV``, with the
    ``H/KV`` query heads of a group and their ``T`` positions as the rows, so XLA's CPU dot
    reads a cache as it lies and XLA updates it in place. Measured on a 544-token decode step
    of SmolLM2: a sequence-major ``[B, S, KV, D]`` cache cost a transpose of every layer's whole
    cache per step, a 4-D ``[B, KV, S, D]`` one a copy (its batch of 1 is squeezed out and the
    in-place update was then duplicated into the dot's operand), and keys stored ``[S, D]``
    a repacking of every key per step (YNNPACK's dot wants them ``[D, S]``).
    Fully masked query rows (padding) give finite values, never NaN.

    A bfloat16 cache (``runtime.kv_bits=16``) arrives as its ``uint16`` bits
    (:class:`cqjax.runtime.KVCache`): a step of at most :data:`KERNEL_ATTENTION_ROWS` query
    rows per head group (decoding) reads it in the C++ kernel (``cqjax_attention_bf16``), where
    the kernel runs; elsewhere, and for a prompt, it is widened to float32 here.
    """
    b, t, h, d = q.shape
    kv = k.shape[0] // b
    g = h // kv
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, d).astype(jnp.float32)
    if k.dtype == jnp.uint16 and g * t <= KERNEL_ATTENTION_ROWS:
        out = backend.attention_bf16(qg, k, v, mask, scale=scale, softcap=softcap, jax_fn=_attend)
    else:
        out = _attend(qg, mask, k, v, scale, softcap)
    dv = v.shape[-1]
    return out.reshape(b, kv, g, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv).astype(q.dtype)


#: Query rows per head group (``H/KV`` heads × new positions) up to which a bfloat16 cache is
#: read by the C++ kernel; a prompt's many rows go through XLA's matmuls instead.
KERNEL_ATTENTION_ROWS = 16


def _widened(cache: jax.Array) -> jax.Array:
    """Cached keys or values as float32 (``uint16``: a bfloat16 cache's bits)."""
    if cache.dtype == jnp.uint16:
        cache = jax.lax.bitcast_convert_type(cache, jnp.bfloat16)
    return cache.astype(jnp.float32)


def _attend(qg, mask, k, v, scale, softcap):
    """Attention of grouped queries ``qg [B·KV, G·T, D]`` over cached ``k [B·KV, D, S]``,
    ``v [B·KV, S, Dv]`` (widened to float32) with ``mask [B, T, S]``: ``[B·KV, G·T, Dv]``."""
    b, t, s = mask.shape
    n, rows, _ = qg.shape
    kv, g = n // b, rows // t
    scores = jnp.einsum("nqd,nds->nqs", qg, _widened(k)).reshape(b, kv, g, t, s) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).reshape(n, rows, s)
    return jnp.einsum("nqs,nsd->nqd", probs, _widened(v))


def kv_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values ``[B, T, H, D]`` as :func:`dot_product_attention` reads them: keys
    ``[B·H, D, T]``, values ``[B·H, T, D]``."""
    b, t, h, d = v.shape
    return k.transpose(0, 2, 3, 1).reshape(b * h, k.shape[-1], t), v.swapaxes(1, 2).reshape(b * h, t, d)
