"""Convert a GGUF file (llama.cpp) into an ordinary Hugging Face checkpoint directory.

The tensors are read and dequantized with the ``gguf`` package's NumPy code (no torch) and
written as float32 ``model.safetensors`` with Hugging Face names and ``[out, in]`` shapes.
What llama.cpp's converter (``convert_hf_to_gguf.py``) changed is undone:

==========  ========================================================================
family      undone here
==========  ========================================================================
llama       ``attn_q`` / ``attn_k`` rows were permuted for llama.cpp's RoPE layout
            (``permute(w, n_head, n_head_kv)``); :func:`unpermute_qk` inverts it
qwen2,      nothing (llama.cpp keeps their q/k rows: NeoX-style RoPE); qwen2's q/k/v
qwen3,      biases and qwen3's ``attn_q_norm`` / ``attn_k_norm`` map by name; qwen3moe's
qwen3moe    stacked experts (``ffn_{gate,up,down}_exps``) become one tensor per expert
gemma2,     every ``*norm.weight`` (input / post-attention / pre- and post-feedforward
gemma3      norms, the final norm, gemma3's ``q_norm`` and ``k_norm``) was stored as ``w + 1``
phi3        nothing: its fused ``attn_qkv`` / ``ffn_up`` (gate and up) are Hugging Face's
            ``qkv_proj`` / ``gate_up_proj``; a longrope file (``rope_factors_*`` tensors) is refused
gemma4      no norm offset (Gemma 4's norms multiply by ``w``); the experts stay stacked as
            transformers saves them (``ffn_gate_up_exps`` = ``experts.gate_up_proj``, gate rows
            first); ``ffn_gate_inp.scale`` / ``ffn_down_exps.scale`` are the router's ``scale`` /
            ``per_expert_scale``; ``rope_freqs`` (1 for rotated pairs, 1e30 for the rest) is the
            full layers' proportional RoPE, read back into ``partial_rotary_factor``; per-layer
            metadata arrays (``head_count_kv``, ``feed_forward_length``, the sliding pattern)
            become ``layer_types`` / ``per_layer_config`` / ``use_double_wide_mlp``
bert        nothing but names (``encoder.layer.N.*``); the WordPiece vocabulary, stored with
            llama.cpp's phantom spaces, is turned back into a ``BertTokenizer``
==========  ========================================================================

Mistral GGUFs are written by llama.cpp as ``llama`` (permuted q/k; a sliding window is not
recorded) and convert as llama.

The config is built from the GGUF metadata by a whitelist: an ``<arch>.*`` key this module
does not understand is an error, so a file with features we would silently drop (MoE,
unknown RoPE scaling, ...) fails loudly instead of converting wrongly.

Example::

    from cqjax.io.gguf import gguf_to_hf
    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf/")
    # smollm2-hf/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...}
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cqjax.io.atomic import write_json

#: Bumped whenever the conversion output changes; recorded in ``cqjax_import.json``.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "gemma4", "bert")

# GGUF per-block tensor name -> HF name (after "model.layers.N."), per architecture.
_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "gemma3": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
}
_BLOCK_NAMES["qwen2"] = dict(_BLOCK_NAMES["llama"])  # + q/k/v biases (.bias of the same names)
_BLOCK_NAMES["qwen3"] = {**_BLOCK_NAMES["llama"], "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLOCK_NAMES["gemma2"] = {k: v for k, v in _BLOCK_NAMES["gemma3"].items() if k not in ("attn_q_norm", "attn_k_norm")}
_BLOCK_NAMES["qwen3moe"] = {  # the experts (ffn_*_exps, stacked) are split in iter_hf_tensors
    **{k: v for k, v in _BLOCK_NAMES["qwen3"].items() if k not in ("ffn_gate", "ffn_up", "ffn_down")},
    "ffn_gate_inp": "mlp.gate"}
#: Stacked expert tensors ``[E, out, in]`` -> each expert's Hugging Face projection.
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLOCK_NAMES["phi3"] = {  # fused q/k/v and gate/up, as in Hugging Face's Phi-3 checkpoints
    "attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_NAMES["gemma4"] = {  # the Gemma 3 block plus the MoE block and per-layer embeddings
    **_BLOCK_NAMES["gemma3"], "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1", "post_ffw_norm_2": "post_feedforward_layernorm_2",
    "ffn_gate_inp": "router.proj", "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm"}
_BLOCK_NAMES["bert"] = {  # weights and biases of the same names (after "encoder.layer.N.")
    "attn_q": "attention.self.query", "attn_k": "attention.self.key", "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense", "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense", "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm"}
#: Block tensors whose Hugging Face name is not ``<module>.weight`` / ``.bias``: GGUF name after
#: ``blk.N.`` -> HF name after the block prefix (Gemma 4's bare parameters and stacked experts).
_BARE_NAMES: dict[str, dict[str, str]] = {"gemma4": {
    "ffn_gate_inp.scale": "router.scale", "ffn_down_exps.scale": "router.per_expert_scale",
    "layer_output_scale.weight": "layer_scalar", "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj"}}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCH_GLOBAL_NAMES = {
    "gemma4": {**_GLOBAL_NAMES, "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
               "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
               "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"},
    "bert": {"token_embd.weight": "embeddings.word_embeddings.weight",
             "position_embd.weight": "embeddings.position_embeddings.weight",
             "token_types.weight": "embeddings.token_type_embeddings.weight",
             "token_embd_norm.weight": "embeddings.LayerNorm.weight",
             "token_embd_norm.bias": "embeddings.LayerNorm.bias"},
}
#: Where an architecture's blocks live in Hugging Face names (``model.layers`` unless listed).
_BLOCK_PREFIX = {"bert": "encoder.layer"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias|scale)")
#: Public names of the tables above (the exporter, :mod:`cqjax.io.gguf_export`, inverts them).
BLOCK_NAMES, GLOBAL_NAMES, BARE_NAMES = _BLOCK_NAMES, _GLOBAL_NAMES, _BARE_NAMES


def global_names(arch: str) -> dict[str, str]:
    """GGUF name -> Hugging Face name of the tensors outside the blocks, for one architecture."""
    return _ARCH_GLOBAL_NAMES.get(arch, _GLOBAL_NAMES)


def block_prefix(arch: str) -> str:
    """The Hugging Face prefix of an architecture's blocks (``model.layers`` or ``encoder.layer``)."""
    return _BLOCK_PREFIX.get(arch, "model.layers")

