"""The quantized-model artifact: one directory, written atomically, read without executing code.

=========================  ===================================================================
file                       content
=========================  ===================================================================
``manifest.json``          format name/version, the model family and its config, one entry
                           per IR path (see below)
``weights.safetensors``    every stored array: a float leaf under its IR path, a quantized
                           leaf's arrays under ``<path>::<field>`` (``::codes``, ``::norms``,
                           ``::codebooks``, ``::s1``, ``::s2``, ``::perm``; RTN: ``::codes``,
                           ``::scales``, ``::zeros``; either may add ``::in_scale``, fp16
                           ``[K]``, when the leaf has input scales; absent otherwise, so older
                           artifacts load as leaves without one)
``tokenizer/``             tokenizer files (and ``config.json``) copied from the source
                           checkpoint, when it had them
=========================  ===================================================================

Manifest entry of one tensor (``manifest["tensors"][i]``):

===================  ==========================================================================
key                  meaning
===================  ==========================================================================
path, role, tower,   the IR path and its :class:`cqjax.ir.TensorMeta` fields (``shape`` is the
hf_name, shape,      logical shape; ``dtype`` the source dtype)
dtype
kind                 ``"float"``, ``"cq"`` or ``"rtn"`` (the leaf's ``format``)
bits, blocks, block  bit width, block plan and nominal block size (null for floats)
seed, K, transposed  the quantized leaf's static fields (``static`` holds all of them)
layout_version       :data:`cqjax.formats.cq.LAYOUT_VERSION` of the packed codes
bytes                bytes this tensor takes in ``weights.safetensors``
arrays               ``{field: {name, dtype, shape, encoding, leaf_dtype, leaf_shape}}``
info                 ``meta.info`` (tagged JSON, so tuples and non-finite floats round-trip)
===================  ==========================================================================

Array encodings (``raw``, ``signs``, ``block_local``) are those of :mod:`cqjax.formats.encoding`.

Loading rebuilds the IR bit for bit (float leaves as lazy tensors over the weights file,
quantized leaves as :class:`~cqjax.kernels.qarrays.CQArray` / ``RTNArray`` of jnp arrays);
:func:`cqjax.io.hf.to_model` then builds the model.

>>> save(qir, "out/smollm2-cq3")            # doctest: +SKIP
>>> model = hf.to_model(load("out/smollm2-cq3"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.errors import CheckpointError, ConfigError
from cqjax.formats import cq as fmt
from cqjax.formats import encoding, validate
from cqjax.io import atomic
from cqjax.io.artifact_writer import ArtifactWriter, raw_bytes
from cqjax.io.safetensors_lazy import SafetensorsFile
from cqjax.ir import IR, LazyTensor, TensorMeta, materialize
from cqjax.ir import verify as verify_ir
from cqjax.kernels.qarrays import CQArray, RTNArray
from cqjax.models import bert, gemma4, gemma4_audio, gemma4_multimodal, gemma4_vision, registry, transformer, whisper

log = logging.getLogger(__name__)
FORMAT = "cqjax-artifact"
VERSION = 2  # 2: a sha256 per stored array, keys sorted (1: no checksums; still read)
SUPPORTED_VERSIONS = (1, 2)
SUPPORTED_LAYOUTS = (fmt.LAYOUT_VERSION,)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"
#: Files copied from a source checkpoint into ``tokenizer/`` when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "sentence_bert_config.json")
#: Quantized leaf types by their ``format`` (the manifest's ``kind``).
FORMATS: dict[str, type] = {"cq": CQArray, "rtn": RTNArray}
#: Dataclasses a manifest config may name (nothing else is ever constructed).
CONFIG_CLASSES: dict[str, type] = {c.__name__: c for c in (
    transformer.DecoderConfig, gemma4.Gemma4Config, gemma4.Gemma4Layer, gemma4_multimodal.Gemma4MultimodalConfig,
    gemma4_vision.Gemma4VisionConfig, gemma4_audio.Gemma4AudioConfig, bert.BertConfig, whisper.WhisperConfig)}
SEP = "::"
_CONVERT = "re-run quantization with this cqjax (cqjax.quantize or python -m cqjax) to convert the model"


class ArtifactError(CheckpointError):
    """An artifact directory is missing, malformed, or from an unsupported version."""


# ------------------------------------------------------------------------- tagged JSON


def to_json(x: Any, where: str = "value") -> Any:
    """Encodes configs and ``meta.info`` as JSON that :func:`from_json` restores exactly
    (tuples, non-string dict keys, non-finite floats and whitelisted dataclasses tagged)."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"__float__": repr(x)}
    if isinstance(x, np.generic):
        return to_json(x.item(), where)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        name = type(x).__name__
        if CONFIG_CLASSES.get(name) is not type(x):
            raise ArtifactError(f"{where}: cannot store a {name} (storable dataclasses: {sorted(CONFIG_CLASSES)})")
        return {"__dataclass__": name, "fields": {f.name: to_json(getattr(x, f.name), f"{where}.{f.name}")
                                                  for f in dataclasses.fields(x) if f.init}}
    if isinstance(x, tuple):
        return {"__tuple__": [to_json(v, where) for v in x]}
    if isinstance(x, list):
        return [to_json(v, where) for v in x]
    if isinstance(x, dict) or hasattr(x, "items"):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: to_json(v, f"{where}.{k}") for k, v in x.items()}
        return {"__items__": [[to_json(k, where), to_json(v, where)] for k, v in x.items()]}
    raise ArtifactError(f"{where}: cannot store a value of type {type(x).__name__} in the manifest")


