"""Import a Hugging Face checkpoint directory into the IR, and build the Flax model from an IR.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` files with ``model.safetensors.index.json``. Tensors are
not read at import: the IR holds :class:`cqjax.ir.LazyTensor` leaves over memory maps, so a
model larger than memory can be converted tensor by tensor.

>>> ir = import_checkpoint(path)          # doctest: +SKIP
>>> model = to_model(ir)                  # doctest: +SKIP
>>> logits = model(tokens, mask)          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cqjax.models.bert  # noqa: F401  (registers the BERT encoder family)
import cqjax.models.families  # noqa: F401  (registers the built-in families)
import cqjax.models.gemma4  # noqa: F401  (registers the Gemma 4 family)
import cqjax.models.whisper  # noqa: F401  (registers the Whisper family)
from cqjax.errors import CheckpointError
from cqjax.io.safetensors_lazy import SafetensorsFile
from cqjax.ir import IR, LazyTensor, TensorMeta, materialize
from cqjax.models import registry

TRANSPOSED_ROLES = ("linear", "lm_head", "router")


def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint directory (a ``.gguf`` file: its conversion, cached), downloading a hub
    id only where the network allows it."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":  # converted once into the cache (cqjax.io.gguf)
            from cqjax.io.gguf import cached_checkpoint

            return cached_checkpoint(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + *.safetensors) "
                                  "or a .gguf file")
        return path
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001  (any hub/network failure gets the same advice)
        raise CheckpointError(
            f"{path_or_id}: not a local directory and the Hugging Face hub could not be reached "
            f"({type(e).__name__}: {e}). Download the checkpoint elsewhere and point model.path at "
            "the local directory (config.json + *.safetensors + tokenizer files).") from e


def checkpoint_fingerprint(directory: Path) -> str:
    """A cheap identity of a checkpoint directory (for caching results of its float model).

    Hashes ``config.json`` and the names, sizes and mtimes of its ``*.safetensors`` shards.
    """
    directory = Path(directory)
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CheckpointError(f"{config_path}: config key 'model_type' is required")
    return raw


def open_shards(directory: Path) -> dict[str, SafetensorsFile]:
    """``{tensor name: file}`` over all shards; errors name the missing or broken shard."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: malformed shard index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        files = {}
        root = directory.resolve()
        for shard in sorted(set(weight_map.values())):
            target = (directory / shard).resolve()
            if target.parent != root or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: shard {shard!r} is not a .safetensors file inside "
                                      f"{directory} (index entries may only name files beside the index)")
            if not (directory / shard).is_file():
                names = [n for n, s in weight_map.items() if s == shard]
                raise CheckpointError(f"{directory / shard}: shard listed in {index_path.name} is missing "
                                      f"(holds {len(names)} tensors, e.g. {names[0]!r})")
            files[shard] = SafetensorsFile(directory / shard)
        out = {}
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise CheckpointError(f"{directory / shard}: tensor {name!r} listed in {index_path.name} "
                                      "is not in the shard")
            out[name] = files[shard]
        return out
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{directory}: no *.safetensors files (only safetensors are read; "
                              "pickle-based .bin/.pt checkpoints are never loaded)")
    out = {}
    for shard in shards:
        f = SafetensorsFile(shard)
        for name in f.entries:
            out[name] = f
    return out


#: Clamp bounds that may be infinite, on their own side only: ``-inf`` for a lower bound and
#: ``+inf`` for an upper one mean "no clamp" (transformers initializes Gemma 4's
#: ``Gemma4ClippableLinear`` bounds so, and a checkpoint saved without calibrating them keeps
#: them; the model clamps to them as they are). Only scalars of role ``other`` under these
#: names; NaN, or an infinity on the other side, is an error like anywhere else.
OPEN_BOUNDS = {"input_min": -np.inf, "output_min": -np.inf, "input_max": np.inf, "output_max": np.inf}


