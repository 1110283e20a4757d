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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cqjax.io.atomic import write_json

#: Bumped whenever the conversion output changes; recorded in ``cqjax_import.json``.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")

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
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)")
#: Public names of the tables above (the exporter, :mod:`cqjax.io.gguf_export`, inverts them).
BLOCK_NAMES, GLOBAL_NAMES = _BLOCK_NAMES, _GLOBAL_NAMES

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
#: The architecture of each ``model_type`` this module writes into ``config.json``.
_ARCH_OF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3",
                       "phi3": "phi3", "qwen3_moe": "qwen3moe"}

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


def hf_config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str], *, source: str = "<gguf>") -> dict:
    """Translate GGUF metadata into a Hugging Face ``config.json`` dict.

    Args:
      meta: ``{key: value}`` as returned by :func:`read_metadata`.
      tensor_names: names of the tensors in the file (decides ``tie_word_embeddings``).
      source: the file name, for error messages.

    Returns:
      A ``LlamaConfig`` (``model_type: llama``), ``Qwen2Config``, ``Qwen3Config``, ``Gemma2Config``
      or ``Gemma3TextConfig`` (``gemma3_text``) dict.

    Raises:
      GGUFConversionError: unsupported architecture, unknown ``<arch>.*`` key or a missing one.
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
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFConversionError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
        vocab = len(tokens)
    rope_type = get("rope.scaling.type", "none")
    if rope_type not in ("none", "linear"):
        raise GGUFConversionError(f"{source}: {arch}.rope.scaling.type={rope_type!r} is not supported")
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10_000.0))}
    if rope_type == "linear":
        full_rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))

    cfg: dict[str, Any] = {
        "vocab_size": int(vocab),
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
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            cfg[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])

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


# ----------------------------------------------------------------------------- tensors
def hf_tensor_name(gguf_name: str, arch: str, *, source: str = "<gguf>") -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name (``model.layers.3...``)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES[arch]:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[arch][m.group(2)]}.{m.group(3)}"
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
    """Yield ``(hf_name, float32 array [out, in])`` for every tensor of the file, undoing llama.cpp's changes."""
    arch = _ARCH_OF_MODEL_TYPE[config["model_type"]]
    for tensor in reader.tensors:
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


# ----------------------------------------------------------------------------- writing

def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` / ``tokenizer_config.json`` (+ chat template) for a GGUF file.

    Uses ``transformers`` (``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` then
    ``save_pretrained``); this is the only part of the conversion that needs transformers.
    """
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
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
    config = hf_config_from_metadata(meta, {t.name for t in reader.tensors}, source=source)

    tensors: dict[str, np.ndarray] = {}
    for name, w in iter_hf_tensors(reader, config, source=source):
        if name in tensors:
            raise GGUFConversionError(f"{source}: two tensors map to {name!r}")
        tensors[name] = w
    _check_shapes(tensors, config, source)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        write_json(tmp / "config.json", config, sort_keys=True)
        if tokenizer:
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