def from_json(x: Any, where: str = "value") -> Any:
    """Inverse of :func:`to_json`; constructs only :data:`CONFIG_CLASSES`."""
    if isinstance(x, list):
        return [from_json(v, where) for v in x]
    if not isinstance(x, dict):
        return x
    if "__float__" in x:
        try:
            return float(x["__float__"])
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: bad tagged float {x['__float__']!r}") from e
    if "__tuple__" in x:
        if not isinstance(x["__tuple__"], list):
            raise ArtifactError(f"{where}: a tagged tuple must hold a list")
        return tuple(from_json(v, where) for v in x["__tuple__"])
    if "__items__" in x:
        if not (isinstance(x["__items__"], list) and all(isinstance(p, list) and len(p) == 2 for p in x["__items__"])):
            raise ArtifactError(f"{where}: tagged items must be [key, value] pairs")
        try:
            return {from_json(k, where): from_json(v, where) for k, v in x["__items__"]}
        except TypeError as e:  # an unhashable key
            raise ArtifactError(f"{where}: {e}") from e
    if "__dataclass__" in x:
        cls = CONFIG_CLASSES.get(x["__dataclass__"])
        if cls is None:
            raise ArtifactError(f"{where}: unknown config class {x['__dataclass__']!r}; "
                                f"known: {sorted(CONFIG_CLASSES)}")
        if not isinstance(x.get("fields"), dict):
            raise ArtifactError(f"{where}: a {cls.__name__} needs its 'fields' mapping")
        try:
            return cls(**{k: from_json(v, f"{where}.{k}") for k, v in x["fields"].items()})
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: invalid {cls.__name__}: {e}") from e
    return {k: from_json(v, f"{where}.{k}") for k, v in x.items()}


# ------------------------------------------------------------------------- leaf encoding


def leaf_kind(leaf: Any, path: str = "?") -> str:
    """``"float"`` for an array or lazy tensor, else the quantized leaf's ``format``."""
    if isinstance(leaf, (np.ndarray, jax.Array, LazyTensor)):
        return "float"
    kind = getattr(leaf, "format", None)
    if FORMATS.get(kind) is not type(leaf):
        raise ArtifactError(f"{path}: cannot store a leaf of type {type(leaf).__name__} (expected an array or "
                            f"one of {sorted(FORMATS)}; an unfinished pipeline? run its pack pass)")
    return kind


def encode_leaf(path: str, leaf: Any) -> tuple[str, dict[str, tuple[np.ndarray, str, np.ndarray]]]:
    """``(kind, {field: (stored array, encoding, leaf array)})``; a float leaf has one field,
    ``value``. The stored arrays are exactly what :func:`save` writes."""
    kind = leaf_kind(leaf, path)
    if kind == "float":
        a = np.asarray(materialize(leaf), order="C")  # safetensors writes memory order: no views; 0-d stays 0-d
        return kind, {"value": (a, "raw", a)}
    return kind, encoding.encode(leaf)


# ------------------------------------------------------------------------- save


