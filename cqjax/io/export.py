"""Export a model out of cqjax: a dequantized Hugging Face checkpoint that transformers loads.

The IR keeps every tensor's Hugging Face name (``meta.hf_name``) and the importer's layout
change is a transpose for linears (:data:`cqjax.io.hf.TRANSPOSED_ROLES`), so the checkpoint
is the IR read backwards: each quantized leaf decoded once (:func:`cqjax.quant_stats.dequantizer`,
the function the runtime computes, input scales included), transposed back to ``[out, in]``
and written under its name. GGUF-born weights were already converted to Hugging Face's
conventions at import (:mod:`cqjax.io.gguf` undid llama.cpp's q/k permutation and Gemma's
``w + 1`` norms), and cqjax applies Gemma's norm offset in the model, not to the weight, so
nothing else is re-applied.

The weights file is written one tensor at a time (header first, then each tensor decoded and
appended), so an export holds one decoded tensor at a time, and the directory appears
atomically (:func:`cqjax.io.atomic.replace_dir`).

>>> export_hf(api.load("out/artifact").ir, "out/hf", config_from="out/artifact/tokenizer")  # doctest: +SKIP
>>> transformers.AutoModelForCausalLM.from_pretrained("out/hf")                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from cqjax.errors import CheckpointError
from cqjax.io import atomic
from cqjax.io.artifact_writer import raw_bytes, safetensors_header
from cqjax.ir import IR, materialize

#: ``export.dtype`` values and the numpy dtype each writes.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
WEIGHTS = "model.safetensors"
#: Tokenizer and generation files copied beside the weights (config.json is rewritten).
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
          "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def checkpoint_layout(path: str, role: str, array: np.ndarray) -> np.ndarray:
    """A float leaf of the IR in its checkpoint layout: linears back to ``[..., out, in]``.

    Raises:
      CheckpointError: a role whose import is not a plain transpose (an unfolded convolution).
    """
    from cqjax.io.hf import TRANSPOSED_ROLES

    if role == "conv":
        raise CheckpointError(f"{path}: a convolution (role 'conv') has no Hugging Face export yet; "
                            "export supports linear, embedding and norm tensors")
    return np.swapaxes(array, -1, -2) if role in TRANSPOSED_ROLES and array.ndim >= 2 else array


def hf_arrays(ir: IR, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """``(Hugging Face name, array)`` of every IR tensor in its checkpoint layout and ``dtype``,
    quantized leaves decoded, one tensor at a time (in IR order)."""
    from cqjax.kernels.qarrays import is_quantized
    from cqjax.quant_stats import dequantizer

    decode = dequantizer()
    for path, leaf in ir.params.items():
        meta = ir.meta[path]
        array = np.asarray(decode(leaf) if is_quantized(leaf) else materialize(leaf), np.float32)
        yield meta.hf_name, np.ascontiguousarray(checkpoint_layout(path, meta.role, array)).astype(DTYPES[dtype])


def export_hf(ir: IR, out: str | os.PathLike, *, config_from: str | os.PathLike, dtype: str = "float32",
              note: dict | None = None) -> Path:
    """Writes ``ir`` as a Hugging Face checkpoint directory ``out`` (``model.safetensors``,
    ``config.json``, tokenizer files), atomically.

    Args:
      ir: a quantized or float IR (quantized leaves are decoded).
      out: the directory to write; an existing one is replaced only if it holds a checkpoint
        (``config.json``) or nothing.
      config_from: the directory whose ``config.json`` and tokenizer files are copied (an
        artifact's ``tokenizer/``, or the source checkpoint).
      dtype: ``float32``, ``bfloat16`` or ``float16``; ``config.json``'s dtype is set to it.
      note: JSON-able facts stored in the weights file's metadata under ``cqjax`` (the
        artifact, its recipe), so the checkpoint says where it came from.

    Raises:
      CheckpointError: no ``config.json`` in ``config_from``, an unknown ``dtype``, a tensor
        without a Hugging Face name, or ``out`` is a directory of something else.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"export.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    source, out = Path(config_from), Path(out)
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source / 'config.json'}: missing; the export needs the source checkpoint's config "
                            "(an artifact keeps it in tokenizer/ when its source had one)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise CheckpointError(f"{out}: exists and is not a Hugging Face checkpoint directory; refusing to replace it")
    np_dtype = DTYPES[dtype]
    specs = [(name, np_dtype, shape, int(np.prod(shape)) * np_dtype.itemsize)
             for name, shape in checkpoint_shapes(ir).items()]
    metadata = {"format": "pt"} | ({"cqjax": json.dumps(note, sort_keys=True)} if note else {})
    header, order = safetensors_header(specs, metadata)
    tmp = atomic.temp_dir(out)
    try:
        _write_weights(tmp / WEIGHTS, header, [s[0] for s in order], hf_arrays(ir, dtype))
        config = json.loads((source / "config.json").read_text())
        config.pop("quantization_config", None)
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        atomic.write_json(tmp / "config.json", config)
        for name in COPIED:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        atomic.fsync_tree(tmp)
        atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def split_name(hf_name: str) -> tuple[str, int | None]:
    """``(checkpoint tensor name, first row)`` of an IR tensor's ``meta.hf_name``: the importer
    names a slice of a fused tensor (Phi-3's ``qkv_proj``) ``name[start:stop]``."""
    match = _ROWS.fullmatch(hf_name)
    return (match[1], int(match[2])) if match else (hf_name, None)


_ROWS = re.compile(r"(.+)\[(\d+):(\d+)\]")


def checkpoint_shapes(ir: IR) -> dict[str, tuple[int, ...]]:
    """``{checkpoint tensor name: shape}`` of ``ir``'s export, fused tensors whole.

    Raises:
      CheckpointError: a tensor without a Hugging Face name, two tensors under one name, or
        row slices that do not tile their fused tensor.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for path, meta in ir.meta.items():
        if not meta.hf_name:
            raise CheckpointError(f"{path}: has no Hugging Face name in the IR")
        name, start = split_name(meta.hf_name)
        shape = tuple(checkpoint_layout(path, meta.role, np.empty(meta.shape, np.uint8)).shape)
        if start is None:
            if name in shapes:
                raise CheckpointError(f"{path}: another IR tensor is also exported as {name!r}")
            shapes[name] = shape
            continue
        spans.setdefault(name, []).append((start, start + shape[0]))
        shapes[name] = (max(e for _, e in spans[name]), *shape[1:])
    for name, rows in spans.items():
        rows.sort()
        if rows[0][0] != 0 or any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
            raise CheckpointError(f"{name}: the IR's row slices {rows} do not tile the fused tensor")
    return shapes


def _write_weights(path: Path, header: bytes, order: list[str], arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Writes a safetensors file whose header is ``header`` (arrays in file ``order``) from
    ``(meta.hf_name, array)`` pairs as they come: each is written at its offset (a row slice of
    a fused tensor at its rows' offset), so none waits for the others."""
    spec = json.loads(header[8:].decode())
    offsets = {name: spec[name]["data_offsets"][0] for name in order}
    with open(path, "wb") as f:
        f.write(header)
        for hf_name, array in arrays:
            name, start = split_name(hf_name)
            if name not in offsets:
                raise CheckpointError(f"{hf_name}: not in the header of {path}")
            f.seek(len(header) + offsets[name] + (start or 0) * array[0].nbytes)  # a slice: its rows' place
            f.write(raw_bytes(array).tobytes())
