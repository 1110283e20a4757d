"""A CTranslate2 Whisper model directory → a Hugging Face Whisper checkpoint directory.

CTranslate2's converter fuses some projections and renames everything; this undoes it:

=====================================================  ===============================================
CTranslate2 variable                                   Hugging Face tensor(s)
=====================================================  ===============================================
``{enc,dec}oder/layer_i/self_attention/linear_0``      ``…layers.i.self_attn.{q,k,v}_proj`` (rows split in 3;
                                                       k has no bias: its third of the bias must be 0)
``…/self_attention/linear_1``                          ``…self_attn.out_proj``
``…/self_attention/layer_norm/{gamma,beta}``           ``…self_attn_layer_norm.{weight,bias}``
``decoder/layer_i/attention/linear_0``                 ``…encoder_attn.q_proj``
``decoder/layer_i/attention/linear_1``                 ``…encoder_attn.{k,v}_proj`` (rows split in 2)
``decoder/layer_i/attention/linear_2``, ``layer_norm``  ``…encoder_attn.out_proj``, ``encoder_attn_layer_norm``
``…/ffn/linear_0``, ``linear_1``, ``layer_norm``       ``…fc1``, ``fc2``, ``final_layer_norm``
``encoder/conv{1,2}``, ``{enc,dec}oder/layer_norm``    the same names under ``model.``
``encoder/position_encodings/encodings``               ``model.encoder.embed_positions.weight``
``decoder/embeddings/weight``, ``position_encodings``  ``model.decoder.embed_tokens``, ``embed_positions``
=====================================================  ===============================================

The config is rebuilt from the tensors' shapes, the spec's ``num_heads``, and the directory's
``config.json`` (``suppress_ids``, ``suppress_ids_begin``) and ``tokenizer.json`` (the special
tokens). Tensors keep their dtype (fp16 for the packaged tiny.en). The output directory is
written beside its final place and renamed into it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from cqjax.errors import CheckpointError
from cqjax.io import ctranslate2

#: Spec scalars that only restate what the tensors or Whisper's definition fix.
_SCALARS = {"decoder/activation", "decoder/alibi", "decoder/alignment_heads", "decoder/alignment_layer",
            "decoder/num_heads", "decoder/pre_norm", "decoder/scale_embeddings",
            "decoder/start_from_zero_embedding", "encoder/num_heads", "decoder/projection/weight"}
_NORM = {"gamma": "weight", "beta": "bias"}
_BLOCK = re.compile(r"(encoder|decoder)/layer_(\d+)/(self_attention|attention|ffn)/(\w+)/(\w+)")


def hf_tensors(variables: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of a CTranslate2 ``WhisperSpec``'s variables (see the module)."""
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name in _SCALARS:
            continue
        m = _BLOCK.fullmatch(name)
        if m is None:
            out[_plain(name, source)] = value
            continue
        tower, i, part, sub, field = m.groups()
        prefix = f"model.{tower}.layers.{i}."
        field = _NORM.get(field, field)
        if sub == "layer_norm":
            norm = {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm",
                    "ffn": "final_layer_norm"}[part]
            out[f"{prefix}{norm}.{field}"] = value
        elif part == "ffn":
            out[f"{prefix}{_linear(sub, ('fc1', 'fc2'), name, source)}.{field}"] = value
        elif part == "self_attention" and sub == "linear_0":
            _split(out, f"{prefix}self_attn.", ("q_proj", "k_proj", "v_proj"), value, field, name, source)
        elif part == "self_attention":
            out[f"{prefix}self_attn.{_linear(sub, (None, 'out_proj'), name, source)}.{field}"] = value
        elif sub == "linear_1":
            _split(out, f"{prefix}encoder_attn.", ("k_proj", "v_proj"), value, field, name, source)
        else:
            out[f"{prefix}encoder_attn.{_linear(sub, ('q_proj', None, 'out_proj'), name, source)}.{field}"] = value
    return out


