"""Export a model out of cqjax as a GGUF file that llama.cpp loads.

cqjax's weights (rotated codebook codes) lie on no llama.cpp grid, so the file holds the
*dequantized* weights (:func:`cqjax.io.export.hf_arrays`, the function the runtime computes),
written as ``F32`` / ``F16`` or re-quantized, lossily, to ``Q8_0`` or ``Q4_0`` with
``gguf.quants.quantize``. Norms, biases and other 1-D tensors stay ``F32``, and so do MoE routers
and position / token-type embeddings (as llama.cpp's converter keeps them); a matrix whose
row length is not a multiple of the type's block size falls back to ``F16`` (counted in the
returned ``tensor_types``). What llama.cpp's converter changes, and :mod:`cqjax.io.gguf`
undoes at import, is re-applied:

==========  =======================================================================
family      re-applied here
==========  =======================================================================
llama,      q/k rows permuted for llama.cpp's interleaved RoPE (:func:`permute_qk`); a mistral
mistral     model is written as llama (without a sliding window: llama.cpp's llama has none)
gemma2,     every norm weight stored as ``w + 1``; gemma2 also gets its soft-caps and window
gemma3      (llama.cpp alternates sliding and global layers itself)
qwen2/3     nothing (llama.cpp runs them with rotate-half RoPE, as transformers)
gemma4      the experts stacked as ``ffn_gate_up_exps`` (gate rows first) / ``ffn_down_exps``, the
            router's scales as ``ffn_gate_inp.scale`` / ``ffn_down_exps.scale``; a ``rope_freqs``
            tensor (1 per rotated pair, 1e30 for the rest) carries the full layers' proportional
            RoPE; per-layer head sizes, KV heads and MLP widths as the converter's metadata
bert        nothing but names; the pooling is mean (cqjax's BERT family), the WordPiece
            vocabulary gets llama.cpp's phantom spaces (``tokenizer.ggml.model = bert``)
==========  =======================================================================

Tensor names are :mod:`cqjax.io.gguf`'s tables read backwards. The tokenizer comes from the
Hugging Face files in ``config_from``: a byte-level BPE ``tokenizer.json`` becomes
``tokenizer.ggml.model = gpt2`` (tokens, types, merges; the pre-tokenizer name llama.cpp knows,
recognized from the ``pre_tokenizer`` block, else ``default`` with a warning in the result), a
SentencePiece-style one (byte-fallback BPE or Unigram, as Gemma's) becomes ``llama`` with
scores (for gemma4, ``gemma4`` with merges, as the converter writes it), a WordPiece one ``bert``;
special ids, add-bos flags and the chat template come from ``gguf.SpecialVocab``.

The header is written first and then each tensor is decoded, encoded and appended, so an export
holds one decoded tensor at a time; the file appears atomically (temp file + ``os.replace``).

>>> export_gguf(api.load("out/artifact").ir, "model.gguf", config_from="out/artifact/tokenizer",
...             dtype="Q8_0")                                                      # doctest: +SKIP
{'bits_per_weight': 8.5, 'bytes': 145..., 'tensor_types': {'F32': 61, 'Q8_0': 211}, ...}
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cqjax.errors import CheckpointError
from cqjax.io.gguf import BARE_NAMES, BLOCK_NAMES, global_names, kv_producers_differ, permute_qk

#: cqjax family -> llama.cpp architecture.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
                 "gemma2": "gemma2", "gemma3": "gemma3", "gemma4": "gemma4", "bert": "bert"}
#: ``export.dtype`` -> (type of matrices, ``general.file_type``).
DTYPES = {"F32": ("F32", "ALL_F32"), "F16": ("F16", "MOSTLY_F16"), "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
          "Q4_0": ("Q4_0", "MOSTLY_Q4_0")}
#: Biases each architecture's llama.cpp graph reads (HF module -> GGUF base name).
_BIASES = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj"}, "mistral": set(), "qwen2": {"q_proj", "k_proj", "v_proj"},
           "qwen3": set(), "qwen3_moe": set(), "gemma2": set(), "gemma3": set(), "gemma4": set(),
           "bert": {"query", "key", "value", "dense", "LayerNorm"}}
#: An expert's projection (per-expert name, or a slice of transformers' stacked tensors) -> llama.cpp's
#: stacked ``[E, out, in]`` tensor: qwen3_moe's ``mlp.experts``, gemma4's ``experts``.
_EXPERT_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:mlp\.)?experts\.(?:(\d+)\.(gate|up|down)_proj\.weight"
                        r"|(gate_up|down)_proj\[(\d+)\](?:\[(\d+):\d+\])?)")
#: Families whose experts llama.cpp's converter writes stacked (and gemma4's gate and up fused).
_STACKED_EXPERTS = ("qwen3_moe", "gemma4")
#: The text llama.cpp's converter tokenizes, and hashes the ids of, to name a WordPiece
#: vocabulary's ``tokenizer.ggml.pre`` (its ``get_vocab_base_pre``).
_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
           "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
           "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
           "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
           "I'll make it, 'D you like some tea? We'Ve a'lL")
#: The converter's names of those hashes, for the WordPiece vocabularies it knows (BERT's uncased
#: one, of bge-small-en-v1.5 and all-MiniLM-L6-v2: ``bert-bge``).
WORDPIECE_PRE = {"0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "bert-bge"}
#: Gemma 4 control tokens the converter writes as user-defined, so that llama.cpp renders them.
_GEMMA4_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                   '<|"|>'}
#: Gemma 2 and 3's big models, where llama.cpp scales queries by (hidden / heads) ** -0.5 instead
#: of head_dim ** -0.5: (hidden, layers) of Gemma 2 27B and Gemma 3 27B.
_GEMMA_27B = {"gemma2": (4608, 46), "gemma3": (5376, 62)}
#: A byte-level BPE ``pre_tokenizer`` block (canonical JSON of its parts) -> ``tokenizer.ggml.pre``.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    ("bytelevel+regex",): "gpt-2",
    ("digits", "bytelevel+regex"): "smollm",
    ("split:" + _LLAMA3, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2, "bytelevel"): "qwen2",
}
#: Matrices the converter writes as float32 whatever the file type (its ``prepare_tensors``).
F32_TENSORS = re.compile(r"blk\.\d+\.ffn_gate_inp\.weight|position_embd\.weight|token_types\.weight")
_LAYER_RE = re.compile(r"(?:.*\.)?layers?\.(\d+)\.(.+)\.(weight|bias)")
_BARE_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------- tensors
def gguf_tensor_name(hf_name: str, family: str) -> str:
    """The GGUF name of a Hugging Face tensor (``model.layers.3.self_attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``), by :mod:`cqjax.io.gguf`'s name tables read backwards.

    Raises:
      CheckpointError: a tensor llama.cpp's ``family`` architecture has no slot for.
    """
    arch = ARCHITECTURES[family]
    bare = _BARE_RE.fullmatch(hf_name)
    table = {hf: g for g, hf in BARE_NAMES.get(arch, {}).items()}
    if bare and bare.group(2) in table:
        return f"blk.{bare.group(1)}.{table[bare.group(2)]}"
    m = _LAYER_RE.fullmatch(hf_name)
    table = _block_table(family)
    if m and m.group(2) in table:
        module = m.group(2).rsplit(".", 1)[-1]
        if m.group(3) == "weight" or module in _BIASES[family]:
            return f"blk.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    elif not m:
        for gguf_name, hf in global_names(arch).items():  # also model.language_model.* of multimodal checkpoints
            if hf_name == hf or (hf != "lm_head.weight" and hf_name.endswith("." + hf.removeprefix("model."))):
                return gguf_name
    raise CheckpointError(f"{hf_name}: no GGUF tensor of llama.cpp's {arch!r} architecture takes it")


def expert_part(hf_name: str, family: str = "qwen3_moe") -> tuple[str, int, int] | None:
    """``(GGUF stacked tensor, expert, part)`` of an expert projection's ``meta.hf_name``; None
    for any other tensor. qwen3_moe's go to ``ffn_{gate,up,down}_exps`` (``...experts.3.up_proj.weight``
    or ``...experts.gate_up_proj[3][I:2I]`` -> ``("blk.N.ffn_up_exps.weight", 3, 0)``); gemma4's
    gate and up to ``ffn_gate_up_exps``, part 0 (gate rows) and 1 (up rows) of each expert."""
    m = _EXPERT_RE.fullmatch(hf_name)
    if m is None:
        return None
    if m.group(2) is not None:
        proj, e = m.group(3), int(m.group(2))
    else:
        proj, e = m.group(4), int(m.group(5))
        if proj == "gate_up":
            proj = "gate" if m.group(6) in (None, "0") else "up"
    if family == "gemma4" and proj in ("gate", "up"):
        return f"blk.{m.group(1)}.ffn_gate_up_exps.weight", e, int(proj == "up")
    return f"blk.{m.group(1)}.ffn_{proj}_exps.weight", e, 0


def _block_table(family: str) -> dict[str, str]:
    """HF module (after ``layers.N.``) -> GGUF block tensor, for one family."""
    return {hf: g for g, hf in BLOCK_NAMES[ARCHITECTURES[family]].items()}


def tensor_type(name: str, shape: tuple[int, ...], dtype: str) -> str:
    """The GGML type a tensor is written as: 1-D tensors and those llama.cpp's converter always
    keeps in float32 (:data:`F32_TENSORS`: MoE routers, position and token-type embeddings, which
    llama.cpp's CPU backend adds to float32 activations) ``F32``; other matrices ``dtype``, or
    ``F16`` when their rows (last dim) are not a multiple of its block size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = DTYPES[dtype][0]
    if len(shape) < 2 or F32_TENSORS.fullmatch(name):
        return "F32"
    block = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]
    return kind if shape[-1] % block == 0 else "F16"