# <arch>.<key> metadata this module understands (anything else under <arch>. is an error).
_KNOWN_KEYS: dict[str, frozenset[str]] = {
    "llama": frozenset({
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "rope.dimension_count",
        "rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "vocab_size",
    }),
    "gemma3": frozenset({
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "attention.sliding_window",
        "attention.sliding_window_pattern", "rope.dimension_count", "rope.freq_base",
        "rope.freq_base_swa", "rope.scaling.type", "rope.scaling.factor", "vocab_size",
    }),
    "gemma2": frozenset({
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "attention.sliding_window",
        "attn_logit_softcapping", "final_logit_softcapping", "rope.dimension_count", "rope.freq_base",
        "rope.scaling.type", "rope.scaling.factor", "vocab_size",
    }),
}
_KNOWN_KEYS["qwen2"] = _KNOWN_KEYS["qwen3"] = _KNOWN_KEYS["llama"]
_KNOWN_KEYS["qwen3moe"] = _KNOWN_KEYS["llama"] | {"expert_count", "expert_used_count", "expert_feed_forward_length"}
_KNOWN_KEYS["phi3"] = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.sliding_window",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scaling.original_context_length", "vocab_size",
})
_KNOWN_KEYS["gemma4"] = frozenset({  # what llama.cpp's converter writes for Gemma 4 (text)
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
    "attention.key_length_swa", "attention.value_length_swa", "attention.sliding_window",
    "attention.sliding_window_pattern", "attention.shared_kv_layers", "embedding_length_per_layer_input",
    "rope.dimension_count", "rope.dimension_count_swa", "rope.freq_base", "rope.freq_base_swa",
    "final_logit_softcapping", "expert_count", "expert_used_count", "expert_feed_forward_length", "vocab_size",
})
_KNOWN_KEYS["bert"] = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_epsilon", "attention.causal", "pooling_type", "vocab_size",
})
#: The architecture of each ``model_type`` this module writes into ``config.json``.
_ARCH_OF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3",
                       "phi3": "phi3", "qwen3_moe": "qwen3moe", "gemma4_text": "gemma4", "bert": "bert"}
#: transformers' tokenizer family (``AutoTokenizer``'s ``tokenizer_type``) of a gemma4 file's
#: ``tokenizer.ggml.model``: Gemma 4's own, or a byte-level BPE one.
_GEMMA4_TOKENIZER_TYPES = {"gemma4": "gemma", "gpt2": "gpt2"}
#: ``rope_freqs`` entries at or above this leave their dimension pair unrotated (llama.cpp's
#: converter writes 1e30 for the pairs a proportional RoPE does not rotate).
_UNROTATED = 1e20
#: llama.cpp's ``pooling_type`` values (``LLAMA_POOLING_TYPE_*``) a BERT file may carry: none
#: (token states) and mean, the pooling of cqjax's BERT family.
_BERT_POOLING = {0: "none", 1: "mean"}

# llama.cpp's defaults for gemma3 when the file has no attention.sliding_window_pattern /
# rope.freq_base_swa (src/llama-model.cpp, LLM_ARCH_GEMMA3).
_GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every 6th layer is global attention
_GEMMA3_ROPE_THETA_LOCAL = 10_000.0