def check_finite(ir: IR, chunk: int = 1 << 22) -> None:
    """Raises :class:`CheckpointError` naming the first tensor (and its source) with a NaN or an
    infinity, save an open clamp bound (:data:`OPEN_BOUNDS`); reads every tensor once, ``chunk``
    values at a time."""
    for path, leaf in ir.params.items():
        lazy = isinstance(leaf, LazyTensor)
        array, meta = leaf.reader() if lazy else leaf, ir.meta[path]
        open_side = OPEN_BOUNDS.get(path.rpartition("/")[2])
        if open_side is not None and meta.role == "other" and meta.shape == () and np.asarray(array) == open_side:
            continue
        check_finite_array(array, path, leaf.source if lazy else path, chunk)


def check_finite_array(array: Any, path: str, source: str, chunk: int = 1 << 22) -> None:
    """:func:`check_finite` of one array (tensor ``path`` read from ``source``), in its storage
    order (no transpose copy)."""
    flat = np.ravel(np.asarray(array), order="K")  # a view for a (transposed) memory map
    for lo in range(0, flat.size, chunk):
        part = np.asarray(flat[lo:lo + chunk], np.float32)
        if not np.all(np.isfinite(part)):
            bad = lo + int(np.argmin(np.isfinite(part)))
            raise CheckpointError(f"{source}: tensor {path} has a non-finite value ({part[bad - lo]}) at "
                                  f"flat index {bad}: the checkpoint is damaged or was saved after a "
                                  "diverged training step")


def _swap_last_axes(array: np.ndarray) -> np.ndarray:
    return np.swapaxes(array, -1, -2)


def _conv_layout(stored: tuple, shape: tuple, file: Path, name: str):
    """``(expected checkpoint shape, transform)`` of a 1-D or 2-D convolution whose IR kernel is
    the linear of its unfolded input, ``[window x in, out]`` (window position major, a 2-D
    window row-major), from the checkpoint's ``[out, in, width]`` or ``[out, in, height, width]``."""
    if len(stored) not in (3, 4) or len(shape) != 2 or math.prod(stored[1:]) != shape[0]:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(stored)}; a convolution "
                              f"[out, in, *window] with in x window = {shape[0]} and out = {shape[1]} expected")
    return (shape[1], *stored[1:]), _unfolded_conv


def _unfolded_conv(array: np.ndarray) -> np.ndarray:
    window_major = (*range(2, array.ndim), 1, 0)
    return np.ascontiguousarray(np.transpose(array, window_major).reshape(-1, array.shape[0]))


def _choose(found: Any, tensors: dict) -> tuple[str, tuple[int, ...] | None]:
    """``(name, index)`` of a family's ``hf_name`` answer: a name, ``(name, index)``, or a list of
    those alternatives, of which the first the checkpoint holds is taken (else the first)."""
    options = found if isinstance(found, list) else [found]
    options = [o if isinstance(o, tuple) else (o, None) for o in options]
    return next((o for o in options if o[0] in tensors), options[0])


def slice_label(index: tuple[int, ...] | None) -> str:
    """The ``meta.hf_name`` suffix of a slice index (see :func:`import_checkpoint`)::

        (start, stop)     -> '[start:stop]'     rows of a fused 2-D tensor
        (e,)              -> '[e]'              expert e of a stacked 3-D tensor
        (e, start, stop)  -> '[e][start:stop]'  rows of expert e
    """
    if index is None:
        return ""
    expert = f"[{index[0]}]" if len(index) % 2 else ""
    return expert + (f"[{index[-2]}:{index[-1]}]" if len(index) >= 2 else "")


def _slice(index: tuple[int, ...] | None) -> tuple:
    """The numpy index of a slice index: a view of the memory map, nothing read."""
    if index is None:
        return ()
    expert = (index[0],) if len(index) % 2 else ()
    return expert + ((slice(index[-2], index[-1]),) if len(index) >= 2 else ())