def _plain(name: str, source: str) -> str:
    fixed = {"encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
             "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
             "decoder/embeddings/weight": "model.decoder.embed_tokens.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"(encoder/conv[12]|encoder/layer_norm|decoder/layer_norm)/(\w+)", name)
    if m is None:
        raise CheckpointError(f"{source}: CTranslate2 variable {name!r} has no Whisper counterpart")
    return "model." + m.group(1).replace("/", ".") + "." + _NORM.get(m.group(2), m.group(2))


def _linear(sub: str, names: tuple, name: str, source: str) -> str:
    m = re.fullmatch(r"linear_(\d)", sub)
    if m is None or int(m.group(1)) >= len(names) or names[int(m.group(1))] is None:
        raise CheckpointError(f"{source}: CTranslate2 variable {name!r} has no Whisper counterpart")
    return names[int(m.group(1))]


def _split(out: dict, prefix: str, parts: tuple, value: np.ndarray, field: str, name: str, source: str) -> None:
    if value.shape[0] % len(parts):
        raise CheckpointError(f"{source}: {name!r} has {value.shape[0]} rows, not {len(parts)} equal projections")
    for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
        if part == "k_proj" and field == "bias":
            if np.any(piece != 0):
                raise CheckpointError(f"{source}: {name!r} gives the key projection a non-zero bias; Whisper's "
                                      "keys have none")
            continue
        out[f"{prefix}{part}.{field}"] = piece


def hf_config(variables: dict[str, np.ndarray], ct2_config: dict, tokenizer: dict, source: str) -> dict:
    """A transformers ``WhisperConfig`` dict for the converted tensors."""
    try:
        vocab, d = variables["decoder/embeddings/weight"].shape
        specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
        cfg = {
            "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
            "vocab_size": int(vocab), "d_model": int(d), "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
            "encoder_layers": _layers(variables, "encoder"), "decoder_layers": _layers(variables, "decoder"),
            "encoder_attention_heads": int(variables["encoder/num_heads"]),
            "decoder_attention_heads": int(variables["decoder/num_heads"]),
            "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
            "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
            "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
            "activation_function": "gelu", "scale_embedding": False,
            "decoder_start_token_id": specials["<|startoftranscript|>"], "bos_token_id": specials["<|endoftext|>"],
            "eos_token_id": specials["<|endoftext|>"], "pad_token_id": specials["<|endoftext|>"],
            "suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids", [])],
            "begin_suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids_begin", [])],
            "forced_decoder_ids": [[1, specials["<|notimestamps|>"]]] if "<|notimestamps|>" in specials else None,
            "tie_word_embeddings": True, "torch_dtype": "float16",
        }
    except KeyError as e:
        raise CheckpointError(f"{source}: a Whisper model needs {e.args[0]!r} (variable or special token)") from e
    return cfg


def _layers(variables: dict, tower: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{tower}/layer_(\d+)/", k))})


def convert(src: str | Path, out: str | Path, *, log=print) -> Path:
    """Writes the Hugging Face checkpoint of CTranslate2 Whisper directory ``src`` (``model.bin``,
    ``config.json``, ``tokenizer.json``) to ``out`` (``config.json``, ``model.safetensors``,
    ``tokenizer.json``)."""
    from safetensors.numpy import save_file

    src, out = Path(src), Path(out)
    for f in ("model.bin", "tokenizer.json"):
        if not (src / f).is_file():
            raise CheckpointError(f"{src / f}: missing (a CTranslate2 Whisper directory has model.bin and tokenizer.json)")
    spec, variables = ctranslate2.read(src / "model.bin")
    if spec != "WhisperSpec":
        raise CheckpointError(f"{src / 'model.bin'}: a CTranslate2 {spec}, not a WhisperSpec")
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tensors = hf_tensors(variables, str(src / "model.bin"))
    config = hf_config(variables, ct2_config, tokenizer, str(src))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out)
    log(f"whisper: {len(tensors)} tensors from {src / 'model.bin'} -> {out}")
    return out
