"""The Gemma 4 text decoder (transformers' ``Gemma4ForCausalLM``, ``model_type`` ``gemma4_text``),
and the ``gemma4`` family, which also imports the full model (``model_type`` ``gemma4``: the
decoder with its vision and audio towers, :mod:`cqjax.models.gemma4_multimodal`).

Gemma 4 departs from the shared :mod:`cqjax.models.transformer` decoder in ways that do not fit
its switches, so it has its own modules built from :mod:`cqjax.models.layers`:

=============================  ===========================================================
feature                        what it does (as transformers 5 computes it)
=============================  ===========================================================
norms                          RMSNorm times ``weight`` (offset 0, unlike Gemma 2/3); the
                               value norm and the router norm have no weight
attention                      q/k RMSNorm over ``head_dim``, logits scaled by 1.0, no
                               logit soft-capping
``per_layer_config``           per-layer ``head_dim`` / ``num_key_value_heads`` (full
                               layers: ``global_head_dim`` / ``num_global_key_value_heads``)
``attention_k_eq_v``           full layers have no ``v_proj``: values are the raw ``k_proj``
                               output (value-normed, not rotated)
``num_kv_shared_layers``       the last N layers have no k/v weights; each reuses the keys
                               and values of the last earlier layer of its type
``use_double_wide_mlp``        KV-shared layers have a 2x ``intermediate_size`` MLP
``enable_moe_block``           a routed mixture of experts beside the dense MLP
per-layer embeddings (PLE)     a packed ``[vocab, layers * ple_dim]`` table plus a projection
                               of the embeddings feed a gated residual into every layer
``layer_scalar``               every layer's output is multiplied by a stored scalar
``final_logit_softcapping``    ``tanh`` soft-capping of the output logits
=============================  ===========================================================

Parameter paths follow transformers' module names (``layers/0/self_attn/q_proj/kernel``,
``embed_tokens_per_layer/embedding``, ``layers/0/router/proj/kernel``). Each expert of the MoE
block is an ordinary gated MLP of 2-D ``[in, out]`` linears (role ``linear``), so every pass
quantizes the experts one by one and every kernel path runs them unchanged:

==========================================  ==================================================
IR path                                     checkpoint tensor (``meta.hf_name``)
==========================================  ==================================================
``layers/N/experts/e/gate_proj/kernel``     ``model.layers.N.experts.gate_up_proj[e][0:I]``
``layers/N/experts/e/up_proj/kernel``       ``model.layers.N.experts.gate_up_proj[e][I:2I]``
``layers/N/experts/e/down_proj/kernel``     ``model.layers.N.experts.down_proj[e]``
==========================================  ==================================================

transformers saves the experts stacked, ``gate_up_proj [E, 2I, D]`` (gate rows first) and
``down_proj [E, D, I]``; each expert is a lazy slice of them (:func:`text_hf_name`), and
:func:`cqjax.io.export.export_hf` writes the stacked tensors back. A per-expert checkpoint
(``model.layers.N.experts.e.gate_proj.weight`` ...) imports too. The router
(``router/proj``, role ``router``), ``router/scale`` and ``router/per_expert_scale`` stay float.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cqjax.errors import ConfigError
from cqjax.models import layers, registry
from cqjax.models.families import check_keys, expect
from cqjax.models.layers import rms
from cqjax.models.transformer import LAYER_TYPES, OutputHead, default_side

# transformers' Gemma4TextConfig defaults, used for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, sliding_window=512,
    final_logit_softcapping=None, use_bidirectional_attention=None, vocab_size_per_layer_input=262_144,
    hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=0,
    enable_moe_block=False, use_double_wide_mlp=False, num_experts=None, top_k_experts=None,
    moe_intermediate_size=None, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
GEMMA4_KEYS = frozenset(DEFAULTS) | {"layer_types", "rope_parameters", "per_layer_config",
                                     "global_head_dim", "num_global_key_value_heads"}
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
ROPE_ENTRY_KEYS = {"default": {"rope_type", "rope_theta"},
                   "proportional": {"rope_type", "rope_theta", "partial_rotary_factor", "factor"}}
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Layer:
    """One decoder layer's resolved shape.

    Attributes:
      layer_type: ``full_attention`` or ``sliding_attention``.
      head_dim / num_kv_heads: after ``per_layer_config`` overrides.
      kv_sharing: ``None``; ``"store"`` (its keys/values are reused by later layers of its
        type); or ``"reuse"`` (no k/v weights, reads the stored keys/values).
      k_eq_v: values are the ``k_proj`` output (no ``v_proj``).
      intermediate_size: width of the dense MLP.
    """

    layer_type: str
    head_dim: int
    num_kv_heads: int
    kv_sharing: str | None
    k_eq_v: bool
    intermediate_size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Config:
    """A Gemma 4 text config, normalized (hashable: it is static model structure)."""

    family: str = "gemma4"
    vocab_size: int
    hidden_size: int
    num_heads: int
    rms_norm_eps: float
    act: str
    attention_bias: bool
    layers: tuple[Gemma4Layer, ...]
    sliding_window: int
    rope: tuple  # ((layer_type, ((key, value), ...)), ...)
    final_softcap: float | None
    tie_word_embeddings: bool
    vocab_size_per_layer_input: int
    hidden_size_per_layer_input: int  # 0: no per-layer embeddings
    num_experts: int = 0  # 0: no MoE block
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(layer.layer_type for layer in self.layers)

    def rope_for(self, layer_type: str) -> dict[str, Any]:
        return dict(dict(self.rope)[layer_type])


def _layer_overrides(raw: dict, types: list[str], source: str) -> dict[int, dict]:
    """``per_layer_config`` as ``{layer: {key: value}}`` (built from the global keys if absent)."""
    n = len(types)
    if "per_layer_config" not in raw:  # transformers' construction from the legacy keys
        override = {"head_dim": raw.get("global_head_dim", 512)}
        if raw.get("num_global_key_value_heads") is not None and raw["attention_k_eq_v"]:
            override["num_key_value_heads"] = raw["num_global_key_value_heads"]
        return {i: dict(override) for i, t in enumerate(types) if t == "full_attention"}
    out = {}
    for key, values in (raw["per_layer_config"] or {}).items():
        try:
            i = int(key)
        except ValueError:
            raise ConfigError(f"{source}: config key 'per_layer_config' has key {key!r}; expected a layer index") from None
        if not 0 <= i < n:
            raise ConfigError(f"{source}: config key 'per_layer_config' names layer {i}; the model has {n} layers")
        for k in values:
            if k not in PER_LAYER_KEYS:
                raise ConfigError(f"{source}: config key 'per_layer_config[{key}].{k}' is not supported; "
                                  f"per-layer overrides supported: {PER_LAYER_KEYS}")
        out[i] = dict(values)
    return out


def _kv_sharing(types: list[str], num_shared: int, source: str) -> list[str | None]:
    """transformers' ``Gemma4TextConfig.kv_sharing_modes``."""
    n = len(types)
    if not 0 <= num_shared < n:
        raise ConfigError(f"{source}: config key 'num_kv_shared_layers' = {num_shared} must be in [0, {n})")
    if num_shared == 0:
        return [None] * n
    first = n - num_shared
    modes: list[str | None] = [None] * first + ["reuse"] * num_shared
    producers = types[:first]
    if set(producers) != set(types):
        raise ConfigError(f"{source}: config key 'num_kv_shared_layers' = {num_shared}: layer types "
                          f"{sorted(set(types) - set(producers))} of shared layers have no earlier layer to share from")
    for t in set(types):
        modes[first - 1 - producers[::-1].index(t)] = "store"
    return modes


