"""Hugging Face config → :class:`DecoderConfig` for the llama, qwen2, qwen3, qwen3_moe, gemma3,
mistral, phi3 and gemma2 families.

Each family lists every config key it understands. A key outside that list, or a value that
would change the model in a way cqjax does not implement, raises :class:`ConfigError` naming
the key: silently ignoring a key risks a model that imports fine and computes the wrong thing.
"""

from __future__ import annotations

import math
from typing import Any

from cqjax.errors import ConfigError
from cqjax.models import registry
from cqjax.models.transformer import LAYER_TYPES, CausalLM, DecoderConfig

# Keys of transformers' base config and of generation/serialization bookkeeping: they do not
# change the forward pass.
GENERIC_KEYS = frozenset({
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
    "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "transformers_version", "use_cache", "initializer_range", "attention_dropout",
    "max_position_embeddings", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "tie_word_embeddings", "tokenizer_class", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16",
    "torchscript", "pruned_heads", "finetuning_task", "task_specific_params", "prefix",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "tie_encoder_decoder", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_sliding_window_pattern",
})

ROPE_KEYS = frozenset({"rope_theta", "rope_scaling", "rope_parameters"})


def bookkeeping(key: str) -> bool:
    """Whether a config key is bookkeeping that no family's math reads: transformers' private
    ``_``-prefixed keys (``_name_or_path``, ``_commit_hash``, a saved ``_model_name_or_path``)
    and ``*_version`` stamps."""
    return key.startswith("_") or key.endswith("_version")


def check_keys(raw: dict, allowed: frozenset[str], source: str) -> None:
    """Raises ConfigError naming the first key of ``raw`` that is neither generic, bookkeeping
    (:func:`bookkeeping`) nor allowed.

    ``quantization_config`` is accepted here: a checkpoint dequantized to float keeps it as
    stale metadata; the importer refuses the checkpoint only if a tensor it reads is not
    floating point (:func:`cqjax.io.hf.import_checkpoint`), i.e. really still quantized."""
    unknown = sorted(k for k in set(raw) - GENERIC_KEYS - allowed - {"quantization_config"} if not bookkeeping(k))
    if unknown:
        raise ConfigError(f"{source}: config key {unknown[0]!r} is not understood by the "
                          f"{raw.get('model_type')} importer (unknown keys: {unknown})")