def _encode(array: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if kind in ("F32", "F16"):
        return np.ascontiguousarray(array, np.float32 if kind == "F32" else np.float16)
    return quants.quantize(np.ascontiguousarray(array, np.float32), GGMLQuantizationType[kind])


def _to_gguf_layout(name: str, array: np.ndarray, family: str, cfg: Any) -> np.ndarray:
    """Re-applies what llama.cpp's converter changes (the module table)."""
    if ARCHITECTURES[family] == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
        return permute_qk(array, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
    if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return array + np.float32(1.0)
    return array


# ----------------------------------------------------------------------------- metadata
def _check_config(cfg: Any, family: str) -> None:
    """Refuses what llama.cpp's graph for ``family`` would silently compute differently."""
    arch = ARCHITECTURES[family]
    problems = ([] if family == "bert" else _gemma4_problems(cfg) if family == "gemma4"
                else _decoder_problems(cfg, family))
    if problems:
        raise CheckpointError(f"family {family!r} (llama.cpp architecture {arch!r}): cannot export "
                              f"{'; '.join(problems)}")


def _gemma4_problems(cfg: Any) -> list[str]:
    """What llama.cpp's gemma4 graph (and its converter's metadata) cannot express."""
    problems = []
    if getattr(cfg, "vision", None) is not None or getattr(cfg, "audio", None) is not None:
        problems.append("the vision/audio towers of a multimodal model (llama.cpp's converter writes them to a "
                        "separate mmproj file, which this export does not write)")
    if cfg.attention_bias:
        problems.append("attention biases (llama.cpp's gemma4 reads none)")
    if cfg.act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        problems.append(f"activation {cfg.act!r} (llama.cpp's gemma4 computes tanh-approximated GELU)")
    rope = dict(cfg.rope)
    if "sliding_attention" in rope and cfg.rope_for("sliding_attention").get("rope_type", "default") != "default":
        problems.append("scaled RoPE on sliding layers")
    full = cfg.rope_for("full_attention")
    if full.get("rope_type", "default") not in ("default", "proportional") or float(full.get("factor", 1.0)) != 1.0:
        problems.append(f"full-attention RoPE {full} (llama.cpp's converter writes proportional RoPE without a factor)")
    shared = sum(s.kv_sharing == "reuse" for s in cfg.layers)
    if kv_producers_differ(list(cfg.layer_types), shared):
        problems.append(f"KV sharing of the last {shared} layers other than llama.cpp's (layer n - shared - 2 "
                        "sliding, n - shared - 1 full, for the shared layers of each type)")
    if cfg.hidden_size_per_layer_input and cfg.vocab_size_per_layer_input != cfg.vocab_size:
        problems.append(f"a per-layer embedding table of {cfg.vocab_size_per_layer_input} rows (llama.cpp reads "
                        f"vocab_size = {cfg.vocab_size})")
    return problems


def _decoder_problems(cfg: Any, family: str) -> list[str]:
    """What llama.cpp's graph for one of the transformer decoder families computes differently."""
    full = cfg.rope_for("full_attention") if "full_attention" in dict(cfg.rope) else {}
    problems = []
    for t in set(cfg.layer_types):
        rope_type = cfg.rope_for(t).get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            problems.append(f"rope_type {rope_type!r} (only default and linear are exported)")
    if cfg.rotary_dim is not None:
        problems.append(f"partial rotary_dim={cfg.rotary_dim}")
    if family not in ("gemma2", "gemma3") and "sliding_attention" in cfg.layer_types:
        problems.append("sliding-window layers (llama.cpp's graph attends over the full context)")
    if family == "qwen3_moe" and (tuple(cfg.moe_layers) != tuple(range(cfg.num_layers)) or not cfg.norm_topk_prob):
        problems.append("dense layers or un-normalized top-k weights (llama.cpp's qwen3moe routes every layer "
                        "and renormalizes)")
    if family == "gemma2" and list(cfg.layer_types) != [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)]:
        problems.append("layer types other than llama.cpp's alternation (even layers sliding)")
    if family in ("gemma2", "gemma3"):
        if family == "gemma3" and (cfg.final_softcap is not None or cfg.attn_softcap is not None):
            problems.append("logit soft-capping")
        # llama.cpp scales queries by head_dim ** -0.5, hidden / heads for the 27B models only
        big = (cfg.hidden_size, cfg.num_layers) == _GEMMA_27B[family]
        want = (cfg.hidden_size // cfg.num_heads if big else cfg.head_dim) ** -0.5
        if not np.isclose(cfg.query_scale, want):
            problems.append(f"query scale {cfg.query_scale:.6g} != {want:.6g} (llama.cpp's)")
        local = cfg.rope_for("sliding_attention") if "sliding_attention" in cfg.layer_types else {}
        if family == "gemma3" and local.get("rope_type", "default") != "default":
            problems.append("scaled RoPE on sliding layers")
    elif not np.isclose(cfg.query_scale, cfg.head_dim ** -0.5) or full.get("attention_factor", 1.0) != 1.0:
        problems.append(f"query scale {cfg.query_scale:.6g} != head_dim ** -0.5")
    return problems


def _add_architecture(w: Any, cfg: Any, family: str, raw: dict, source: Path) -> None:
    from gguf import RopeScalingType

    context = raw.get("max_position_embeddings")
    if context is None:
        raise CheckpointError(f"{source / 'config.json'}: key 'max_position_embeddings' (llama.cpp's "
                              "context_length) is missing")
    w.add_context_length(int(context))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_vocab_size(cfg.vocab_size)
    if family == "gemma4":
        return _add_gemma4(w, cfg)
    if family == "bert":
        return _add_bert(w, cfg, source)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rope = cfg.rope_for("full_attention") if "full_attention" in cfg.layer_types else cfg.rope_for(cfg.layer_types[0])
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", "default") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if family == "qwen3_moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "gemma2":  # llama.cpp alternates the windows itself (checked in _check_config)
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_attn_logit_softcapping(float(cfg.attn_softcap if cfg.attn_softcap is not None else 0.0))
        w.add_final_logit_softcapping(float(cfg.final_softcap if cfg.final_softcap is not None else 0.0))
    if family == "gemma3":
        w.add_sliding_window(int(cfg.sliding_window or raw.get("sliding_window") or 0))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        if "sliding_attention" in cfg.layer_types:
            w.add_rope_freq_base_swa(float(cfg.rope_for("sliding_attention")["rope_theta"]))


def _add_gemma4(w: Any, cfg: Any) -> None:
    """The converter's ``Gemma4Model.set_gguf_parameters``: per-layer arrays where layers differ
    (MLP width of the double-wide KV-shared layers, KV heads of full vs sliding layers), the
    head size of each layer type, the sliding pattern, KV sharing, per-layer embeddings, MoE."""
    layers = cfg.layers
    full = next(s for s in layers if s.layer_type == "full_attention")  # the last layer is full
    swa = next((s for s in layers if s.layer_type == "sliding_attention"), full)
    widths, kv = [s.intermediate_size for s in layers], [s.num_kv_heads for s in layers]
    w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(full.head_dim)
    w.add_value_length(full.head_dim)
    w.add_key_length_swa(swa.head_dim)
    w.add_value_length_swa(swa.head_dim)
    w.add_rope_dimension_count(full.head_dim)  # the unrotated part is rope_freqs' business
    w.add_rope_dimension_count_swa(swa.head_dim)
    w.add_rope_freq_base(float(cfg.rope_for("full_attention")["rope_theta"]))
    if "sliding_attention" in dict(cfg.rope):
        w.add_rope_freq_base_swa(float(cfg.rope_for("sliding_attention")["rope_theta"]))
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_shared_kv_layers(sum(s.kv_sharing == "reuse" for s in layers))
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(float(cfg.final_softcap))
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _add_bert(w: Any, cfg: Any, source: Path) -> None:
    """The converter's ``BertModel.set_gguf_parameters``; the pooling is mean, the sentence
    embedding cqjax's BERT family computes (a ``modules.json`` of ``source`` that pools
    otherwise is refused)."""
    from gguf import PoolingType

    modules = source / "modules.json"
    for module in json.loads(modules.read_text()) if modules.is_file() else []:
        pooling = source / module.get("path", "") / "config.json"
        if module.get("type") == "sentence_transformers.models.Pooling" and pooling.is_file() and \
                not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
            raise CheckpointError(f"{pooling}: not mean pooling; cqjax's BERT family and its GGUF export pool "
                                  "by the mean of the tokens")
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_layer_norm_eps(float(cfg.layer_norm_eps))
    w.add_causal_attention(False)
    w.add_pooling_type(PoolingType.MEAN)
    w.add_token_type_count(cfg.type_vocab_size)


def _extra_tensors(cfg: Any, family: str) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp's converter adds that the model has no parameter for: gemma4's
    ``rope_freqs`` (its full layers' proportional RoPE: 1 for each rotated pair, 1e30 for the
    rest; llama.cpp requires it)."""
    if family != "gemma4":
        return []
    from cqjax.models.layers import rope_inv_freq

    head_dim = next(s for s in cfg.layers if s.layer_type == "full_attention").head_dim
    rotated = int(np.count_nonzero(rope_inv_freq(cfg.rope_for("full_attention"), head_dim)))
    return [("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), np.float32))]


# ----------------------------------------------------------------------------- tokenizer
def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``, recognized from its
    ``pre_tokenizer`` block (:data:`PRE_TOKENIZERS`); None when it is not one llama.cpp knows."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = []
    for p in parts:
        if p.get("type") == "ByteLevel":
            key.append("bytelevel+regex" if p.get("use_regex", True) else "bytelevel")
        elif p.get("type") == "Digits" and p.get("individual_digits"):
            key.append("digits")
        elif p.get("type") == "Split" and "Regex" in (p.get("pattern") or {}):
            key.append("split:" + p["pattern"]["Regex"])
        else:
            return None
    return PRE_TOKENIZERS.get(tuple(key))


def wordpiece_pre_name(tokenizer_json: Path) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a WordPiece ``tokenizer.json``, as its converter
    names it: by the hash of the ids of a fixed text (:data:`WORDPIECE_PRE`); None when unknown."""
    from hashlib import sha256

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    return WORDPIECE_PRE.get(sha256(str(tok.encode(_CHKTXT).ids).encode()).hexdigest())


def _add_gemma4_tokenizer(w: Any, directory: Path, n_vocab: int) -> bool:
    """The converter's ``Gemma4Model.set_vocab`` (``gguf.LlamaHfVocab``: a byte-fallback BPE
    ``tokenizer.json``, written as ``tokenizer.ggml.model = gemma4`` with its merges); False, and
    nothing written, for a tokenizer of another kind (written as for every family)."""
    from gguf import LlamaHfVocab, SpecialVocab, TokenType

    try:
        vocab = LlamaHfVocab(directory)
    except (FileNotFoundError, TypeError):
        return False
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(TokenType.USER_DEFINED if text.decode() in _GEMMA4_VISIBLE else kind)
    if len(tokens) > n_vocab:
        raise CheckpointError(f"{directory / 'tokenizer.json'}: {len(tokens)} tokens for a model of "
                              f"vocab_size {n_vocab}")
    tokens += [f"[PAD{j}]".encode() for j in range(len(tokens), n_vocab)]
    scores += [-1000.0] * (n_vocab - len(scores))
    types += [TokenType.UNUSED] * (n_vocab - len(types))
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    special.add_special_token["bos"] = True  # the converter's add_add_bos_token(True)
    special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    return True


def _add_tokenizer(w: Any, directory: Path, n_vocab: int, pre: str | None, family: str) -> dict:
    """Writes the ``tokenizer.*`` metadata from the Hugging Face files in ``directory``; returns
    what it chose (``tokenizer_model``, ``tokenizer_pre``, ``warnings``)."""
    from gguf import SpecialVocab, TokenType

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a GGUF needs the tokenizer (only tokenizer.json is read)")
    if family == "gemma4" and _add_gemma4_tokenizer(w, directory, n_vocab):
        return {"tokenizer_model": "gemma4", "tokenizer_pre": None, "warnings": []}
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, notes = tok.get("model", {}), []
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    if model.get("type") == "Unigram":
        pieces = [(p, float(s)) for p, s in model["vocab"]]
        kind = "llama"
    elif model.get("type") in ("BPE", "WordPiece"):
        vocab = model["vocab"]
        pieces = [(t, 0.0) for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [i for _, i in sorted(vocab.items(), key=lambda kv: kv[1])] != list(range(len(vocab))):
            raise CheckpointError(f"{path}: {model['type']} vocabulary ids are not 0..{len(vocab) - 1}")
        kind = "bert" if model["type"] == "WordPiece" else "llama" if model.get("byte_fallback") else "gpt2"
        if kind == "llama":  # SentencePiece scores from merge ranks: llama.cpp merges the best-scoring pair
            rank = {}
            for r, m in enumerate(model.get("merges", [])):
                rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
            pieces = [(t, -float(rank[t]) if t in rank else -1e9) for t, _ in pieces]
    else:
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r} has no GGUF export "
                              "(supported: byte-level BPE, byte-fallback BPE, Unigram, WordPiece)")
    for i in sorted(added):
        if i >= len(pieces):
            pieces.extend([(f"[PAD{j}]", -1e9) for j in range(len(pieces), i)] + [(added[i]["content"], 0.0)])
    if len(pieces) > n_vocab:
        raise CheckpointError(f"{path}: {len(pieces)} tokens for a model of vocab_size {n_vocab}")
    pieces += [(f"[PAD{j}]", -1e9) for j in range(len(pieces), n_vocab)]
    types = []
    for i, (text, _) in enumerate(pieces):
        if i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif text.startswith("[PAD") and i >= len(model.get("vocab", ())):
            types.append(TokenType.UNUSED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(TokenType.BYTE)
        elif text == model.get("unk_token"):
            types.append(TokenType.UNKNOWN)
        else:
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        found = pre_tokenizer_name(tok)
        if pre is None and found is None:
            notes.append(f"{path}: pre-tokenizer not recognized; wrote tokenizer.ggml.pre='default' (llama.cpp "
                         "may split text differently from transformers); pass pre=NAME to choose")
        pre = pre or found or "default"
    elif kind == "bert":  # llama.cpp's WordPiece splits text itself: the name is a label
        pre = pre or wordpiece_pre_name(path) or "default"
        pieces = [(t if types[i] == TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t, s)
                  for i, (t, s) in enumerate(pieces)]  # the converter's phantom spaces
    else:
        pre = pre or "default"
        normalizer = json.dumps(tok.get("normalizer")) + json.dumps(tok.get("pre_tokenizer"))
        w.add_add_space_prefix('"Prepend"' in normalizer or '"prepend_scheme": "always"' in normalizer)
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in pieces])
    w.add_token_types(types)
    if kind == "llama":
        w.add_token_scores([s for _, s in pieces])
    special = SpecialVocab(directory, load_merges=kind == "gpt2", n_vocab=n_vocab)
    if kind != "bert":  # llama.cpp adds [CLS] to a WordPiece input unless told otherwise
        special.add_special_token.setdefault("bos", False)  # as transformers: no template, no BOS
    special.add_to_gguf(w, quiet=True)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return {"tokenizer_model": kind, "tokenizer_pre": pre, "warnings": notes}