def _slice_shape(f: SafetensorsFile, name: str, index: tuple[int, ...], path: str) -> tuple[int, ...]:
    stored = f.shape(name)
    if not (isinstance(index, tuple) and 1 <= len(index) <= 3 and all(isinstance(i, int) for i in index)):
        raise CheckpointError(f"{name}: slice index {index!r} (for {path}) is not (start, stop), (e,) "
                              "or (e, start, stop)")
    rows = stored[1:] if len(index) % 2 else stored
    ok = len(stored) >= (1 + len(index) % 2) and (not len(index) % 2 or 0 <= index[0] < stored[0]) and (
        len(index) < 2 or 0 <= index[-2] < index[-1] <= rows[0])
    if not ok:
        what = f"rows {index[0]}:{index[1]}" if len(index) == 2 else f"the slice {slice_label(index)}"
        raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(stored)}; {what} (for {path}) "
                              f"{'are' if len(index) == 2 else 'is'} outside it")
    rows = rows if len(index) < 2 else (index[-1] - index[-2], *rows[1:])
    return tuple(rows)


def check_tiling(name: str, shape: tuple[int, ...], slices: list[tuple[int, ...]], source: str, family: str) -> None:
    """Raises :class:`CheckpointError` unless ``slices`` (slice indices, see :func:`slice_label`)
    cover tensor ``name`` of ``shape`` exactly once: every expert of a stacked tensor, and the
    rows of each expert (or of the tensor) end to end."""
    experts: dict[int | None, list[tuple[int, int]]] = {}
    for index in slices:
        e = index[0] if len(index) % 2 else None
        rows_of = shape[1] if e is not None else shape[0]
        experts.setdefault(e, []).append(tuple(index[-2:]) if len(index) >= 2 else (0, rows_of))
    want = [None] if None in experts else list(range(shape[0]))
    problem = sorted(experts, key=str) != sorted(want, key=str)
    for e, spans in experts.items():
        ends = [0]
        for start, stop in sorted(spans):
            if start != ends[-1]:
                break
            ends.append(stop)
        problem |= ends[-1] != (shape[0] if e is None else shape[1]) or len(ends) != len(spans) + 1
    if problem and None in experts:
        raise CheckpointError(f"{source}: tensor {name!r} has {shape[0]} rows; the {family} model uses "
                              f"rows {sorted(experts[None])} of it")
    if problem:
        used = {e: sorted(s) for e, s in sorted(experts.items(), key=lambda kv: str(kv[0]))}
        raise CheckpointError(f"{source}: tensor {name!r} has shape {list(shape)} ({shape[0]} experts of "
                              f"{shape[1]} rows); the {family} model uses {{expert: rows}} {used} of it")


def abstract_model(family: registry.Family, cfg: Any) -> nnx.Module:
    return nnx.eval_shape(lambda: family.build(cfg))