def _entry(path: str, meta: TensorMeta, kind: str, arrays: dict, leaf: Any) -> dict:
    static = {} if kind == "float" else encoding.static_fields(leaf)
    entry = {"path": path, "role": meta.role, "tower": meta.tower, "hf_name": meta.hf_name,
             "shape": list(meta.shape), "dtype": meta.dtype, "kind": kind,
             "bits": static.get("bits"), "blocks": list(static["blocks"]) if "blocks" in static else None,
             "block": meta.info.get("block") if kind != "float" else None, "seed": static.get("seed"),
             "K": static.get("K"), "transposed": static.get("transposed"),
             "layout_version": fmt.LAYOUT_VERSION if kind != "float" else None,
             "bytes": sum(int(s.nbytes) for s, _, _ in arrays.values()),
             "static": to_json(static, f"{path} static"), "arrays": {}, "info": to_json(dict(meta.info), f"{path} info")}
    for field, (stored, how, a) in arrays.items():
        entry["arrays"][field] = {"name": path if kind == "float" else f"{path}{SEP}{field}",
                                  "dtype": stored.dtype.name, "shape": list(stored.shape), "encoding": how,
                                  "leaf_dtype": a.dtype.name, "leaf_shape": list(a.shape),
                                  "sha256": hashlib.sha256(raw_bytes(stored)).hexdigest()}
    return entry


def reproducible(record: dict) -> dict:
    """``record`` without the fields that differ between identical runs (wall times), for
    ``extra``: ``{"passes": [{"name", "changed", "selected"}], ...}``."""
    out = dict(record)
    if "passes" in out:
        out["passes"] = [{k: v for k, v in p.items() if k != "seconds"} for p in out["passes"]]
    if isinstance(out.get("recipe"), dict) and isinstance(out["recipe"].get("calibration"), dict):
        cal = out["recipe"]["calibration"]
        out["recipe"] = {**out["recipe"], "calibration": {k: v for k, v in cal.items()
                                                           if k != "seconds" and not k.endswith("_s")}}
    return out


def stored(path: str, leaf: Any, meta: TensorMeta) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest entry of one leaf and the ``{safetensors name: array}`` it stores."""
    if SEP in path:
        raise ArtifactError(f"{path}: IR paths may not contain {SEP!r}")
    kind, arrays = encode_leaf(path, leaf)
    entry = _entry(path, meta, kind, arrays, leaf)
    return entry, {entry["arrays"][field]["name"]: s for field, (s, _, _) in arrays.items()}


def header_of(family: str, config: Any, extra: dict | None = None) -> dict:
    """The manifest without its ``tensors`` (and ``tokenizer``)."""
    out = {"format": FORMAT, "version": VERSION, "layout_versions": list(SUPPORTED_LAYOUTS),
           "family": family, "config": to_json(config, "config")}
    if extra:
        out["extra"] = to_json(reproducible(extra), "extra")
    return out


def check_target(directory: Path) -> None:
    """Refuses to replace a non-empty directory that is not an artifact; removes (and logs) what
    killed saves of ``directory`` left beside it."""
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                          and not (directory / MANIFEST).is_file())):
        raise ArtifactError(f"{directory}: exists and is not a cqjax artifact; refusing to replace it")
    for old in atomic.leftovers(directory):
        shutil.rmtree(old, ignore_errors=True)
        log.warning("removed %s, left by an interrupted save of %s", old, directory)


def tokenizer_copier(source: str | os.PathLike | None):
    """``artifact_dir -> "tokenizer" | None`` for :meth:`ArtifactWriter.finish`: copies
    ``source``'s tokenizer files into :data:`TOKENIZER_DIR`."""
    return None if source is None else (
        lambda target: TOKENIZER_DIR if copy_tokenizer(source, target / TOKENIZER_DIR) else None)


#: safetensors metadata of the weights file. One key: more would make no difference to readers.
WEIGHTS_METADATA = {"format": f"{FORMAT}/{VERSION}"}


def save(ir: IR, directory: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
         extra: dict | None = None) -> Path:
    """Writes ``ir`` as an artifact directory, atomically.

    Everything is written into a hidden sibling directory and synced to disk, which then takes
    ``directory``'s place in one atomic exchange (:func:`cqjax.io.atomic.replace_dir`): a kill at
    any moment leaves the previous artifact or the new one, never neither. What killed saves
    left beside it is removed first (and logged). A non-empty directory that is not an artifact
    is never replaced. The leaves go through :class:`cqjax.io.artifact_writer.ArtifactWriter`
    one at a time, as a streamed conversion writes them, so both give the same bytes.

    Args:
      ir: a fully quantized (or float) IR: every leaf an array, a lazy tensor or a quantized leaf.
      directory: the artifact directory.
      tokenizer_from: a checkpoint directory whose tokenizer files are copied into ``tokenizer/``.
      extra: JSON-able facts stored under ``manifest["extra"]`` (source, recipe, storage, ...);
        keep timings out of it: the same IR and extra give byte-identical files.

    Returns:
      The artifact directory.
    """
    directory = Path(directory)
    check_target(directory)
    verify_ir(ir)
    header = header_of(ir.family, ir.config, extra)
    writer = ArtifactWriter(directory)
    for path, leaf in ir.params.items():
        writer.add(*stored(path, leaf, ir.meta[path]))
    return writer.finish(header, metadata=WEIGHTS_METADATA, tokenizer=tokenizer_copier(tokenizer_from))