# ----------------------------------------------------------------------------- export
def export_gguf(ir: Any, out: str | os.PathLike, *, config_from: str | os.PathLike, dtype: str = "Q8_0",
                note: dict | None = None, pre: str | None = None) -> dict:
    """Writes ``ir`` as a GGUF file ``out`` that llama.cpp loads, atomically.

    Args:
      ir: a quantized or float IR of a family in :data:`ARCHITECTURES` (quantized leaves decoded).
      out: the ``.gguf`` file to write (replaced if it exists).
      config_from: the directory with the source checkpoint's ``config.json`` and tokenizer files.
      dtype: ``F32``, ``F16``, ``Q8_0`` or ``Q4_0`` for matrices (1-D tensors stay ``F32``).
      note: JSON-able facts stored as ``cqjax.note`` in the file's metadata.
      pre: llama.cpp pre-tokenizer name, overriding the one recognized from ``tokenizer.json``.

    Returns:
      ``{"bits_per_weight", "bytes", "tensor_types": {type: count}, "f16_fallback": [names],
      "architecture", "tokenizer_model", "tokenizer_pre", "warnings"}``; bits per weight counts
      the tensor data of the file over its parameters.

    Raises:
      CheckpointError: an unsupported family, dtype, config feature or tensor, or missing files.
    """
    import gguf

    if ir.family not in ARCHITECTURES:
        raise CheckpointError(f"family {ir.family!r} has no GGUF export (supported: {', '.join(ARCHITECTURES)})")
    if dtype not in DTYPES:
        raise CheckpointError(f"export.dtype={dtype!r}: expected one of {sorted(DTYPES)} for GGUF")
    from cqjax.io.export import checkpoint_layout, hf_arrays

    cfg, family, source, out = ir.config, ir.family, Path(config_from), Path(out)
    _check_config(cfg, family)
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source / 'config.json'}: missing; the GGUF export reads the context length from it")
    raw = json.loads((source / "config.json").read_text())
    raw = raw.get("text_config", raw)
    plan, parts = _plan(ir, family, dtype, checkpoint_layout)
    extras = _extra_tensors(cfg, family)
    plan = [(name, array.shape, "F32") for name, array in extras] + plan

    arch = ARCHITECTURES[family]
    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(str((note or {}).get("artifact") or raw.get("_name_or_path") or source)).name)
    w.add_file_type(gguf.LlamaFileType[DTYPES[dtype][1]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(w, cfg, family, raw, source)
    info = _add_tokenizer(w, source, cfg.vocab_size, pre, family)
    if note:
        w.add_string("cqjax.note", json.dumps(note, sort_keys=True, default=str))
    data_bytes = 0
    for name, shape, kind in plan:
        qtype = gguf.GGMLQuantizationType[kind]
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)) if kind not in ("F32", "F16")
                     else np.prod(shape) * (4 if kind == "F32" else 2))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        data_bytes += nbytes

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        w.open_output_file(Path(tmp))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        pending: dict[str, dict] = {}
        order = iter(plan)
        for _, array in extras:  # first in the plan
            next(order)
            w.write_tensor_data(array)
        for hf_name, array in hf_arrays(ir, "float32"):
            name, index = parts[hf_name]
            pending.setdefault(name, {})[index] = array
            if len(pending[name]) < parts.count(name):
                continue  # a stacked tensor waits for its last expert
            expected, _, kind = next(order)
            if name != expected:
                raise CheckpointError(f"{name}: complete out of order (expected {expected}); the header is wrong")
            got = pending.pop(name)  # {None: array}, or {(expert, part): array} of a stack
            array = got[None] if index is None else _stack(got)
            w.write_tensor_data(_encode(_to_gguf_layout(name, array, family, cfg), kind))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    n_params = sum(int(np.prod(p[1])) for p in plan)
    return {"bits_per_weight": 8 * data_bytes / n_params, "bytes": out.stat().st_size,
            "tensor_types": dict(Counter(p[2] for p in plan)), "architecture": arch,
            "f16_fallback": [p[0] for p in plan if p[2] == "F16" and DTYPES[dtype][0] != "F16" and len(p[1]) > 1],
            **info}