def require(raw: dict, key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise ConfigError(f"{source}: config key {key!r} is required")
    return raw[key]


def expect(raw: dict, key: str, allowed: tuple, source: str, default: Any = None) -> Any:
    """Returns ``raw[key]`` (or ``default``), raising ConfigError if it is not in ``allowed``."""
    value = raw.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{source}: config key {key!r} = {value!r} is not supported; allowed: {allowed}")
    return value


def rope_parameters(raw: dict, source: str, *, local_theta: float | None = None) -> dict[str, dict]:
    """Per-layer-type rope parameters from either transformers 5 or legacy config keys."""
    params = raw.get("rope_parameters")
    if params is None:
        scaling = dict(raw.get("rope_scaling") or {})
        if "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        params = {"rope_type": "default", **scaling, "rope_theta": raw.get("rope_theta", 10000.0)}
        out = {t: dict(params) for t in LAYER_TYPES}
        if local_theta is not None:
            out["sliding_attention"] = {"rope_type": "default", "rope_theta": local_theta}
        return out
    if set(params) <= set(LAYER_TYPES):
        out = {t: dict(p) for t, p in params.items()}
        for t in LAYER_TYPES:
            out.setdefault(t, out[next(iter(out))])
        return out
    return {t: dict(params) for t in LAYER_TYPES}


def _token_ids(raw: dict) -> dict:
    eos = raw.get("eos_token_id")
    return dict(bos_token_id=raw.get("bos_token_id"), pad_token_id=raw.get("pad_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def _common(raw: dict, source: str) -> dict:
    heads = require(raw, "num_attention_heads", source)
    hidden = require(raw, "hidden_size", source)
    if raw.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{source}: config key 'pretraining_tp' = {raw['pretraining_tp']} is not supported; allowed: (1,)")
    return dict(
        vocab_size=require(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=require(raw, "intermediate_size", source),
        num_layers=require(raw, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **_token_ids(raw),
    )


def _sliding(raw: dict, n_layers: int) -> tuple[tuple[str, ...], int | None]:
    """Layer types of qwen-style configs (sliding window only when ``use_sliding_window``)."""
    if not raw.get("use_sliding_window", False):
        return ("full_attention",) * n_layers, None
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= raw.get("max_window_layers", n_layers) else "full_attention"
        for i in range(n_layers)]
    return tuple(types), raw.get("sliding_window")


LLAMA_KEYS = frozenset({"hidden_act", "hidden_size", "intermediate_size", "num_attention_heads",
                        "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps",
                        "attention_bias", "mlp_bias", "vocab_size", "pretraining_tp"}) | ROPE_KEYS


def parse_llama(raw: dict, source: str) -> DecoderConfig:
    check_keys(raw, LLAMA_KEYS, source)
    c = _common(raw, source)
    bias = bool(raw.get("attention_bias", False))
    return DecoderConfig(
        family="llama", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        qkv_bias=bias, o_bias=bias, mlp_bias=bool(raw.get("mlp_bias", False)),
        query_scale=c["head_dim"] ** -0.5, layer_types=("full_attention",) * c["num_layers"],
        rope=rope_parameters(raw, source), **c)


QWEN_KEYS = frozenset({"hidden_act", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "vocab_size",
                       "use_sliding_window", "sliding_window", "max_window_layers",
                       "layer_types"}) | ROPE_KEYS


def parse_qwen2(raw: dict, source: str) -> DecoderConfig:
    check_keys(raw, QWEN_KEYS, source)
    c = _common(raw, source)
    types, window = _sliding(raw, c["num_layers"])
    return DecoderConfig(
        family="qwen2", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        qkv_bias=True, query_scale=c["head_dim"] ** -0.5, layer_types=types, sliding_window=window,
        rope=rope_parameters(raw, source), **c)


def parse_qwen3(raw: dict, source: str) -> DecoderConfig:
    check_keys(raw, QWEN_KEYS | {"head_dim", "attention_bias"}, source)
    c = _common(raw, source)
    types, window = _sliding(raw, c["num_layers"])
    bias = bool(raw.get("attention_bias", False))
    return DecoderConfig(
        family="qwen3", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        qkv_bias=bias, o_bias=bias, qk_norm=True, query_scale=c["head_dim"] ** -0.5,
        layer_types=types, sliding_window=window, rope=rope_parameters(raw, source), **c)


QWEN3_MOE_KEYS = (QWEN_KEYS - {"layer_types"}) | {
    "head_dim", "attention_bias", "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
    "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
    "router_aux_loss_coef", "output_router_logits"}  # the last two only train the router


def parse_qwen3_moe(raw: dict, source: str) -> DecoderConfig:
    """Qwen3-MoE: qwen3 attention, and on every ``decoder_sparse_step``-th layer not listed in
    ``mlp_only_layers`` a top-k routed mixture of experts (:class:`cqjax.models.transformer.SparseMoE`).

    transformers 5 saves the expert count as ``num_local_experts`` (``num_experts`` is its
    alias; older configs use that name). Its Qwen3-MoE slides the attention window on every
    layer when ``use_sliding_window`` (``max_window_layers`` is read by no layer, and a
    ``layer_types`` list is refused as unknown, since transformers' Qwen3-MoE ignores it).
    """
    check_keys(raw, QWEN3_MOE_KEYS, source)
    c = _common(raw, source)
    n = c["num_layers"]
    given = {k: raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(set(given.values())) > 1:
        raise ConfigError(f"{source}: config keys 'num_experts' and 'num_local_experts' disagree ({given})")
    experts = int(next(iter(given.values()), 0))
    step = int(raw.get("decoder_sparse_step", 1))
    if step < 1:
        raise ConfigError(f"{source}: config key 'decoder_sparse_step' = {step} must be at least 1")
    only = set(raw.get("mlp_only_layers") or ())
    moe = tuple(i for i in range(n) if experts > 0 and i not in only and (i + 1) % step == 0)
    top_k = int(require(raw, "num_experts_per_tok", source)) if moe else 0
    if moe and not 0 < top_k <= experts:
        raise ConfigError(f"{source}: config key 'num_experts_per_tok' = {top_k} must be in 1..{experts} (the experts)")
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    bias = bool(raw.get("attention_bias", False))
    return DecoderConfig(
        family="qwen3_moe", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        qkv_bias=bias, o_bias=bias, qk_norm=True, query_scale=c["head_dim"] ** -0.5,
        layer_types=("full_attention" if window is None else "sliding_attention",) * n, sliding_window=window,
        rope=rope_parameters(raw, source), moe_layers=moe, num_experts=experts if moe else 0, top_k_experts=top_k,
        moe_intermediate_size=int(require(raw, "moe_intermediate_size", source)) if moe else 0,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), **c)


GEMMA3_KEYS = frozenset({"hidden_activation", "hidden_act", "hidden_size", "intermediate_size",
                         "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                         "head_dim", "rms_norm_eps", "vocab_size", "query_pre_attn_scalar",
                         "sliding_window", "sliding_window_pattern", "layer_types",
                         "rope_local_base_freq", "attn_logit_softcapping", "final_logit_softcapping",
                         "attention_bias", "use_bidirectional_attention"}) | ROPE_KEYS


def parse_gemma3(raw: dict, source: str) -> DecoderConfig:
    check_keys(raw, GEMMA3_KEYS, source)
    expect(raw, "use_bidirectional_attention", (None, False), source)
    raw = {"head_dim": 256, "tie_word_embeddings": True, **raw}
    c = _common(raw, source)
    n = c["num_layers"]
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    expect({"hidden_activation": act}, "hidden_activation", ("gelu_pytorch_tanh", "gelu"), source)
    bias = bool(raw.get("attention_bias", False))
    return DecoderConfig(
        family="gemma3", act=act, norm_offset=1.0, qkv_bias=bias, o_bias=bias, qk_norm=True,
        sandwich_norms=True, embed_scale=c["hidden_size"] ** 0.5,
        query_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma3 attention never applies attn_logit_softcapping; neither do we.
        attn_softcap=None, final_softcap=raw.get("final_logit_softcapping"),
        layer_types=tuple(types), sliding_window=raw.get("sliding_window", 4096),
        rope=rope_parameters(raw, source, local_theta=raw.get("rope_local_base_freq", 10000.0)), **c)


MISTRAL_KEYS = frozenset({"hidden_act", "hidden_size", "intermediate_size", "num_attention_heads",
                          "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps",
                          "vocab_size", "sliding_window", "attention_bias"}) | ROPE_KEYS


def _rope_types(rope: dict[str, dict], source: str, allowed: tuple[str, ...]) -> None:
    for params in rope.values():
        expect({"rope_type": params.get("rope_type", "default")}, "rope_type", allowed, source)


def parse_mistral(raw: dict, source: str) -> DecoderConfig:
    """Mistral: llama with an optional sliding window on every layer (``sliding_window: null``
    is full attention). transformers' Mistral ignores ``layer_types`` (Ministral reads it), so
    a config that has one is refused as an unknown key."""
    check_keys(raw, MISTRAL_KEYS, source)
    expect(raw, "attention_bias", (None, False), source)
    c = _common(raw, source)
    window = raw.get("sliding_window")
    rope = rope_parameters(raw, source)
    _rope_types(rope, source, ("default", "linear", "llama3"))
    return DecoderConfig(
        family="mistral", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        query_scale=c["head_dim"] ** -0.5,
        layer_types=("full_attention" if window is None else "sliding_attention",) * c["num_layers"],
        sliding_window=window, rope=rope, **c)


PHI3_KEYS = frozenset({"hidden_act", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps",
                       "vocab_size", "resid_pdrop", "embd_pdrop", "original_max_position_embeddings",
                       "partial_rotary_factor", "sliding_window", "attention_bias", "mlp_bias",
                       "lm_head_bias", "auto_map"}) | ROPE_KEYS


def _phi3_rope(raw: dict, rotary_dim: int, source: str) -> dict:
    """Phi-3's single rope entry, with a ``longrope`` entry's ``original_max_position_embeddings``,
    ``factor`` and ``attention_factor`` resolved as transformers resolves them."""
    params = dict(rope_parameters(raw, source)["full_attention"])
    rope_type = params.pop("type", None) or "default"
    rope_type = params.get("rope_type", rope_type)
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type  # transformers' legacy names
    expect({"rope_type": rope_type}, "rope_type", ("default", "longrope"), source)
    out = {"rope_type": rope_type, "rope_theta": float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))}
    if rope_type == "default":
        return out
    original = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if not original:
        raise ConfigError(f"{source}: config key 'original_max_position_embeddings' is required by longrope")
    factor = params.get("factor") or raw.get("max_position_embeddings", 4096) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != rotary_dim // 2:
            raise ConfigError(f"{source}: rope key {key!r} must list {rotary_dim // 2} factors "
                              f"(rotary dim {rotary_dim} / 2), got {value!r}")
        out[key] = tuple(float(v) for v in value)
    return {**out, "original_max_position_embeddings": int(original), "factor": float(factor),
            "attention_factor": float(attention)}


def parse_phi3(raw: dict, source: str) -> DecoderConfig:
    """Phi-3: llama with fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors (split at import,
    :func:`phi3_hf_name`), partial rotary embeddings and ``longrope``; an optional sliding window
    on every layer. Dropout keys and ``auto_map`` (remote code names) change no inference math."""
    check_keys(raw, PHI3_KEYS, source)
    for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
        expect(raw, key, (None, False), source)
    c = _common(raw, source)
    hd = c["head_dim"]
    given = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # its value wins, as in transformers
    partial = float(given.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(hd * partial)
    if not (0 < rotary_dim <= hd and rotary_dim % 2 == 0):
        raise ConfigError(f"{source}: config key 'partial_rotary_factor' = {partial} gives a rotary dim "
                          f"of {rotary_dim} for head_dim {hd}; it must be even and positive")
    rope = _phi3_rope(raw, rotary_dim, source)
    window = raw.get("sliding_window")
    return DecoderConfig(
        family="phi3", act=expect(raw, "hidden_act", ("silu",), source, "silu"),
        query_scale=hd ** -0.5, rotary_dim=None if rotary_dim == hd else rotary_dim,
        layer_types=("full_attention" if window is None else "sliding_attention",) * c["num_layers"],
        sliding_window=window, rope={t: rope for t in LAYER_TYPES}, **c)


GEMMA2_KEYS = frozenset({"hidden_activation", "hidden_act", "hidden_size", "intermediate_size",
                         "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                         "head_dim", "rms_norm_eps", "vocab_size", "query_pre_attn_scalar",
                         "sliding_window", "sliding_window_size", "layer_types", "cache_implementation",
                         "attn_logit_softcapping", "final_logit_softcapping", "attention_bias",
                         "use_bidirectional_attention"}) | ROPE_KEYS


def parse_gemma2(raw: dict, source: str) -> DecoderConfig:
    """Gemma 2: sandwich norms, ``1 + weight`` norms, √d embedding scale, sliding/full layers
    alternating (even layers slide), and soft-capping of both attention and output logits
    (transformers' Gemma2 applies ``attn_logit_softcapping``, unlike Gemma3). transformers reads
    ``hidden_activation`` only; a legacy ``hidden_act`` beside it changes nothing, and
    ``sliding_window_size`` / ``cache_implementation`` are generation-time settings."""
    check_keys(raw, GEMMA2_KEYS, source)
    expect(raw, "use_bidirectional_attention", (None, False), source)
    raw = {"head_dim": 256, "tie_word_embeddings": True, **raw}
    c = _common(raw, source)
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(c["num_layers"])]
    act = expect(raw, "hidden_activation", ("gelu_pytorch_tanh", "gelu"), source, "gelu_pytorch_tanh")
    bias = bool(raw.get("attention_bias", False))
    rope = rope_parameters(raw, source)
    _rope_types(rope, source, ("default", "linear", "llama3"))
    window = raw.get("sliding_window", 4096)
    if window is None and "sliding_attention" in types:
        raise ConfigError(f"{source}: config key 'sliding_window' is required by sliding_attention layers")
    return DecoderConfig(
        family="gemma2", act=act, norm_offset=1.0, qkv_bias=bias, o_bias=bias, sandwich_norms=True,
        embed_scale=c["hidden_size"] ** 0.5,
        query_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=raw.get("attn_logit_softcapping"), final_softcap=raw.get("final_logit_softcapping"),
        layer_types=tuple(types), sliding_window=window, rope=rope, **c)


def decoder_hf_name(path: str, cfg: DecoderConfig) -> str:
    """``layers/0/self_attn/q_proj/kernel`` → ``model.layers.0.self_attn.q_proj.weight``."""
    parts = path.split("/")
    if parts[-1] in ("kernel", "embedding", "scale"):
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if name.startswith("lm_head.") else "model." + name


PHI3_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def phi3_hf_name(path: str, cfg: DecoderConfig) -> str | tuple[str, tuple[int, int]]:
    """Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``; each IR linear
    is its rows ``[start, stop)`` of the fused tensor (output features), so every pass sees
    ordinary q/k/v/gate/up linears:

    =============  ==============================  ===============================
    IR path        checkpoint tensor               rows
    =============  ==============================  ===============================
    ``q_proj``     ``self_attn.qkv_proj.weight``   ``0 : H·hd``
    ``k_proj``     ``self_attn.qkv_proj.weight``   ``H·hd : (H+KV)·hd``
    ``v_proj``     ``self_attn.qkv_proj.weight``   ``(H+KV)·hd : (H+2·KV)·hd``
    ``gate_proj``  ``mlp.gate_up_proj.weight``     ``0 : I``
    ``up_proj``    ``mlp.gate_up_proj.weight``     ``I : 2·I``
    =============  ==============================  ===============================
    """
    parts = path.split("/")
    if len(parts) < 2 or parts[-2] not in PHI3_FUSED:
        return decoder_hf_name(path, cfg)
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv),
            "gate_proj": (0, i), "up_proj": (i, 2 * i)}[parts[-2]]
    return decoder_hf_name("/".join([*parts[:-2], PHI3_FUSED[parts[-2]], parts[-1]]), cfg), rows