def _rope(raw: dict, source: str) -> dict[str, dict]:
    params = raw.get("rope_parameters") or DEFAULT_ROPE
    if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES):
        raise ConfigError(f"{source}: config key 'rope_parameters' must map layer types {LAYER_TYPES} "
                          f"to rope parameters; got keys {sorted(params) if isinstance(params, dict) else params}")
    for t, p in params.items():
        rope_type = p.get("rope_type", "default")
        if rope_type not in ROPE_ENTRY_KEYS:
            raise ConfigError(f"{source}: config key 'rope_parameters.{t}.rope_type' = {rope_type!r} is not "
                              f"supported; allowed: {tuple(ROPE_ENTRY_KEYS)}")
        # A default-type entry's partial_rotary_factor is ignored by transformers' Gemma 4 too.
        extra = set(p) - ROPE_ENTRY_KEYS[rope_type] - ({"partial_rotary_factor"} if rope_type == "default" else set())
        if extra:
            raise ConfigError(f"{source}: config key 'rope_parameters.{t}.{sorted(extra)[0]}' is not "
                              f"supported for rope_type {rope_type!r}")
    return {t: dict(p) for t, p in params.items()}


def parse_gemma4(raw: dict, source: str) -> Gemma4Config:
    """transformers ``Gemma4TextConfig`` dict → :class:`Gemma4Config` (a ``model_type: gemma4``
    config: :func:`cqjax.models.gemma4_multimodal.parse_gemma4_multimodal`); ConfigError names
    bad keys."""
    if raw.get("model_type") == "gemma4":
        return gemma4_multimodal.parse_gemma4_multimodal(raw, source)
    check_keys(raw, GEMMA4_KEYS, source)
    raw = {**DEFAULTS, **raw}
    expect(raw, "use_bidirectional_attention", (None,), source)
    act = expect(raw, "hidden_activation", tuple(layers.ACTIVATIONS), source)
    n, heads = int(raw["num_hidden_layers"]), int(raw["num_attention_heads"])
    types = list(raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    if len(types) != n:
        raise ConfigError(f"{source}: config key 'layer_types' has {len(types)} entries for {n} layers")
    for t in types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"{source}: config key 'layer_types' has {t!r}; supported: {LAYER_TYPES}")
    types[-1] = "full_attention"  # transformers forces the last layer to full attention
    rope = _rope(raw, source)
    for t in set(types):
        if t not in rope:
            raise ConfigError(f"{source}: config key 'rope_parameters' has no entry for layer type {t!r}")
    overrides = _layer_overrides(raw, types, source)
    modes = _kv_sharing(types, int(raw["num_kv_shared_layers"]), source)
    k_eq_v = bool(raw["attention_k_eq_v"])
    inter = int(raw["intermediate_size"])
    specs = []
    for i, (t, mode) in enumerate(zip(types, modes)):
        o = overrides.get(i, {})
        spec = Gemma4Layer(
            layer_type=t, head_dim=int(o.get("head_dim", raw["head_dim"])),
            num_kv_heads=int(o.get("num_key_value_heads", raw["num_key_value_heads"])), kv_sharing=mode,
            k_eq_v=k_eq_v and t == "full_attention",
            intermediate_size=inter * (2 if raw["use_double_wide_mlp"] and mode == "reuse" else 1))
        if heads % spec.num_kv_heads:
            raise ConfigError(f"{source}: layer {i}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {spec.num_kv_heads}")
        specs.append(spec)
    for t in set(types):  # transformers resolves RoPE (and KV sharing) per layer type
        shapes = {(s.head_dim, s.num_kv_heads) for s in specs if s.layer_type == t}
        if len(shapes) > 1:
            raise ConfigError(f"{source}: config key 'per_layer_config' gives {t} layers different "
                              f"(head_dim, num_key_value_heads) {sorted(shapes)}; they must agree per layer type")
    moe = {}
    if raw["enable_moe_block"]:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not raw.get(key):
                raise ConfigError(f"{source}: config key {key!r} is required when 'enable_moe_block' is true")
        moe = dict(num_experts=int(raw["num_experts"]), top_k_experts=int(raw["top_k_experts"]),
                   moe_intermediate_size=int(raw["moe_intermediate_size"]))
        if moe["top_k_experts"] > moe["num_experts"]:
            raise ConfigError(f"{source}: config key 'top_k_experts' = {moe['top_k_experts']} exceeds "
                              f"num_experts {moe['num_experts']}")
    eos = raw.get("eos_token_id")
    softcap = raw.get("final_logit_softcapping")
    return Gemma4Config(
        vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]), num_heads=heads,
        rms_norm_eps=float(raw["rms_norm_eps"]), act=act, attention_bias=bool(raw["attention_bias"]),
        layers=tuple(specs), sliding_window=int(raw["sliding_window"]),
        rope=tuple((t, tuple(sorted(p.items()))) for t, p in sorted(rope.items())),
        final_softcap=None if softcap is None else float(softcap),
        tie_word_embeddings=bool(raw["tie_word_embeddings"]),
        vocab_size_per_layer_input=int(raw.get("vocab_size_per_layer_input") or 0),
        hidden_size_per_layer_input=int(raw.get("hidden_size_per_layer_input") or 0),
        bos_token_id=raw.get("bos_token_id"), pad_token_id=raw.get("pad_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, **moe)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma4Config, spec: Gemma4Layer, dtype=jnp.float32):
        d, hd, bias = cfg.hidden_size, spec.head_dim, cfg.attention_bias
        norm = lambda: layers.RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
        self.q_proj = layers.Linear(d, cfg.num_heads * hd, bias=bias, dtype=dtype)
        self.q_norm = norm()
        self.reuse = spec.kv_sharing == "reuse"
        if not self.reuse:  # KV-shared layers have no k/v weights
            self.k_proj = layers.Linear(d, spec.num_kv_heads * hd, bias=bias, dtype=dtype)
            self.v_proj = None if spec.k_eq_v else layers.Linear(d, spec.num_kv_heads * hd, bias=bias, dtype=dtype)
            self.k_norm = norm()
        self.o_proj = layers.Linear(cfg.num_heads * hd, d, bias=bias, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, spec.num_kv_heads, hd
        self.eps = cfg.rms_norm_eps
        self.inv_freq = tuple(layers.rope_inv_freq(cfg.rope_for(spec.layer_type), hd).tolist())
        self.window = cfg.sliding_window if spec.layer_type == "sliding_attention" else None

    def __call__(self, x, positions, valid, cache=None, shared=None, spans=None):
        """Returns ``(output, cache, kv)``; ``kv = (k, v, k_pos, k_valid)`` for layers that share.

        ``shared`` is the stored ``kv`` of this layer's producer (KV-shared layers only).
        ``spans [B, T, 2]``: on a sliding layer, a token of an image's soft tokens also sees the
        keys at the positions of its image's later tokens (``[first, last]`` of the span,
        :func:`cqjax.models.gemma4_vision.image_spans`; earlier ones stay bounded by the
        window), as transformers' ``use_bidirectional_attention="vision"``; keys are matched by
        position, so a prompt read into a KV cache gets the same mask.
        """
        b, t, _ = x.shape
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
        q = layers.apply_rope(q, positions, inv_freq)
        if self.reuse:
            k, v, k_pos, k_valid = shared
        else:
            k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
            v = k if self.v_proj is None else self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
            k = layers.apply_rope(self.k_norm(k), positions, inv_freq)
            v = rms(v, self.eps)
            k_pos, k_valid = positions, valid
            if cache is not None:
                k, v, k_pos, k_valid, cache = cache.update(k, v, positions, valid)
            else:
                k, v = layers.kv_layout(k, v)
        mask = layers.attention_mask(positions, k_pos, k_valid, self.window)
        if spans is not None and self.window is not None:
            key = k_pos[:, None, :]
            inside = (key >= spans[..., :1]) & (key <= spans[..., 1:])
            mask |= inside & k_valid[:, None, :] & (positions[:, :, None] - key < self.window)
        out = layers.dot_product_attention(q, k, v, mask, scale=1.0)
        return self.o_proj(out.reshape(b, t, -1)), cache, (k, v, k_pos, k_valid)


class Router(nnx.Module):
    """Top-k softmax router; returns dense per-expert weights ``[N, E]`` (zero off the top k)."""

    def __init__(self, cfg: Gemma4Config, dtype=jnp.float32):
        d, e = cfg.hidden_size, cfg.num_experts
        self.proj = layers.Linear(d, e, role="router", dtype=dtype)
        self.scale = nnx.Param(jnp.zeros((d,), dtype), role="other")
        self.per_expert_scale = nnx.Param(jnp.zeros((e,), dtype), role="other")
        self.eps, self.top_k, self.root = cfg.rms_norm_eps, cfg.top_k_experts, d ** -0.5

    def __call__(self, x):
        h = rms(x, self.eps) * self.scale[...].astype(x.dtype) * jnp.asarray(self.root, x.dtype)
        probs = jax.nn.softmax(self.proj(h).astype(jnp.float32), axis=-1)
        weights, index = jax.lax.top_k(probs, self.top_k)
        weights = weights / weights.sum(-1, keepdims=True)
        weights = weights * self.per_expert_scale[...].astype(jnp.float32)[index]
        return jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.float32) * weights[..., None], axis=-2)