class _Parts(dict):
    """``{meta.hf_name: (GGUF tensor, (expert, part) or None)}``, with the part count per tensor."""

    def count(self, name: str) -> int:
        return self.counts[name]


def _plan(ir: Any, family: str, dtype: str, checkpoint_layout) -> tuple[list, _Parts]:
    """The GGUF tensors ``[(name, shape, type)]`` in the order their last part is decoded (the
    write order), and where each IR tensor goes. The experts of qwen3_moe and gemma4 are stacked
    back into llama.cpp's ``[E, out, in]`` tensors (gemma4's gate and up rows of an expert one
    after the other, in ``ffn_gate_up_exps``); every other IR tensor is one GGUF tensor."""
    parts, shapes, stacks, last = _Parts(), {}, {}, {}
    parts.counts = Counter()
    for i, path in enumerate(ir.params):  # the order hf_arrays yields them in
        meta = ir.meta[path]
        if not meta.hf_name:
            raise CheckpointError(f"{path}: has no Hugging Face name in the IR")
        shape = tuple(checkpoint_layout(path, meta.role, np.broadcast_to(np.uint8(0), meta.shape)).shape)
        stacked = expert_part(meta.hf_name, family) if family in _STACKED_EXPERTS else None
        name, index = (stacked[0], stacked[1:]) if stacked else (gguf_tensor_name(meta.hf_name, family), None)
        if (index is None and name in shapes) or index in stacks.get(name, {}) or meta.hf_name in parts:
            raise CheckpointError(f"two IR tensors map to the GGUF tensor {name!r}")
        if index is None:
            shapes[name] = shape
        else:
            stacks.setdefault(name, {})[index] = shape
        parts[meta.hf_name] = (name, index)
        parts.counts[name] += 1
        last[name] = i
    for name, pieces in stacks.items():
        n_experts, n_parts = 1 + max(e for e, _ in pieces), 1 + max(p for _, p in pieces)
        complete = set(pieces) == {(e, p) for e in range(n_experts) for p in range(n_parts)}
        rows = {sum(pieces[e, p][0] for p in range(n_parts)) for e in range(n_experts)} if complete else set()
        if len(rows) != 1 or len({s[1:] for s in pieces.values()}) != 1:
            raise CheckpointError(f"{name}: the experts decoded ({sorted(pieces)}) do not make one stack")
        shapes[name] = (n_experts, rows.pop(), *next(iter(pieces.values()))[1:])
    plan = [(name, shapes[name], tensor_type(name, shapes[name], dtype)) for name in sorted(last, key=last.get)]
    return plan, parts