class GGUFConversionError(ValueError):
    """A GGUF file cannot be converted (unsupported architecture, tensor, type or key)."""


# ----------------------------------------------------------------------------- permutation
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute``: HF rotate-half q/k rows -> GGUF interleaved RoPE rows.

    Args:
      w: a q or k projection weight ``[n_head * head_dim, in]`` (or a bias ``[n_head * head_dim]``).
      n_head: heads of that projection (``n_head_kv`` for k).

    Returns:
      The rows reordered as llama.cpp stores them (same shape).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF q/k rows -> Hugging Face rows.

    Args:
      w: a q or k weight as stored in the GGUF file (``[out, in]`` after dequantizing).
      n_head: heads of that projection (``n_head_kv`` for k).

    Returns:
      The rows in Hugging Face order (same shape).
    """
    if w.shape[0] % (2 * n_head):
        raise GGUFConversionError(f"q/k rows {w.shape[0]} are not divisible by 2 * n_head = {2 * n_head}")
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- metadata
def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value fields of a ``gguf.GGUFReader`` as Python values (arrays as lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        value = field.contents()
        meta[key] = value
    return meta


def hf_config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str], *, source: str = "<gguf>",
                            read: Callable[[str], np.ndarray] | None = None) -> dict:
    """Translate GGUF metadata into a Hugging Face ``config.json`` dict.

    Args:
      meta: ``{key: value}`` as returned by :func:`read_metadata`.
      tensor_names: names of the tensors in the file (decide ``tie_word_embeddings`` and, for
        gemma4, ``attention_k_eq_v`` and the MoE block).
      source: the file name, for error messages.
      read: reads a tensor's values by name; gemma4 reads ``rope_freqs.weight`` (its full layers'
        proportional RoPE) through it once the metadata is validated. The tensor is refused for
        every other architecture.

    Returns:
      A ``LlamaConfig`` (``model_type: llama``), ``Qwen2Config``, ``Qwen3Config``, ``Qwen3MoeConfig``,
      ``Gemma2Config``, ``Gemma3TextConfig`` (``gemma3_text``), ``Phi3Config``, ``Gemma4TextConfig``
      (``gemma4_text``) or ``BertConfig`` dict.

    Raises:
      GGUFConversionError: unsupported architecture, unknown ``<arch>.*`` key or a missing one,
        or a value the Hugging Face model cannot express.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"{source}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    unknown = sorted(k for k in meta if k.startswith(arch + ".") and k[len(arch) + 1:] not in _KNOWN_KEYS[arch])
    if unknown:
        raise GGUFConversionError(f"{source}: metadata keys not understood by the {arch} converter: {unknown}")

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise GGUFConversionError(f"{source}: required metadata key {full!r} is missing")
        return default

    if arch == "gemma4":
        return _gemma4_config(get, meta, tensor_names, read, source)
    if arch == "bert":
        return _bert_config(get, meta, source)
    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // n_head)))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFConversionError(f"{source}: attention.key_length != attention.value_length is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFConversionError(f"{source}: tensor 'rope_freqs.weight' (llama3-style RoPE scaling) is not supported")
    if {"rope_factors_long.weight", "rope_factors_short.weight"} & tensor_names:
        raise GGUFConversionError(f"{source}: tensors 'rope_factors_long/short.weight' (Phi-3 longrope) are not "
                                  "supported; convert the Hugging Face checkpoint instead")
    rope_type = get("rope.scaling.type", "none")
    if rope_type not in ("none", "linear"):
        raise GGUFConversionError(f"{source}: {arch}.rope.scaling.type={rope_type!r} is not supported")
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10_000.0))}
    if rope_type == "linear":
        full_rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))

    cfg: dict[str, Any] = {
        "vocab_size": _vocab_size(meta, arch, source),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
        **_token_ids(meta),
    }
    if arch == "llama":
        cfg.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            mlp_bias=False,
            pretraining_tp=1,
            rope_parameters=full_rope,
        )
    elif arch in ("qwen2", "qwen3"):  # llama.cpp stores their q/k unpermuted (NeoX RoPE)
        cfg.update(architectures=[f"{arch.capitalize()}ForCausalLM"], model_type=arch, hidden_act="silu",
                   rope_parameters=full_rope, use_sliding_window=False)
        if arch == "qwen2":  # q/k/v biases are part of Qwen2, not a config switch
            del cfg["attention_bias"], cfg["head_dim"]
            if not {f"blk.{i}.attn_q.bias" for i in range(n_layers)} <= tensor_names:
                raise GGUFConversionError(f"{source}: a qwen2 file needs attn_q/attn_k/attn_v biases in every block")
        else:
            cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    elif arch == "qwen3moe":  # every layer routed; llama.cpp renormalizes the top-k weights (norm_w)
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_act="silu",
                   rope_parameters=full_rope, use_sliding_window=False, attention_bias=False,
                   num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                   moe_intermediate_size=int(get("expert_feed_forward_length")), norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "phi3":  # NeoX RoPE in llama.cpp: q/k rows as Hugging Face stores them
        rotary = int(get("rope.dimension_count", head_dim))
        del cfg["attention_bias"]
        cfg.update(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu", rope_parameters=full_rope,
                   sliding_window=int(get("attention.sliding_window")) if f"{arch}.attention.sliding_window" in meta
                   else None)
        if rotary != head_dim:
            cfg["partial_rotary_factor"] = rotary / head_dim
    elif arch == "gemma2":
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (hidden/heads), and
        # alternates sliding (even layers) and global attention (set_swa_pattern(2)).
        cfg.update(
            architectures=["Gemma2ForCausalLM"],
            model_type="gemma2",
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=hidden // n_head if (hidden, n_layers) == (4608, 46) else head_dim,
            sliding_window=int(get("attention.sliding_window")),
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
            rope_parameters=full_rope,
            attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(get("final_logit_softcapping", 30.0)),
        )
    else:  # gemma3
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (hidden/heads).
        scalar = hidden // n_head if (hidden, n_layers) == (5376, 62) else head_dim
        pattern = get("attention.sliding_window_pattern", _GEMMA3_SLIDING_WINDOW_PATTERN)
        if isinstance(pattern, list):  # one bool per layer: True = sliding window
            if len(pattern) != n_layers:
                raise GGUFConversionError(
                    f"{source}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
                )
            is_swa = [bool(x) for x in pattern]
        else:  # every pattern-th layer is global (llama.cpp's set_swa_pattern)
            is_swa = [int(pattern) > 0 and (i + 1) % int(pattern) != 0 for i in range(n_layers)]
        layer_types = ["sliding_attention" if swa else "full_attention" for swa in is_swa]
        local_theta = float(get("rope.freq_base_swa", _GEMMA3_ROPE_THETA_LOCAL))
        cfg.update(
            architectures=["Gemma3ForCausalLM"],
            model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=scalar,
            sliding_window=int(get("attention.sliding_window")),
            layer_types=layer_types,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                "full_attention": full_rope,
            },
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            use_bidirectional_attention=False,
        )
    return cfg