def mixture(experts: nnx.List, x: jax.Array, weights: jax.Array) -> jax.Array:
    """``Σ_e weights[:, e] · experts[e](x)`` for tokens ``x [N, D]`` and dense router weights
    ``[N, E]`` (zero off each token's top k).

    Every expert (a :class:`cqjax.models.layers.GatedMLP`) runs on every token: exact, free of
    data-dependent shapes, at ``E / k`` times the FLOPs of a gathered implementation. The
    experts are a Python loop, so a compile traces ``3·E`` matmuls per MoE layer: fine for
    small models, slow to compile for ``E`` in the hundreds.
    """
    out = jnp.zeros_like(x)
    for e, expert in enumerate(experts):
        out = out + expert(x) * weights[:, e:e + 1].astype(x.dtype)
    return out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma4Config, spec: Gemma4Layer, dtype=jnp.float32):
        d = cfg.hidden_size
        norm = lambda dim=d: layers.RMSNorm(dim, eps=cfg.rms_norm_eps, dtype=dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, spec, dtype)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = layers.GatedMLP(d, spec.intermediate_size, act=cfg.act, dtype=dtype)
        self.post_feedforward_layernorm = norm()
        self.moe = cfg.num_experts > 0
        if self.moe:
            self.router = Router(cfg, dtype)
            self.experts = nnx.List([layers.GatedMLP(d, cfg.moe_intermediate_size, act=cfg.act, dtype=dtype)
                                     for _ in range(cfg.num_experts)])
            self.post_feedforward_layernorm_1 = norm()
            self.pre_feedforward_layernorm_2 = norm()
            self.post_feedforward_layernorm_2 = norm()
        self.ple = cfg.hidden_size_per_layer_input > 0
        if self.ple:
            p = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = layers.Linear(d, p, dtype=dtype)
            self.per_layer_projection = layers.Linear(p, d, dtype=dtype)
            self.post_per_layer_input_norm = norm()
        self.layer_scalar = nnx.Param(jnp.zeros((1,), dtype), role="other")
        self.act, self.spec = cfg.act, spec

    def __call__(self, x, per_layer_input, positions, valid, cache=None, shared=None, spans=None):
        h, cache, kv = self.self_attn(self.input_layernorm(x), positions, valid, cache, shared, spans)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            flat = x.reshape(-1, x.shape[-1])
            moe = mixture(self.experts, self.pre_feedforward_layernorm_2(flat), self.router(flat))
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            h = layers.ACTIVATIONS[self.act](self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar[...].astype(x.dtype), cache, kv


class Gemma4ForCausalLM(OutputHead, nnx.Module):
    """The Gemma 4 text model with the interface of :class:`cqjax.models.transformer.CausalLM`.

    Call with ``tokens [B, T]`` and a boolean ``mask [B, T]`` (True on real tokens); returns
    float32 logits ``[B, T, vocab]``.
    """

    def __init__(self, cfg: Gemma4Config, dtype=jnp.float32):
        d = cfg.hidden_size
        self.config = cfg
        self.embed_tokens = layers.Embed(cfg.vocab_size, d, dtype=dtype)
        p = cfg.hidden_size_per_layer_input
        if p:
            self.embed_tokens_per_layer = layers.Embed(
                cfg.vocab_size_per_layer_input, cfg.num_layers * p, role="per_layer_embedding", dtype=dtype)
            self.per_layer_model_projection = layers.Linear(d, cfg.num_layers * p, dtype=dtype)
            self.per_layer_projection_norm = layers.RMSNorm(p, eps=cfg.rms_norm_eps, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype) for spec in cfg.layers])
        self.norm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else layers.Linear(d, cfg.vocab_size, role="lm_head", dtype=dtype)
        self.dtype = dtype

    def per_layer_inputs(self, tokens, x):
        """PLE: ``(norm(proj(x) / sqrt(D)) + table[tokens] * sqrt(P)) / sqrt(2)`` as ``[B, T, L, P]``."""
        cfg = self.config
        b, t = tokens.shape
        shape = (b, t, cfg.num_layers, cfg.hidden_size_per_layer_input)
        table = self.embed_tokens_per_layer(tokens, self.dtype).reshape(shape)
        table = table * jnp.asarray(cfg.hidden_size_per_layer_input ** 0.5, self.dtype)
        proj = self.per_layer_model_projection(x) * jnp.asarray(cfg.hidden_size ** -0.5, self.dtype)
        proj = self.per_layer_projection_norm(proj.reshape(shape))
        return (proj + table) * jnp.asarray(2.0 ** -0.5, self.dtype)

    def embed(self, tokens, mask=None, positions=None):
        """``(x, side)``: scaled embeddings and ``{"positions", "valid", "ple", "shared"}`` (the
        per-layer inputs and the keys/values that KV-shared layers reuse)."""
        cfg = self.config
        x = self.embed_tokens(tokens, self.dtype) * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
        ple = self.per_layer_inputs(tokens, x) if cfg.hidden_size_per_layer_input else None
        return x, {**default_side(tokens, mask, positions), "ple": ple, "shared": {}}

    def block(self, i, x, side, cache=None, layer=None):
        """Layer ``i``; a layer that stores keys/values for KV-shared layers adds them to ``side``.
        A KV-shared layer passes its cache through unchanged."""
        layer = self.layers[i] if layer is None else layer
        spec, ple = layer.spec, side["ple"]
        x, cache, kv = layer(x, None if ple is None else ple[:, :, i], side["positions"], side["valid"],
                             cache, side["shared"].get(spec.layer_type), side.get("spans"))
        if spec.kv_sharing == "store":
            side = {**side, "shared": {**side["shared"], spec.layer_type: kv}}
        return x, side, cache