def param_roles(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{IR path: (shape, role)}`` of a (possibly abstract) model."""
    _, state = nnx.split(model)
    out = {}
    for key, var in nnx.to_flat_state(state):
        meta = var.get_metadata()
        out["/".join(map(str, key))] = (tuple(var.get_value().shape), meta.get("role", "other"))
    return out


def import_checkpoint(path_or_id: str | Path) -> IR:
    """Reads a checkpoint directory into an IR of lazy tensors.

    Raises:
      CheckpointError / ConfigError: naming the file, tensor or config key that is wrong.
    """
    directory = resolve(path_or_id)
    raw = read_config(directory)
    family = registry.for_model_type(raw["model_type"], str(directory / "config.json"))
    registry.check_bounds(raw, str(directory / "config.json"))  # before a parser computes anything from it
    cfg = family.parse_config(raw, str(directory / "config.json"))
    tensors = open_shards(directory)
    # A family may map a leaf to a slice of a checkpoint tensor (hf_name answers (name, index),
    # see slice_label): rows of a fused tensor (Phi-3's qkv_proj), an expert of a stacked 3-D
    # tensor (Qwen3-MoE's experts.down_proj) or rows of one (experts.gate_up_proj); meta.hf_name
    # is then 'name[start:stop]', 'name[e]' or 'name[e][start:stop]'.
    params, meta, used, fused = {}, {}, set(), {}
    for path, (shape, role) in param_roles(abstract_model(family, cfg)).items():
        name, index = _choose(family.hf_name(path, cfg), tensors)
        if name not in tensors:
            raise CheckpointError(f"{directory}: tensor {name!r} (for {path}) is missing from the checkpoint")
        f = tensors[name]
        stored, label = f.shape(name), name
        if index is not None:
            stored, label = _slice_shape(f, name, index, path), name + slice_label(index)
            fused.setdefault(name, []).append(index)
        # Kernels are [..., in, out]; checkpoints store [..., out, in] (3-D: stacked experts).
        transpose = role in TRANSPOSED_ROLES and len(shape) >= 2
        expected = (*shape[:-2], shape[-1], shape[-2]) if transpose else shape
        transform = _swap_last_axes if transpose else None
        if role == "conv":
            expected, transform = _conv_layout(stored, shape, f.path, name)
        if stored != expected:
            raise CheckpointError(f"{f.path}: tensor {label!r} has shape {list(stored)}, "
                                  f"expected {list(expected)} from config.json")
        if not jnp.issubdtype(f.dtype(name), jnp.floating):
            method = (raw.get("quantization_config") or {}).get("quant_method") if isinstance(
                raw.get("quantization_config"), dict) else None
            raise CheckpointError(f"{f.path}: tensor {name!r} is {f.dtype(name).name}, not floating point"
                                  + (f": the checkpoint is quantized ({method or 'quantization_config'}); "
                                     if "quantization_config" in raw else "; ")
                                  + "cqjax imports float (fp32/bf16/fp16) checkpoints")
        params[path] = LazyTensor(
            shape=shape, dtype=f.dtype(name).name, source=f"{f.path.name}:{label}",
            reader=(lambda f=f, name=name, index=index: f.read(name)[_slice(index)]),
            transform=transform)
        meta[path] = TensorMeta(role=role, hf_name=label, shape=shape, dtype=f.dtype(name).name,
                                tower=family.tower(path))
        used.add(name)
    for name, slices in fused.items():  # the slices of a fused tensor must tile all of it
        check_tiling(name, tensors[name].shape(name), slices, f"{tensors[name].path}", family.name)
    unused = sorted(n for n in set(tensors) - used if not family.ignorable(n, cfg))
    if unused:
        raise CheckpointError(f"{directory}: {len(unused)} checkpoint tensors are not used by the "
                              f"{family.name} model, e.g. {unused[:3]}")
    return IR(family=family.name, config=cfg, params=params, meta=meta)


def to_model(ir: IR, dtype=jnp.float32) -> nnx.Module:
    """Builds the Flax model of an IR, loading lazy leaves (float leaves cast to ``dtype``;
    ``None`` keeps each leaf's stored dtype: a bf16 checkpoint then takes half the memory and
    computes the same float32 logits, since every layer upcasts its weights exactly). Inside
    :func:`cqjax.sharding.use_mesh`, each leaf is placed on the mesh as it is loaded."""
    from cqjax import sharding

    mesh = sharding.active_mesh()
    family = registry.FAMILIES[ir.family]
    graphdef, state = nnx.split(abstract_model(family, ir.config))
    for key, var in nnx.to_flat_state(state):
        path = "/".join(map(str, key))
        leaf = load_leaf(ir, path, dtype)
        if mesh is not None:
            leaf = sharding.shard_leaf(leaf, ir.meta.get(path), mesh)
        var.set_value(leaf)
    return nnx.merge(graphdef, state)


def load_leaf(ir: IR, path: str, dtype=jnp.float32) -> Any:
    """The leaf at ``path`` loaded (float arrays cast to ``dtype`` on the device; None keeps their
    stored dtype; quantized leaves as they are)."""
    if path not in ir.params:
        raise CheckpointError(f"IR has no leaf for model parameter {path}")
    leaf = materialize(ir.params[path])
    if isinstance(leaf, (np.ndarray, jax.Array)) and jnp.issubdtype(leaf.dtype, jnp.floating):
        leaf = jnp.asarray(leaf, dtype or leaf.dtype)
    return leaf


def load(path_or_id: str | Path, dtype=jnp.float32) -> tuple[nnx.Module, IR]:
    """Imports a checkpoint and builds its Flax model: ``model, ir = load(dir)``."""
    ir = import_checkpoint(path_or_id)
    return to_model(ir, dtype), ir