def _vocab_size(meta: Mapping[str, Any], arch: str, source: str) -> int:
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFConversionError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
        vocab = len(tokens)
    return int(vocab)


def _token_ids(meta: Mapping[str, Any]) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer metadata present."""
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    return {hf: int(meta[f"tokenizer.ggml.{g}"]) for hf, g in keys.items() if f"tokenizer.ggml.{g}" in meta}


def _per_layer(value: Any, n_layers: int, key: str, source: str) -> list[int]:
    """A scalar or per-layer array key (llama.cpp's ``get_key_or_arr``) as one int per layer."""
    values = value if isinstance(value, list) else [value] * n_layers
    if len(values) != n_layers:
        raise GGUFConversionError(f"{source}: {key} has {len(values)} entries for {n_layers} layers")
    return [int(v) for v in values]


def _one_value(values: list[int], layers: list[int], what: str, key: str, source: str) -> int | None:
    """The value ``values`` has on every layer of ``layers`` (None when there are none)."""
    found = sorted({values[i] for i in layers})
    if len(found) > 1:
        raise GGUFConversionError(f"{source}: {key} differs between {what} layers ({found}); transformers' "
                                  f"Gemma 4 takes one value per layer type")
    return found[0] if found else None


def _proportional_rope(freqs: np.ndarray, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    """Gemma 4's full-attention RoPE from ``rope_freqs``: llama.cpp's converter writes 1 for each
    rotated pair and 1e30 (no rotation) for the rest of the head, which is transformers'
    ``proportional`` RoPE with ``partial_rotary_factor = 2 * rotated / head_dim``."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    rotated = int(np.count_nonzero(freqs == 1.0))
    proportional = np.all(freqs[:rotated] == 1.0) and np.all(freqs[rotated:] >= _UNROTATED)
    if freqs.shape != (head_dim // 2,) or not proportional:
        raise GGUFConversionError(
            f"{source}: tensor 'rope_freqs.weight' (shape {list(freqs.shape)}) is not a proportional RoPE of "
            f"attention.key_length {head_dim} (ones for the rotated pairs, then 1e30): only that is supported")
    factor = 2 * rotated / head_dim
    if int(factor * head_dim // 2) != rotated:
        raise GGUFConversionError(f"{source}: tensor 'rope_freqs.weight' rotates {rotated} of {head_dim // 2} pairs, "
                                  "which no partial_rotary_factor reproduces")
    return {"rope_type": "proportional", "partial_rotary_factor": factor, "rope_theta": theta}


def kv_producers_differ(layer_types: list[str], shared: int) -> bool:
    """Whether llama.cpp and transformers give a Gemma 4 model's KV-shared layers (its last
    ``shared``) different keys/values: llama.cpp reads those of layer ``n - shared - 2`` for
    sliding and ``n - shared - 1`` for full layers, transformers those of the last earlier
    layer of the same type."""
    first = len(layer_types) - shared
    for t in set(layer_types[first:]):
        llama_cpp = first - (2 if t == "sliding_attention" else 1)
        if llama_cpp < 0 or layer_types[llama_cpp] != t or t in layer_types[llama_cpp + 1:first]:
            return True
    return False


def _gemma4_config(get: Any, meta: Mapping[str, Any], tensor_names: set[str],
                   read: Callable[[str], np.ndarray] | None, source: str) -> dict:
    """A ``Gemma4TextConfig`` dict from gemma4 metadata (see :func:`hf_config_from_metadata`)."""
    n = int(get("block_count"))
    pattern = get("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n:
        raise GGUFConversionError(f"{source}: gemma4.attention.sliding_window_pattern must hold one bool per layer "
                                  f"({n}), got {pattern!r}")
    if pattern[-1]:
        raise GGUFConversionError(f"{source}: gemma4.attention.sliding_window_pattern makes the last layer sliding; "
                                  "transformers' Gemma 4 forces it to full attention")
    types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    heads = get("attention.head_count")
    if isinstance(heads, list):
        heads = _one_value(_per_layer(heads, n, "gemma4.attention.head_count", source), list(range(n)), "all",
                           "gemma4.attention.head_count", source)
    kv = _per_layer(get("attention.head_count_kv", heads), n, "gemma4.attention.head_count_kv", source)
    kv_swa = _one_value(kv, sliding, "sliding", "gemma4.attention.head_count_kv", source)
    kv_full = _one_value(kv, full, "full", "gemma4.attention.head_count_kv", source)
    head_dim, head_dim_swa = int(get("attention.key_length")), int(get("attention.key_length_swa"))
    for key, want in (("attention.value_length", head_dim), ("attention.value_length_swa", head_dim_swa),
                      ("rope.dimension_count", head_dim), ("rope.dimension_count_swa", head_dim_swa)):
        if int(get(key, want)) != want:
            raise GGUFConversionError(f"{source}: gemma4.{key} = {get(key)} differs from the head size {want} "
                                      "(partial rotation or k/v sizes transformers' Gemma 4 does not have)")
    shared = int(get("attention.shared_kv_layers", 0))
    ff = _per_layer(get("feed_forward_length"), n, "gemma4.feed_forward_length", source)
    double_wide = ff != [ff[0]] * n
    if double_wide and ff != [ff[0]] * (n - shared) + [2 * ff[0]] * shared:
        raise GGUFConversionError(f"{source}: gemma4.feed_forward_length {ff} is neither one width nor twice the "
                                  f"width on the {shared} KV-shared layers (use_double_wide_mlp)")
    if kv_producers_differ(types, shared):
        raise GGUFConversionError(
            f"{source}: KV-shared layers {list(range(n - shared, n))} of types {types[n - shared:]}: llama.cpp reuses "
            f"the keys/values of layer {n - shared - 2} (sliding) and {n - shared - 1} (full), transformers those of "
            "the last earlier layer of each type; they differ here")
    own_kv = range(n - shared)  # the KV-shared layers have no k/v tensors at all
    has_v = {i: f"blk.{i}.attn_v.weight" in tensor_names for i in own_kv}
    full_own = [i for i in full if i in has_v]
    k_eq_v = bool(full_own) and not any(has_v[i] for i in full_own)
    if not all(has_v[i] for i in own_kv if types[i] == "sliding_attention" or not k_eq_v):
        raise GGUFConversionError(f"{source}: some layers lack attn_v while others of their type have it; "
                                  "transformers' attention_k_eq_v drops v_proj on every full layer, only there")
    n_experts = int(get("expert_count", 0))
    routed = [f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(n)]
    if any(routed) != all(routed) or any(routed) != (n_experts > 0):
        raise GGUFConversionError(f"{source}: gemma4.expert_count = {n_experts} and ffn_gate_inp in layers "
                                  f"{[i for i, r in enumerate(routed) if r]}: transformers' Gemma 4 routes every "
                                  "layer or none")
    theta = float(get("rope.freq_base", 10_000.0))  # llama.cpp's defaults
    if "rope_freqs.weight" in tensor_names:
        if read is None:
            raise GGUFConversionError(f"{source}: tensor 'rope_freqs.weight' is needed to build the config")
        full_rope = _proportional_rope(read("rope_freqs.weight"), head_dim, theta, source)
    else:
        full_rope = {"rope_type": "default", "rope_theta": theta}
    vocab = _vocab_size(meta, "gemma4", source)
    softcap = float(get("final_logit_softcapping", 0.0))
    cfg: dict[str, Any] = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": vocab,
        "hidden_size": int(get("embedding_length")), "intermediate_size": ff[0], "num_hidden_layers": n,
        "num_attention_heads": int(heads), "num_key_value_heads": kv_swa if kv_swa is not None else kv_full,
        "head_dim": head_dim_swa, "layer_types": types,
        "per_layer_config": {str(i): {"head_dim": head_dim, "num_key_value_heads": kv_full} for i in full},
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensor_names, "attention_bias": False,
        "sliding_window": int(get("attention.sliding_window")),
        "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                  "rope_theta": float(get("rope.freq_base_swa", theta))},
                            "full_attention": full_rope},
        "final_logit_softcapping": softcap or None,  # llama.cpp: 0 = none
        "use_bidirectional_attention": None, "vocab_size_per_layer_input": vocab,
        "hidden_size_per_layer_input": int(get("embedding_length_per_layer_input", 0)),
        "attention_k_eq_v": k_eq_v, "num_kv_shared_layers": shared, "use_double_wide_mlp": double_wide,
        "enable_moe_block": n_experts > 0, "num_experts": n_experts or None,
        "top_k_experts": int(get("expert_used_count")) if n_experts else None,
        "moe_intermediate_size": int(get("expert_feed_forward_length")) if n_experts else None,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
        **_token_ids(meta),
    }
    return cfg


def _bert_config(get: Any, meta: Mapping[str, Any], source: str) -> dict:
    """A ``BertConfig`` dict from bert metadata (see :func:`hf_config_from_metadata`)."""
    heads = int(get("attention.head_count"))
    if int(get("attention.head_count_kv", heads)) != heads:
        raise GGUFConversionError(f"{source}: bert.attention.head_count_kv != bert.attention.head_count")
    if get("attention.causal", False):
        raise GGUFConversionError(f"{source}: bert.attention.causal is true; only bidirectional BERT encoders "
                                  "are supported")
    pooling = int(get("pooling_type", 0))
    if pooling not in _BERT_POOLING:
        raise GGUFConversionError(f"{source}: bert.pooling_type = {pooling} (llama.cpp's CLS/last/rank pooling); "
                                  "cqjax's BERT family pools by the mean of the tokens")
    if "tokenizer.ggml.token_type_count" not in meta:
        raise GGUFConversionError(f"{source}: required metadata key 'tokenizer.ggml.token_type_count' (BERT's "
                                  "type_vocab_size) is missing")
    cfg = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": _vocab_size(meta, "bert", source),
        "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "max_position_embeddings": int(get("context_length")),
        "type_vocab_size": int(meta["tokenizer.ggml.token_type_count"]),
        "layer_norm_eps": float(get("attention.layer_norm_epsilon")), "hidden_act": "gelu",
        "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02, "dtype": "float32", **_token_ids(meta),
    }
    return cfg


# ----------------------------------------------------------------------------- tensors
def hf_tensor_name(gguf_name: str, arch: str, *, source: str = "<gguf>") -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name (``model.layers.3...``)."""
    names = global_names(arch)
    if gguf_name in names:
        return names[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m:
        prefix = f"{block_prefix(arch)}.{m.group(1)}"
        bare = _BARE_NAMES.get(arch, {}).get(f"{m.group(2)}.{m.group(3)}")
        if bare is not None:
            return f"{prefix}.{bare}"
        # llama.cpp's gemma4 graph reads no biases (a file with them does not load there either)
        bias_refused = arch == "gemma4" and m.group(3) == "bias"
        if m.group(2) in _BLOCK_NAMES[arch] and m.group(3) != "scale" and not bias_refused:
            return f"{prefix}.{_BLOCK_NAMES[arch][m.group(2)]}.{m.group(3)}"
    raise GGUFConversionError(f"{source}: tensor {gguf_name!r} has no Hugging Face equivalent for architecture {arch!r}")


def dequantize_tensor(tensor: Any, source: str = "<gguf>") -> np.ndarray:
    """A GGUF reader tensor as float32 ``[rows, cols]`` (numpy order: outermost dim first), in llama.cpp's
    layout (no permutation undone); names the file and tensor if the gguf package cannot decode its type."""
    from gguf.quants import dequantize

    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFConversionError(
            f"{source}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, which the gguf "
            f"package cannot dequantize ({e})"
        ) from e
    expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    w = np.asarray(w, dtype=np.float32).reshape(expected)
    return w


def iter_hf_tensors(reader: Any, config: Mapping[str, Any], *, source: str = "<gguf>") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array [out, in])`` for every tensor of the file, undoing llama.cpp's
    changes (gemma4's ``rope_freqs``, read into the config, excepted)."""
    arch = _ARCH_OF_MODEL_TYPE[config["model_type"]]
    for tensor in reader.tensors:
        if arch == "gemma4" and tensor.name == "rope_freqs.weight":
            continue  # read into config.json's rope_parameters (hf_config_from_metadata)
        m = _BLOCK_RE.fullmatch(tensor.name)
        if arch == "qwen3moe" and m and m.group(2) in _EXPERT_NAMES:  # [E, out, in]: one tensor per expert
            for e, w in enumerate(dequantize_tensor(tensor, source)):
                yield (f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_NAMES[m.group(2)]}.weight",
                       np.ascontiguousarray(w, dtype=np.float32))
            continue
        name = hf_tensor_name(tensor.name, arch, source=source)
        w = dequantize_tensor(tensor, source)
        if arch == "llama" and tensor.name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif arch == "llama" and tensor.name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        elif arch in ("gemma2", "gemma3") and tensor.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        yield name, np.ascontiguousarray(w, dtype=np.float32)


def _check_shapes(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any], source: str) -> None:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    expected = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
        "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * hd),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
    }
    for name, w in tensors.items():
        key = name if name in expected else name.split(".", 3)[-1]
        if "layernorm" in key:
            want: tuple[int, ...] | None = (h,)
        elif name == "lm_head.weight":
            want = (cfg["vocab_size"], h)
        else:
            want = expected.get(key)
        if want is not None and tuple(w.shape) != want:
            raise GGUFConversionError(f"{source}: tensor {name!r} has shape {w.shape}, config implies {want}")
    for layer in range(cfg["num_hidden_layers"]):
        if not {f"model.layers.{layer}.self_attn.{p}.weight" for p in ("q_proj", "qkv_proj")} & set(tensors):
            raise GGUFConversionError(f"{source}: layer {layer} has no attn_q (or attn_qkv) tensor")