def build_gemma4(cfg: Gemma4Config, dtype=jnp.float32) -> Gemma4ForCausalLM:
    """The model of a text config, or of a multimodal one
    (:class:`cqjax.models.gemma4_multimodal.Gemma4ForConditionalGeneration`)."""
    if isinstance(cfg, gemma4_multimodal.Gemma4MultimodalConfig):
        return gemma4_multimodal.Gemma4ForConditionalGeneration(cfg, dtype)
    return Gemma4ForCausalLM(cfg, dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoint names
# ---------------------------------------------------------------------------------------------

KV_SHARED_ABSENT = ("k_proj", "v_proj", "k_norm", "v_norm")


EXPERT_STACKED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def gemma4_hf_name(path: str, cfg: Gemma4Config) -> str | list:
    """The checkpoint tensor of an IR path: :func:`text_hf_name` under ``model.``; in a
    multimodal checkpoint :func:`cqjax.models.gemma4_multimodal.hf_name` (the text model's
    tensors under ``model.language_model.``, the towers' under their own names)."""
    if isinstance(cfg, gemma4_multimodal.Gemma4MultimodalConfig):
        return gemma4_multimodal.hf_name(path, cfg)
    return text_hf_name(path, cfg, "model.")


def text_hf_name(path: str, cfg: Gemma4Config, prefix: str) -> str | list:
    """``layers/0/self_attn/q_proj/kernel`` → ``{prefix}layers.0.self_attn.q_proj.weight``.

    ``router/scale``, ``router/per_expert_scale`` and ``layer_scalar`` keep their names (they
    are bare parameters in transformers, not ``.weight`` of a submodule). An expert's linear
    ``layers/N/experts/e/{gate,up,down}_proj/kernel`` names, in order (the importer takes the
    first the checkpoint holds), its slice of transformers' stacked tensors,
    ``(model.layers.N.experts.gate_up_proj, (e, 0, I))`` for ``gate_proj`` (gate rows first),
    ``(…, (e, I, 2I))`` for ``up_proj`` and ``(model.layers.N.experts.down_proj, (e,))``; then a
    per-expert 2-D tensor ``model.layers.N.experts.e.gate_proj.weight``.

    >>> cfg = parse_gemma4({"model_type": "gemma4_text", "num_hidden_layers": 1, "enable_moe_block": True,
    ...     "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 8}, "config.json")
    >>> text_hf_name("layers/0/experts/3/up_proj/kernel", cfg, "model.")
    [('model.layers.0.experts.gate_up_proj', (3, 8, 16)), 'model.layers.0.experts.3.up_proj.weight']
    """
    parts = path.split("/")
    if parts[-1] in ("kernel", "embedding") or (parts[-1] == "scale" and parts[-2] != "router"):
        parts[-1] = "weight"
    name = ".".join(parts)
    name = name if name.startswith("lm_head.") else prefix + name
    if len(parts) == 6 and parts[0] == "layers" and parts[2] == "experts" and parts[4] in EXPERT_STACKED:
        e, i = int(parts[3]), cfg.moe_intermediate_size
        stacked = f"{prefix}layers.{parts[1]}.experts.{EXPERT_STACKED[parts[4]]}"
        index = {"gate_proj": (e, 0, i), "up_proj": (e, i, 2 * i), "down_proj": (e,)}[parts[4]]
        return [(stacked, index), name]
    return name


def gemma4_ignorable(name: str, cfg: Gemma4Config) -> bool:
    """A tied head, RoPE buffers, and k/v tensors of KV-shared layers (transformers drops them)."""
    if (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
        return True
    if isinstance(cfg, gemma4_multimodal.Gemma4MultimodalConfig) and name.startswith("model.language_model."):
        name = "model." + name[len("model.language_model."):]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" and parts[2].isdigit():
        i = int(parts[2])
        return i < cfg.num_layers and cfg.layers[i].kv_sharing == "reuse" and parts[4] in KV_SHARED_ABSENT
    return False


def gemma4_tower(path: str) -> str:
    """:func:`cqjax.models.gemma4_multimodal.tower` (``text`` for every path of a text model)."""
    return gemma4_multimodal.tower(path)


# The multimodal model builds on the text model above (so it is imported after it); the family
# registered below reads both.
from cqjax.models import gemma4_multimodal  # noqa: E402

registry.register(registry.Family(name="gemma4", model_types=("gemma4_text", "gemma4"),
                                  parse_config=parse_gemma4, build=build_gemma4,
                                  hf_name=gemma4_hf_name, ignorable=gemma4_ignorable, tower=gemma4_tower))