MOE_STACKED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def qwen3_moe_hf_name(path: str, cfg: DecoderConfig) -> str | list:
    """An expert's linear (``layers/N/mlp/experts/e/{gate,up,down}_proj/kernel``) in either
    checkpoint layout; the importer takes the first the checkpoint has:

    1. transformers' saved layout (and the hub's): one 2-D tensor per expert,
       ``model.layers.N.mlp.experts.e.gate_proj.weight`` and so on;
    2. the stacked 3-D tensors of transformers' in-memory model, sliced per expert:

    =============  ================================  =====================
    IR linear      stacked tensor                    ``meta.hf_name``
    =============  ================================  =====================
    ``gate_proj``  ``…mlp.experts.gate_up_proj``     ``…[e][0:I]``
    ``up_proj``    ``[E, 2I, D]`` (gate rows first)  ``…[e][I:2I]``
    ``down_proj``  ``…mlp.experts.down_proj``        ``…[e]``
                   ``[E, D, I]``
    =============  ================================  =====================

    Everything else (the router ``mlp/gate``, attention, norms) is named as in :func:`decoder_hf_name`.
    """
    parts = path.split("/")
    if len(parts) != 7 or parts[2:4] != ["mlp", "experts"] or parts[5] not in MOE_STACKED:
        return decoder_hf_name(path, cfg)
    e, i = int(parts[4]), cfg.moe_intermediate_size
    stacked = f"model.layers.{parts[1]}.mlp.experts.{MOE_STACKED[parts[5]]}"
    index = {"gate_proj": (e, 0, i), "up_proj": (e, i, 2 * i), "down_proj": (e,)}[parts[5]]
    return [decoder_hf_name(path, cfg), (stacked, index)]


def decoder_ignorable(name: str, cfg: DecoderConfig) -> bool:
    """A tied model's saved output head and RoPE buffers are not parameters."""
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


for _name, _types, _parse in [("llama", ("llama",), parse_llama), ("qwen2", ("qwen2",), parse_qwen2),
                              ("qwen3", ("qwen3",), parse_qwen3),
                              ("qwen3_moe", ("qwen3_moe",), parse_qwen3_moe),
                              ("gemma3", ("gemma3_text",), parse_gemma3),
                              ("mistral", ("mistral",), parse_mistral),
                              ("phi3", ("phi3",), parse_phi3),
                              ("gemma2", ("gemma2",), parse_gemma2)]:
    registry.register(registry.Family(name=_name, model_types=_types, parse_config=_parse,
                                      build=CausalLM,
                                      hf_name={"phi3": phi3_hf_name, "qwen3_moe": qwen3_moe_hf_name}.get(
                                          _name, decoder_hf_name),
                                      ignorable=decoder_ignorable))