def _check_with_importer(directory: Path, source: str) -> None:
    """Every tensor of a converted checkpoint has the shape its ``config.json`` implies, and none
    is missing or left over: cqjax's own (lazy) import of ``directory`` checks it."""
    from cqjax.errors import CheckpointError, ConfigError
    from cqjax.io.hf import import_checkpoint

    try:
        import_checkpoint(directory)
    except (CheckpointError, ConfigError) as e:
        raise GGUFConversionError(f"{source}: its tensors do not fit the config built from its metadata: {e}") from e


# ----------------------------------------------------------------------------- writing

def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` / ``tokenizer_config.json`` (+ chat template) for a GGUF file.

    Uses ``transformers`` (``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` then
    ``save_pretrained``); this and :func:`write_wordpiece_tokenizer` are the only parts of the
    conversion that need transformers. A gemma4 file's tokenizer is read as its tokenizer family
    (``AutoTokenizer``'s ``tokenizer_type``, e.g. ``gemma``), which spares transformers its parse
    of the file's model config: that parse rejects gemma4's per-layer metadata arrays.
    """
    import gguf

    gguf_path = Path(gguf_path)
    _unhide_torch(gguf_path)
    from transformers import AutoTokenizer

    fields = gguf.GGUFReader(str(gguf_path)).fields
    arch, kind = (fields[k].contents() if k in fields else None
                  for k in ("general.architecture", "tokenizer.ggml.model"))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                        tokenizer_type=_GEMMA4_TOKENIZER_TYPES.get(kind) if arch == "gemma4" else None)
    tok.save_pretrained(str(out_dir))


def _unhide_torch(gguf_path: Path) -> None:
    """transformers' GGUF reader imports torch, which the command line hides to spare its
    start-up (:func:`cqjax.__main__._without_torch`): a (cached, one-time) conversion lifts that.

    Raises:
      CheckpointError: torch is not installed, naming the file whose tokenizer needs it.
    """
    import sys

    from cqjax.errors import CheckpointError

    if "torch" in sys.modules and sys.modules["torch"] is None:
        del sys.modules["torch"]
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{gguf_path}: transformers reads a GGUF's tokenizer with torch, which is not "
                              "installed (pip install torch; the CPU wheel is enough)") from None


def write_wordpiece_tokenizer(meta: Mapping[str, Any], out_dir: str | os.PathLike, *, source: str = "<gguf>") -> None:
    """Write a ``BertTokenizer`` (``tokenizer.json``, ``tokenizer_config.json``, ...) for a GGUF
    file whose vocabulary is llama.cpp's WordPiece (``tokenizer.ggml.model = bert``), which
    transformers' GGUF loader does not read.

    llama.cpp's converter stores every piece but the control tokens with a phantom space: a
    word-initial ``piece`` as ``▁piece``, a continuation ``##piece`` as ``piece``; this undoes it.
    The file does not record the normalizer: the tokenizer lowercases (and strips accents, as
    BERT's uncased models do) when lowercasing changes no piece of the vocabulary, and keeps
    case otherwise, as the model's original tokenizer did.

    Raises:
      GGUFConversionError: the token list or types are missing, or two tokens read the same piece.
    """
    from gguf import TokenType
    from transformers import BertTokenizer

    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if tokens is None or types is None or len(tokens) != len(types):
        raise GGUFConversionError(f"{source}: a WordPiece vocabulary needs tokenizer.ggml.tokens and one "
                                  "tokenizer.ggml.token_type per token")
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        piece = token if kind == TokenType.CONTROL else token[1:] if token.startswith("\u2581") else "##" + token
        if piece in vocab:
            raise GGUFConversionError(f"{source}: tokens {vocab[piece]} and {i} are both the WordPiece {piece!r}")
        vocab[piece] = i

    def special(key: str, default: str) -> str:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None else default

    cased = any(token != token.lower() for token, kind in zip(tokens, types) if kind == TokenType.NORMAL)
    tok = BertTokenizer(vocab=vocab, do_lower_case=not cased, unk_token=special("unknown_token_id", "[UNK]"),
                        sep_token=special("seperator_token_id", special("eos_token_id", "[SEP]")),
                        pad_token=special("padding_token_id", "[PAD]"), cls_token=special("bos_token_id", "[CLS]"),
                        mask_token=special("mask_token_id", "[MASK]"),
                        model_max_length=int(meta.get("bert.context_length", 512)))
    tok.save_pretrained(str(out_dir))


def _make_readable(directory: Path) -> None:
    """Give a mkdtemp directory (0700) and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF file into a Hugging Face checkpoint directory (float32 safetensors).

    The directory is built in a temporary sibling and renamed into place when complete, so an
    interrupted conversion leaves no half-written ``out_dir``.

    Args:
      gguf_path: the ``.gguf`` file (an architecture of :data:`SUPPORTED_ARCHITECTURES`).
      out_dir: the directory to create (``config.json``, ``model.safetensors``, tokenizer files,
        ``cqjax_import.json`` recording the source).
      tokenizer: also write the tokenizer files (needs ``transformers``; the tensors do not).
      overwrite: replace an existing ``out_dir``; otherwise an existing one is an error.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      GGUFConversionError: unsupported architecture, tensor, quantization type or metadata key.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    import gguf
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    source = str(gguf_path)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    reader = gguf.GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    config = hf_config_from_metadata(meta, set(by_name), source=source,
                                     read=lambda name: dequantize_tensor(by_name[name], source))
    arch = _ARCH_OF_MODEL_TYPE[config["model_type"]]

    tensors: dict[str, np.ndarray] = {}
    for name, w in iter_hf_tensors(reader, config, source=source):
        if name in tensors:
            raise GGUFConversionError(f"{source}: two tensors map to {name!r}")
        tensors[name] = w
    if arch == "gemma4":  # llama.cpp multiplies by layer_output_scale only where the file has it
        for i in range(config["num_hidden_layers"]):
            tensors.setdefault(f"model.layers.{i}.layer_scalar", np.ones(1, np.float32))
    elif arch != "bert":  # gemma4 and bert are checked by cqjax's importer below (per-layer shapes)
        _check_shapes(tensors, config, source)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        write_json(tmp / "config.json", config, sort_keys=True)
        if arch in ("gemma4", "bert"):
            _check_with_importer(tmp, source)
        if tokenizer and meta.get("tokenizer.ggml.model") == "bert":
            write_wordpiece_tokenizer(meta, tmp, source=source)
        elif tokenizer:
            write_tokenizer(gguf_path, tmp)
        write_json(tmp / "cqjax_import.json", sort_keys=True, obj={
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "converter": "cqjax.io.gguf",
            "converter_version": CONVERTER_VERSION,
            "general.name": meta.get("general.name", ""),
            "general.file_type": meta.get("general.file_type"),
        })
        _make_readable(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cached_checkpoint(gguf_path: str | os.PathLike) -> Path:
    """The Hugging Face checkpoint directory of a GGUF file, converted once (:func:`gguf_to_hf`)
    into ``<cache>/gguf/`` (``$CQJAX_CACHE``, default ``~/.cache/cqjax``) and reused while the
    file (name, size, modification time) and the converter version are the same. What lets
    ``model.path=file.gguf`` and ``cqjax.quantize("file.gguf")`` take a GGUF directly."""
    import hashlib

    from cqjax.data.registry import cache_dir

    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}".encode())
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        import gguf

        has_tokenizer = "tokenizer.ggml.tokens" in gguf.GGUFReader(str(gguf_path)).fields
        gguf_to_hf(gguf_path, out, tokenizer=has_tokenizer, overwrite=True)
    return out

