"""Model families known to the importer, keyed by name and by transformers ``model_type``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

import math

from cqjax.errors import CheckpointError, ConfigError

#: The largest size a config may give any dimension (vocabulary, hidden size, layers, ...).
MAX_SIZE = 1 << 24
#: Config fields that are sizes of the model itself, so at least 1.
POSITIVE = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """How to import one model family.

    Attributes:
      name: the family name recorded in the IR (``llama``).
      model_types: the transformers ``model_type`` values it accepts.
      parse_config: ``(raw config.json dict, source name) -> config``; raises
        :class:`cqjax.errors.ConfigError` naming any key it does not understand.
      build: ``config -> nnx.Module`` (parameters zero-initialized; the importer fills them).
      hf_name: ``(IR path, config) -> checkpoint tensor name``, or ``(name, index)`` for a
        slice of a checkpoint tensor, or a list of such answers of which the importer takes the
        first the checkpoint holds (Qwen3-MoE's per-expert or stacked layouts). Slices, as the
        IR records them in ``meta.hf_name`` (:mod:`cqjax.io.export` writes them back into one
        tensor; together they must tile it):

        ====================  =======================  =========================================
        index                 ``meta.hf_name``         what
        ====================  =======================  =========================================
        ``(start, stop)``     ``name[start:stop]``     rows of a fused tensor (Phi-3's qkv_proj)
        ``(e,)``              ``name[e]``              expert ``e`` of a stacked ``[E, out, in]``
        ``(e, start, stop)``  ``name[e][start:stop]``  rows of expert ``e`` (gate of gate_up)
        ====================  =======================  =========================================
      ignorable: ``(checkpoint tensor name, config) -> bool`` for tensors the model does not use
        (e.g. a saved copy of a tied output head).
      kind: ``causal_lm`` (predicts tokens: perplexity, tasks, generation), ``encoder``
        (embeds sentences: :mod:`cqjax.eval.embeddings`) or ``speech_to_text`` (transcribes
        audio: :mod:`cqjax.eval.speech`).
      tower: ``IR path -> tower`` (``text``, ``vision`` or ``audio``, :data:`cqjax.ir.TOWERS`).
    """

    name: str
    model_types: tuple[str, ...]
    parse_config: Callable[[dict, str], Any]
    build: Callable[[Any], nnx.Module]
    hf_name: Callable[[str, Any], str | tuple[str, tuple[int, ...]] | list]
    ignorable: Callable[[str, Any], bool] = lambda name, cfg: False
    kind: str = "causal_lm"
    tower: Callable[[str], str] = lambda path: "text"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def for_model_type(model_type: str, source: str) -> Family:
    """The family accepting ``model_type``; the error names ``source`` and the supported types."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise CheckpointError(f"{source}: unsupported architecture model_type={model_type!r}; supported: {supported}")


def check_bounds(cfg: Any, source: str, where: str = "config") -> None:
    """Raises :class:`ConfigError` naming the field of a config (a raw config.json mapping, or a
    parsed config dataclass) whose integer is out of
    ``[-1, MAX_SIZE]`` (one of :data:`POSITIVE` must be ``>= 1``) or whose float is not finite: a model is
    never built from sizes that could not be real (a ``head_dim`` of 2**31 would allocate
    until the machine runs out of memory)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        for f in dataclasses.fields(cfg):
            check_bounds(getattr(cfg, f.name), source, f"{where}.{f.name}")
    elif isinstance(cfg, dict):
        for k, v in cfg.items():
            check_bounds(v, source, f"{where}.{k}")
    elif isinstance(cfg, (list, tuple)):
        for i, v in enumerate(cfg):
            check_bounds(v, source, f"{where}[{i}]")
    elif isinstance(cfg, bool) or cfg is None or isinstance(cfg, str):
        return
    elif isinstance(cfg, int):
        lo = 1 if where.rsplit(".", 1)[-1] in POSITIVE else -1
        if not lo <= cfg <= MAX_SIZE:
            raise ConfigError(f"{source}: {where}={cfg} is out of bounds ({lo} to {MAX_SIZE})")
    elif isinstance(cfg, float) and not math.isfinite(cfg):
        raise ConfigError(f"{source}: {where}={cfg} is not finite")