def _stack(got: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """``[E, rows, in]`` from ``{(expert, part): [rows_part, in]}`` (each expert's parts in order)."""
    experts = 1 + max(e for e, _ in got)
    return np.stack([np.concatenate([got[k] for k in sorted(k for k in got if k[0] == e)]) for e in range(experts)])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- KL report
def kl_to_runtime(gguf_path: str | os.PathLike, model: Any, tokens: Any, *, kernel: str | None = None,
                  n_threads: int | None = None) -> dict:
    """How far llama.cpp's model in ``gguf_path`` is from cqjax's runtime on the same token ids.

    Runs llama-cpp-python (imported here; ``pip install llama-cpp-python``) over ``tokens`` and
    :func:`cqjax.runtime.forward_fn` over the same ids, and compares next-token distributions.

    Args:
      gguf_path: a GGUF file (as :func:`export_gguf` writes).
      model: the cqjax model (``api.load(dir).model``).
      tokens: a 1-D sequence of token ids (a BOS first if the model expects one).
      kernel: cqjax's kernel mode for its side (:mod:`cqjax.kernels.backend`): ``"jax"`` runs
        the decoded weights exactly, the default (``auto``) the C++ kernel, which rounds
        activations to int8, as deployed.
      n_threads: llama.cpp threads (its default when None).

    Returns:
      ``{"kl": mean KL(cqjax || llama.cpp) in nats/token, "kl_max", "top1": agreement of the
      argmax, "rel_err": |logit difference| / |logits| (each row centred), "tokens": count}``;
      ``rel_err`` is scale-free, so it also tells on random models whose outputs are near uniform.
    """
    import contextlib

    import llama_cpp

    from cqjax.kernels.backend import use_kernel
    from cqjax.runtime import forward_fn

    ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                          logits_all=True, verbose=False, n_threads=n_threads)
    try:
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], np.float64)
    finally:
        llm.close()
    with use_kernel(kernel) if kernel else contextlib.nullcontext():  # the mode is read when traced
        ours = forward_fn(model)(np.asarray([ids], np.int32), np.ones((1, len(ids)), bool))[0]
    ours = np.asarray(ours, np.float64)
    if ours.shape != theirs.shape:
        raise CheckpointError(f"{gguf_path}: llama.cpp gives logits {theirs.shape}, cqjax {ours.shape}")
    log_p = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    log_q = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    centred = ours - ours.mean(-1, keepdims=True)
    diff = centred - (theirs - theirs.mean(-1, keepdims=True))
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "rel_err": float(np.linalg.norm(diff) / np.linalg.norm(centred)), "tokens": len(ids)}


