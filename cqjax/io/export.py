"""Export a model out of cqjax: a dequantized Hugging Face checkpoint that transformers loads.

The IR keeps every tensor's Hugging Face name (``meta.hf_name``) and the importer's layout
change is a transpose for linears (:data:`cqjax.io.hf.TRANSPOSED_ROLES`) and an unfolding for
convolutions, so the checkpoint is the IR read backwards: each quantized leaf decoded once
(:func:`cqjax.quant_stats.dequantizer`, the function the runtime computes, input scales
included), transposed back to ``[out, in]`` (a convolution folded back to ``[out, in, *window]``,
:func:`checkpoint_layout`) and written under its name. GGUF-born weights were already converted
to Hugging Face's conventions at import (:mod:`cqjax.io.gguf` undid llama.cpp's q/k permutation
and Gemma's ``w + 1`` norms), and cqjax applies Gemma's norm offset in the model, not to the
weight, so nothing else is re-applied.

The weights file is written one tensor at a time (header first, then each tensor decoded and
appended), so an export holds one decoded tensor at a time, and the directory appears
atomically (:func:`cqjax.io.atomic.replace_dir`).

>>> export_hf(api.load("out/artifact").ir, "out/hf", config_from="out/artifact/tokenizer")  # doctest: +SKIP
>>> transformers.AutoModelForCausalLM.from_pretrained("out/hf")                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
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


def checkpoint_layout(path: str, role: str, array: np.ndarray, window: tuple[int, ...] | None = None) -> np.ndarray:
    """A float leaf of the IR in its checkpoint layout: linears back to ``[..., out, in]``; a
    convolution's kernel, the ``[window x in, out]`` linear of its unfolded input (window
    position major, :func:`cqjax.io.hf.import_checkpoint`), folded back to ``[out, in, *window]``.

    Args:
      window: a convolution's window (:func:`conv_windows`), e.g. ``(3, 3)``.

    Raises:
      CheckpointError: a convolution without a window, or whose rows are not a multiple of it.
    """
    from cqjax.io.hf import TRANSPOSED_ROLES

    if role == "conv":
        size = math.prod(window or ())
        if window is None or array.ndim != 2 or array.shape[0] % size:
            raise CheckpointError(f"{path}: a convolution kernel {list(array.shape)} exports only as "
                                  f"[window x in, out] with its window recorded by its module (window {window})")
        n = len(window)
        return np.transpose(array.reshape(*window, array.shape[0] // size, array.shape[1]), (n + 1, n, *range(n)))
    return np.swapaxes(array, -1, -2) if role in TRANSPOSED_ROLES and array.ndim >= 2 else array


def conv_windows(ir: IR) -> dict[str, tuple[int, ...]]:
    """``{IR path: window}`` of ``ir``'s convolutions whose module records one (``window`` in
    the parameter's metadata beside ``role="conv"``, as
    :class:`cqjax.models.gemma4_audio.Conv2d`); empty for a model without convolutions."""
    if not any(m.role == "conv" for m in ir.meta.values()):
        return {}
    from flax import nnx

    from cqjax.io.hf import abstract_model
    from cqjax.models import registry

    _, state = nnx.split(abstract_model(registry.FAMILIES[ir.family], ir.config))
    return {"/".join(map(str, key)): tuple(var.get_metadata()["window"])
            for key, var in nnx.to_flat_state(state) if "window" in var.get_metadata()}


def hf_arrays(ir: IR, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """``(Hugging Face name, array)`` of every IR tensor in its checkpoint layout and ``dtype``,
    quantized leaves decoded, one tensor at a time (in IR order)."""
    from cqjax.kernels.qarrays import is_quantized
    from cqjax.quant_stats import dequantizer

    decode, windows = dequantizer(), conv_windows(ir)
    for path, leaf in ir.params.items():
        meta = ir.meta[path]
        array = np.asarray(decode(leaf) if is_quantized(leaf) else materialize(leaf), np.float32)
        array = checkpoint_layout(path, meta.role, array, windows.get(path))
        yield meta.hf_name, np.ascontiguousarray(array).astype(DTYPES[dtype])


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


def split_name(hf_name: str) -> tuple[str, int | None, int | None]:
    """``(checkpoint tensor name, expert, first row)`` of an IR tensor's ``meta.hf_name``: the
    importer names a slice of a fused tensor (Phi-3's ``qkv_proj``) ``name[start:stop]``, an
    expert of a stacked 3-D tensor ``name[e]`` and rows of one ``name[e][start:stop]``
    (:func:`cqjax.io.hf.slice_label`); ``None`` where the name has no such part.

    >>> split_name("m.experts.gate_up_proj[3][8:16]"), split_name("m.qkv_proj.weight[0:64]")
    (('m.experts.gate_up_proj', 3, 8), ('m.qkv_proj.weight', None, 0))
    """
    match = _SLICE.fullmatch(hf_name)
    if not match or (match[2] is None and match[3] is None):
        return hf_name, None, None
    return match[1], None if match[2] is None else int(match[2]), None if match[3] is None else int(match[3])


_SLICE = re.compile(r"(.+?)(?:\[(\d+)\])?(?:\[(\d+):(\d+)\])?")


def checkpoint_shapes(ir: IR) -> dict[str, tuple[int, ...]]:
    """``{checkpoint tensor name: shape}`` of ``ir``'s export, fused and stacked tensors whole.

    Raises:
      CheckpointError: a tensor without a Hugging Face name, two tensors under one name, or
        slices that do not tile their fused tensor (every expert, each one's rows end to end).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    spans: dict[str, dict[int | None, list[tuple[int, int]]]] = {}
    windows = conv_windows(ir)
    for path, meta in ir.meta.items():
        if not meta.hf_name:
            raise CheckpointError(f"{path}: has no Hugging Face name in the IR")
        name, expert, start = split_name(meta.hf_name)
        shape = tuple(checkpoint_layout(path, meta.role, np.empty(meta.shape, np.uint8), windows.get(path)).shape)
        if expert is None and start is None:
            if name in shapes:
                raise CheckpointError(f"{path}: another IR tensor is also exported as {name!r}")
            shapes[name] = shape
            continue
        rows = spans.setdefault(name, {}).setdefault(expert, [])
        rows.append((start or 0, (start or 0) + shape[0]))
        height = max(e for r in spans[name].values() for _, e in r)
        shapes[name] = (height, *shape[1:]) if expert is None else (
            max(k for k in spans[name] if k is not None) + 1, height, *shape[1:])
    for name, experts in spans.items():
        whole = shapes[name][1] if None not in experts else shapes[name][0]
        stacked = None not in experts
        if (not stacked and len(experts) > 1) or (stacked and sorted(experts) != list(range(shapes[name][0]))):
            raise CheckpointError(f"{name}: the IR's slices cover experts {sorted(experts, key=str)}, "
                                  f"not each of 0..{shapes[name][0] - 1} once")
        for expert, rows in experts.items():
            rows.sort()
            if rows[0][0] != 0 or any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or rows[-1][1] != whole:
                what = "row slices" if expert is None else f"row slices of expert {expert}"
                raise CheckpointError(f"{name}: the IR's {what} {rows} do not tile the fused tensor")
    return shapes


def _write_weights(path: Path, header: bytes, order: list[str], arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Writes a safetensors file whose header is ``header`` (arrays in file ``order``) from
    ``(meta.hf_name, array)`` pairs as they come: each is written at its offset (a row slice of
    a fused tensor at its rows' offset; expert ``e`` of a stacked ``[E, rows, ...]`` tensor at
    ``e`` blocks of ``rows`` rows, its own row slice after that), so none waits for the others."""
    spec = json.loads(header[8:].decode())
    offsets = {name: spec[name]["data_offsets"][0] for name in order}
    with open(path, "wb") as f:
        f.write(header)
        for hf_name, array in arrays:
            name, expert, start = split_name(hf_name)
            if name not in offsets:
                raise CheckpointError(f"{hf_name}: not in the header of {path}")
            row = (start or 0) + (0 if expert is None else expert * spec[name]["shape"][1])
            f.seek(len(header) + offsets[name] + row * array[0].nbytes)  # a slice: its rows' place
            f.write(raw_bytes(array).tobytes())
