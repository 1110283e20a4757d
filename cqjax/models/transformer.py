"""A decoder-only transformer that covers the llama, qwen2, qwen3, qwen3_moe, gemma3, mistral,
phi3 and gemma2 families.

Families differ only in the switches of :class:`DecoderConfig` (see the table there); each
family's importer (:mod:`cqjax.models.families`) translates a Hugging Face config into one.

Parameter paths (the IR paths) follow transformers' module names, with ``kernel`` for linear
weights stored ``[in, out]``, ``embedding`` for tables and ``scale`` for norm weights, e.g.
``layers/0/self_attn/q_proj/kernel``, ``embed_tokens/embedding``, ``norm/scale``. A sparse MoE
layer (qwen3_moe) holds its router at ``layers/0/mlp/gate/kernel`` (role ``router``, kept float)
and each expert as an ordinary gated MLP, ``layers/0/mlp/experts/3/{gate,up,down}_proj/kernel``,
so every pass quantizes an expert like any other 2-D linear (:class:`SparseMoE`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cqjax.models import layers

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Everything the decoder needs, normalized from a family's Hugging Face config.

    =====================  =========================================================  ==========
    switch                 effect                                                     used by
    =====================  =========================================================  ==========
    ``norm_offset``        RMSNorm multiplies by ``offset + weight``                  gemma: 1
    ``qkv_bias``           biases on q/k/v projections                                qwen2
    ``o_bias``             bias on the output projection                              llama opt.
    ``qk_norm``            RMSNorm over head_dim on q and k before RoPE               qwen3, gemma3
    ``sandwich_norms``     extra norms after attention and around the MLP             gemma2, gemma3
    ``embed_scale``        token embeddings multiplied by this                        gemma: √d
    ``query_scale``        attention logits multiplied by this                        all
    ``attn_softcap``       ``tanh`` soft-capping of attention logits                  gemma2
    ``final_softcap``      ``tanh`` soft-capping of output logits                     gemma2, gemma3
    ``layer_types``        per layer: full or sliding-window attention                qwen, gemma, …
    ``sliding_window``     a sliding layer's query sees keys ``q - k < window``       mistral, …
    ``rope``               per layer type: transformers ``rope_parameters``           all
    ``rotary_dim``         RoPE rotates only a head's first ``rotary_dim`` features   phi3 partial
    ``moe_layers``         indices of layers whose MLP is a :class:`SparseMoE`        qwen3_moe
    ``num_experts``        experts per MoE layer, each ``moe_intermediate_size`` wide qwen3_moe
    ``top_k_experts``      experts a token is routed to                               qwen3_moe
    ``norm_topk_prob``     top-k router weights renormalized to sum to 1              qwen3_moe
    =====================  =========================================================  ==========

    A ``longrope`` rope entry (phi3) carries both factor sets: a call whose largest position
    is at least ``original_max_position_embeddings`` uses ``long_factor``, as transformers
    decides per forward call (``max(position_ids) + 1 > original``).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    act: str
    norm_offset: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    embed_scale: float | None = None
    query_scale: float
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    rope: Mapping[str, Mapping[str, Any]] | tuple
    rotary_dim: int | None = None
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        # Stored as nested tuples so the config is hashable (it is static model structure).
        object.__setattr__(self, "rope", tuple(
            (t, tuple(sorted(dict(p).items()))) for t, p in dict(self.rope).items()))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if self.moe_layers and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ValueError(f"MoE layers need 0 < top_k_experts ({self.top_k_experts}) <= num_experts "
                             f"({self.num_experts}) and moe_intermediate_size > 0 ({self.moe_intermediate_size})")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} name layers outside 0..{self.num_layers - 1}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                raise ValueError(f"layer type {t!r} is not supported; supported: {LAYER_TYPES}")
            if t not in dict(self.rope):
                raise ValueError(f"no rope parameters for layer type {t!r}")
        if self.act not in layers.ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported; supported: {tuple(layers.ACTIVATIONS)}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


    def rope_for(self, layer_type: str) -> dict[str, Any]:
        """The transformers ``rope_parameters`` entry of one layer type."""
        return dict(dict(self.rope)[layer_type])


class Attention(nnx.Module):
    #: Talks to its cache through ``query`` / ``update`` / ``output`` (a quantized cache works).
    rotated_cache = True

    def __init__(self, cfg: DecoderConfig, layer_type: str, dtype=jnp.float32):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = layers.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = layers.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = layers.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = layers.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
            self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        rope, rot = cfg.rope_for(layer_type), cfg.rotary_dim or hd
        self.inv_freq = tuple(layers.rope_inv_freq(rope, rot).tolist())
        self.rope_scale = layers.rope_attention_factor(rope)
        longrope = rope.get("rope_type") == "longrope"
        self.long_inv_freq = tuple(layers.rope_inv_freq(rope, rot, long=True).tolist()) if longrope else None
        self.rope_switch = int(rope["original_max_position_embeddings"]) if longrope else None
        self.window = cfg.sliding_window if layer_type == "sliding_attention" else None
        self.scale, self.softcap = cfg.query_scale, cfg.attn_softcap

    def __call__(self, x, positions, valid, cache=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if self.long_inv_freq is not None:  # longrope: one factor set per call, as transformers
            inv_freq = jnp.where(jnp.max(positions) >= self.rope_switch,
                                 jnp.asarray(self.long_inv_freq, jnp.float32), inv_freq)
        q = layers.apply_rope(q, positions, inv_freq, self.rope_scale)
        k = layers.apply_rope(k, positions, inv_freq, self.rope_scale)
        k_pos, k_valid = positions, valid
        if cache is not None:  # a quantized cache attends in its rotated basis (cqjax.kv_cache)
            q = cache.query(q)
            k, v, k_pos, k_valid, cache = cache.update(k, v, positions, valid)
        else:
            k, v = layers.kv_layout(k, v)
        mask = layers.attention_mask(positions, k_pos, k_valid, self.window)
        out = layers.dot_product_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        if cache is not None:
            out = cache.output(out)
        return self.o_proj(out.reshape(b, t, -1)), cache


class SparseMoE(nnx.Module):
    """A top-k routed mixture of gated-MLP experts (transformers' ``Qwen3MoeSparseMoeBlock``).

    ``gate`` is the router ``[D, E]`` (role ``router``); ``experts[e]`` is an ordinary
    :class:`cqjax.models.layers.GatedMLP`, so quantization sees ``3·E`` plain 2-D linears per
    layer and quantizes each expert on its own. Routing, as transformers computes it:

    ============================  ===================================================
    step                          value
    ============================  ===================================================
    router logits                 ``x @ gate`` (in the activation dtype)
    probabilities                 ``softmax(logits)`` in float32 over all ``E`` experts
    top-k                         the ``k`` largest probabilities (``lax.top_k``)
    ``norm_topk_prob``            those ``k`` divided by their sum
    output                        ``Σ_e w_e · expert_e(x)``, ``w_e = 0`` off the top k
    ============================  ===================================================

    Every expert runs on every token, weighted by the dense router weights (zero for the
    unselected): exact, and free of data-dependent shapes, at ``E / k`` times the FLOPs of a
    gathered implementation. The experts are a Python loop, so a compile traces ``3·E``
    matmuls per MoE layer: fine for small models, slow to compile for ``E`` in the hundreds.
    """

    def __init__(self, cfg: DecoderConfig, dtype=jnp.float32):
        d, e = cfg.hidden_size, cfg.num_experts
        self.gate = layers.Linear(d, e, role="router", dtype=dtype)
        self.experts = nnx.List([layers.GatedMLP(d, cfg.moe_intermediate_size, act=cfg.act, dtype=dtype)
                                 for _ in range(e)])
        self.top_k, self.norm_topk_prob = cfg.top_k_experts, cfg.norm_topk_prob

    def router_weights(self, x):
        """Dense routing weights ``[..., E]`` (zero off each token's top k), in ``x``'s dtype."""
        logits = self.gate(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top = top / top.sum(-1, keepdims=True)
        top = top.astype(logits.dtype)
        return jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=top.dtype) * top[..., None], axis=-2)

    def __call__(self, x):
        weights = self.router_weights(x).astype(x.dtype)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., e:e + 1]
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_type: str, dtype=jnp.float32, *, moe: bool = False):
        norm = lambda: layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_type, dtype)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        self.mlp = SparseMoE(cfg, dtype) if moe else layers.GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.act, bias=cfg.mlp_bias, dtype=dtype)

    def __call__(self, x, positions, valid, cache=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, valid, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class OutputHead:
    """What every causal LM family shares: the block loop, the output head and ``__call__``.

    A family provides ``embed_tokens``, ``lm_head`` (None when tied), ``norm``, ``layers``,
    ``config.final_softcap`` and two methods, so that block-wise passes (tuning) can run one
    block at a time:

    ============================================  ==================================================
    method                                        returns
    ============================================  ==================================================
    ``embed(tokens, mask, positions)``            ``(x [B, T, D], side)``: the first block's input and
                                                  the side inputs blocks read (a pytree)
    ``block(i, x, side, cache=None, layer=None)``  ``(x, side, cache)`` after block ``i``; ``layer``
                                                  stands in for ``layers[i]`` (then ``i`` may be a
                                                  traced index: one compile serves every block of a
                                                  structure)
    ============================================  ==================================================
    """

    def hidden_states(self, tokens, mask=None, positions=None, caches=None, **inputs):
        """Final-norm hidden states ``[B, T, D]`` (and the updated caches if given); ``inputs``
        go to ``embed`` (a multimodal family's images)."""
        x, side = self.embed(tokens, mask, positions, **inputs)
        new_caches = []
        for i in range(len(self.layers)):
            x, side, c = self.block(i, x, side, None if caches is None else caches[i])
            new_caches.append(c)
        return self.norm(x), (None if caches is None else new_caches)

    def logits(self, h):
        cfg = self.config
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        out = out.astype(jnp.float32)
        if cfg.final_softcap is not None:
            out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
        return out

    def __call__(self, tokens, mask=None, positions=None, **inputs):
        h, _ = self.hidden_states(tokens, mask, positions, **inputs)
        return self.logits(h)


class CausalLM(OutputHead, nnx.Module):
    """The decoder with its token embedding and output head.

    Call with ``tokens [B, T]`` and a boolean ``mask [B, T]`` (True on real tokens); positions
    default to ``0..T-1`` on every row (transformers' default). Returns float32 logits
    ``[B, T, vocab]``.
    """

    def __init__(self, cfg: DecoderConfig, dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, t, dtype, moe=i in cfg.moe_layers)
                                  for i, t in enumerate(cfg.layer_types)])
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else layers.Linear(
            cfg.hidden_size, cfg.vocab_size, role="lm_head", dtype=dtype)
        self.dtype = dtype

    def embed(self, tokens, mask=None, positions=None):
        """``(x, side)``: scaled token embeddings and ``{"positions", "valid"}`` (see :class:`OutputHead`)."""
        x = self.embed_tokens(tokens, self.dtype)
        if self.config.embed_scale is not None:
            x = x * jnp.asarray(self.config.embed_scale, self.dtype)
        return x, default_side(tokens, mask, positions)

    def block(self, i, x, side, cache=None, layer=None):
        layer = self.layers[i] if layer is None else layer
        x, cache = layer(x, side["positions"], side["valid"], cache)
        return x, side, cache


def default_side(tokens, mask=None, positions=None) -> dict:
    """``{"positions", "valid"}``: positions ``0..T-1`` on every row and all-valid by default."""
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return {"positions": positions, "valid": mask.astype(bool)}