def embeddings_to_runtime(gguf_path: str | os.PathLike, model: Any, tokenizer: Any, texts: list[str], *,
                          kernel: str | None = None, n_threads: int | None = None) -> dict:
    """How far llama.cpp's BERT encoder in ``gguf_path`` is from cqjax's runtime on the same texts.

    llama.cpp (llama-cpp-python, imported here) tokenizes and embeds each text twice: with the
    file's pooling (mean, as :func:`export_gguf` writes it), L2-normalized, and without pooling
    (the last hidden state of every token). cqjax runs the ids of the Hugging Face ``tokenizer``
    (:meth:`cqjax.models.bert.SentenceEncoder.sentence_embedding` and the model's hidden states).

    Args:
      gguf_path: a BERT GGUF file (as :func:`export_gguf` writes).
      model: the cqjax encoder (``api.load(dir).model``).
      tokenizer: its Hugging Face tokenizer (``api.load(dir).tokenizer``).
      texts: the texts to embed (each within the model's positions; special tokens written in a
        text are not parsed by llama.cpp's ``embed``).
      kernel: cqjax's kernel mode for its side, as in :func:`kl_to_runtime`.
      n_threads: llama.cpp threads (its default when None).

    Returns:
      ``{"cosine": the lowest cosine between the two sentence embeddings of a text, "cosine_mean",
      "rel_err": |hidden-state difference| / |hidden states| over all real tokens (NaN unless the ids
      agree), "ids_equal": the fraction of texts llama.cpp tokenizes to the tokenizer's ids, "texts"}``.
    """
    import contextlib

    import jax
    import llama_cpp
    from flax import nnx

    from cqjax.kernels.backend import use_kernel

    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], bool)
    n = 1 << max(6, (ids.shape[1] - 1).bit_length())  # llama.cpp's mean pooling fails on some other sizes
    runs = {}  # pooled (the file's pooling, normalized) and per-token embeddings
    for key, pooling in (("pooled", llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED),
                         ("tokens", llama_cpp.LLAMA_POOLING_TYPE_NONE)):
        llm = llama_cpp.Llama(model_path=str(gguf_path), embedding=True, pooling_type=pooling, n_ctx=n, n_batch=n,
                              n_ubatch=n, verbose=False, n_threads=n_threads)
        try:
            same = [llm.tokenize(t.encode(), add_bos=True, special=False) == list(row[m])
                    for t, row, m in zip(texts, ids, mask)]
            runs[key] = [np.asarray(llm.embed(t, normalize=key == "pooled"), np.float64) for t in texts]
        finally:
            llm.close()
    graphdef, state = nnx.split(model)

    def run(state, ids, mask):
        encoder = nnx.merge(graphdef, state)
        return encoder.sentence_embedding(ids, mask), encoder(ids, mask)

    with use_kernel(kernel) if kernel else contextlib.nullcontext():  # the mode is read when traced
        pooled, states = (np.asarray(a, np.float64) for a in jax.jit(run)(state, ids, mask))
    states = np.concatenate([s[m] for s, m in zip(states, mask)])
    sentences = np.stack(runs["pooled"])
    cosine = (pooled * sentences).sum(-1) / np.linalg.norm(pooled, axis=-1) / np.linalg.norm(sentences, axis=-1)
    aligned = all(same) and [len(t) for t in runs["tokens"]] == list(mask.sum(-1))
    rel_err = np.linalg.norm(np.concatenate(runs["tokens"]) - states) / np.linalg.norm(states) if aligned else np.nan
    return {"cosine": float(cosine.min()), "cosine_mean": float(cosine.mean()), "rel_err": float(rel_err),
            "ids_equal": float(np.mean(same)), "texts": len(texts)}