def copy_tokenizer(source: str | os.PathLike, target: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copies the tokenizer files found in ``source`` to ``target``; returns their names."""
    source = Path(source)
    found = [n for n in names if (source / n).is_file()]
    if found:
        target.mkdir(parents=True, exist_ok=True)
        for n in found:
            shutil.copyfile(source / n, target / n)
    return found


# ------------------------------------------------------------------------- load


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of an artifact directory (format, version, family)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (not a cqjax artifact directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                            f"is not {FORMAT!r}")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise ArtifactError(f"{path}: artifact version {manifest.get('version')!r} is not supported (this cqjax "
                            f"reads versions {list(SUPPORTED_VERSIONS)}); {_CONVERT}")
    if manifest.get("family") not in registry.FAMILIES:
        raise ArtifactError(f"{path}: unknown model family {manifest.get('family')!r}; "
                            f"known: {sorted(registry.FAMILIES)}")
    for key in ("config", "tensors"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest key {key!r} is missing")
    return manifest


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{where}: {what}")


def _load_entry(entry: dict, f: SafetensorsFile, mpath: Path, checksums: bool) -> tuple[Any, TensorMeta]:
    path = entry.get("path", "?")
    where = f"{mpath}: tensor {path!r}"
    kind = entry.get("kind")
    _check(kind == "float" or kind in FORMATS, where, f"unknown kind {kind!r}; known: {['float', *FORMATS]}")
    _check(isinstance(entry.get("arrays"), dict) and isinstance(entry.get("shape"), list), where,
           "entry needs 'arrays' (a mapping) and 'shape' (a list)")
    static = from_json(entry.get("static", {}), where)
    if kind != "float":
        _check(entry.get("layout_version") in SUPPORTED_LAYOUTS, where,
               f"packed layout version {entry.get('layout_version')!r} is not supported (this cqjax reads "
               f"{list(SUPPORTED_LAYOUTS)}); {_CONVERT}")
        _check(isinstance(static, dict), where, "static fields must be a mapping")
        validate.check_entry(kind, static, entry["shape"], entry["arrays"], where)  # before any read
    arrays = {}
    for field, spec in entry["arrays"].items():
        name = spec["name"]
        _check(name in f.entries, f"{f.path}: tensor {name!r}", f"missing (listed in {MANIFEST} for {path})")
        dtype, shape = f.dtype(name), f.shape(name)
        _check(dtype.name == spec["dtype"] and list(shape) == spec["shape"], f"{f.path}: tensor {name!r}",
               f"has {dtype.name} {list(shape)}, {MANIFEST} says {spec['dtype']} {spec['shape']}")
        if checksums:
            _check_sha256(f, name, spec)
        if kind == "float":
            arrays[field] = f, name
            continue
        try:
            arrays[field] = encoding.decode_array(f.read(name), spec["encoding"], np.dtype(spec["leaf_dtype"]),
                                                  tuple(spec["leaf_shape"]), static["blocks"])
        except (ValueError, TypeError, KeyError) as e:
            raise ArtifactError(f"{f.path}: tensor {name!r}: cannot decode ({e})") from e
    if kind != "float":
        validate.check_values(kind, static, arrays, where)
        arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    _check(all(isinstance(entry[k], str) for k in ("hf_name", "dtype")) and isinstance(entry["info"], dict)
           and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= validate.MAX_DIM
                   for d in entry["shape"]), where, "hf_name and dtype must be strings, info a mapping, shape "
           f"non-negative integers (got {entry['shape']!r})")
    try:
        meta = TensorMeta(role=entry["role"], tower=entry["tower"], hf_name=entry["hf_name"],
                          shape=tuple(entry["shape"]), dtype=entry["dtype"], info=from_json(entry["info"], where))
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from e
    if kind == "float":
        _check(set(arrays) == {"value"}, where, "a float tensor has exactly one array, 'value'")
        sf, name = arrays["value"]
        _check(list(sf.shape(name)) == entry["shape"], where,
               f"stored shape {list(sf.shape(name))} != manifest shape {entry['shape']}")
        leaf = LazyTensor(shape=sf.shape(name), dtype=sf.dtype(name).name, source=f"{sf.path.name}:{name}",
                          reader=lambda sf=sf, name=name: sf.read(name))
        return leaf, meta
    cls = FORMATS[kind]
    try:
        leaf = cls(**arrays, **static)
    except TypeError as e:
        raise ArtifactError(f"{where}: cannot build a {cls.__name__}: {e}") from e
    _check(tuple(leaf.logical_shape) == meta.shape, where,
           f"quantized leaf has shape {tuple(leaf.logical_shape)}, manifest shape {list(meta.shape)}")
    return leaf, meta


def _check_sha256(f: SafetensorsFile, name: str, spec: dict) -> None:
    want = spec.get("sha256")
    if want is None:
        return  # a version-1 artifact: no checksums
    got = hashlib.sha256(raw_bytes(f.read(name))).hexdigest()
    _check(got == want, f"{f.path}: tensor {name!r}", f"sha256 {got[:16]}... does not match the manifest's "
           f"{str(want)[:16]}... (the file was changed or damaged)")


def load(directory: str | os.PathLike, *, verify: bool = True) -> IR:
    """Reads an artifact directory back into the IR it was saved from (bit-identical leaves).

    Everything is validated against the format (:mod:`cqjax.formats.validate`) before it is
    read or allocated, and the model config's dimensions against the stored tensors.

    Args:
      directory: the artifact directory.
      verify: check every stored array's sha256 against the manifest (reads every byte once).

    Raises:
      ArtifactError / CheckpointError / FormatError: naming the file and the field or tensor on
        an unknown format or version, a missing or extra tensor, a shape/dtype mismatch, a
        value the format does not allow, a checksum mismatch, or a truncated file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    mpath = directory / MANIFEST
    f = SafetensorsFile(directory / WEIGHTS)
    _check(isinstance(manifest["tensors"], list), str(mpath), "'tensors' must be a list")
    params, meta, names = {}, {}, set()
    for entry in manifest["tensors"]:
        _check(isinstance(entry, dict) and isinstance(entry.get("path"), str), str(mpath),
               f"a tensor entry must be a mapping with a 'path', got {str(entry)[:80]}")
        _check(entry["path"] not in params, str(mpath), f"tensor {entry['path']!r} is listed twice")
        try:
            params[entry["path"]], meta[entry["path"]] = _load_entry(entry, f, mpath, verify)
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{mpath}: tensor entry {entry.get('path')!r} is malformed ({type(e).__name__}: "
                                f"{e})") from e
        names.update(spec["name"] for spec in entry["arrays"].values())
    extra = sorted(set(f.entries) - names)
    _check(not extra, str(f.path), f"{len(extra)} tensors are not listed in {MANIFEST}, e.g. {extra[:3]}")
    config = from_json(manifest["config"], f"{mpath}: config")
    _check_config(config, meta, manifest["family"], mpath)
    ir = IR(family=manifest["family"], config=config, params=params, meta=meta)
    try:
        verify_ir(ir)
    except ValueError as e:
        raise ArtifactError(f"{mpath}: {e}") from e
    return ir


def _check_config(config: Any, meta: dict[str, TensorMeta], family: str, mpath: Path) -> None:
    """The config's sizes are bounded and build exactly the stored tensors' shapes (checked on an
    abstract model: nothing is allocated)."""
    from cqjax.io.hf import abstract_model, param_roles

    try:
        registry.check_bounds(config, str(mpath))
    except ConfigError as e:
        raise ArtifactError(str(e)) from e
    try:
        shapes = param_roles(abstract_model(registry.FAMILIES[family], config))
    except Exception as e:  # noqa: BLE001 - any failure to build is a bad config
        raise ArtifactError(f"{mpath}: config does not build a {family} model: {type(e).__name__}: {e}") from e
    for path, (shape, _) in shapes.items():
        if path not in meta:
            raise ArtifactError(f"{mpath}: the config's model has {path} {list(shape)}, the artifact does not")
        if tuple(meta[path].shape) != tuple(shape):
            raise ArtifactError(f"{mpath}: tensor {path!r} has shape {list(meta[path].shape)}; the config "
                                f"builds {list(shape)}")


def tokenizer_dir(directory: str | os.PathLike) -> Path | None:
    """The artifact's ``tokenizer/`` directory, or None when it has none."""
    path = Path(directory) / TOKENIZER_DIR
    return path if path.is_dir() else None
