"""Hugging Face config → :class:`DecoderConfig` for the llama, qwen2, qwen3 and gemma3 families.

Each family lists every config key it understands. A key outside that list, or a value that
would change the model in a way cqjax does not implement, raises :class:`ConfigError` naming
the key: silently ignoring a key risks a model that imports fine and computes the wrong thing.
"""

from __future__ import annotations

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
    (:func:`bookkeeping`) nor allowed."""
    if "quantization_config" in raw:
        raise ConfigError(f"{source}: key 'quantization_config': the checkpoint is already quantized; "
                          "cqjax imports float (fp32/bf16/fp16) checkpoints")
    unknown = sorted(k for k in set(raw) - GENERIC_KEYS - allowed if not bookkeeping(k))
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


def decoder_hf_name(path: str, cfg: DecoderConfig) -> str:
    """``layers/0/self_attn/q_proj/kernel`` → ``model.layers.0.self_attn.q_proj.weight``."""
    parts = path.split("/")
    if parts[-1] in ("kernel", "embedding", "scale"):
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if name.startswith("lm_head.") else "model." + name


def decoder_ignorable(name: str, cfg: DecoderConfig) -> bool:
    """A tied model's saved output head and RoPE buffers are not parameters."""
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


for _name, _types, _parse in [("llama", ("llama",), parse_llama), ("qwen2", ("qwen2",), parse_qwen2),
                              ("qwen3", ("qwen3",), parse_qwen3),
                              ("gemma3", ("gemma3_text",), parse_gemma3)]:
    registry.register(registry.Family(name=_name, model_types=_types, parse_config=_parse,
                                      build=CausalLM, hf_name=decoder_hf_name,
                                      ignorable=decoder_ignorable))
