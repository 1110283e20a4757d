"""Model families known to the importer, keyed by name and by transformers ``model_type``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from cqjax.errors import CheckpointError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """How to import one model family.

    Attributes:
      name: the family name recorded in the IR (``llama``).
      model_types: the transformers ``model_type`` values it accepts.
      parse_config: ``(raw config.json dict, source name) -> config``; raises
        :class:`cqjax.errors.ConfigError` naming any key it does not understand.
      build: ``config -> nnx.Module`` (parameters zero-initialized; the importer fills them).
      hf_name: ``(IR path, config) -> checkpoint tensor name``.
      ignorable: ``(checkpoint tensor name, config) -> bool`` for tensors the model does not use
        (e.g. a saved copy of a tied output head).
    """

    name: str
    model_types: tuple[str, ...]
    parse_config: Callable[[dict, str], Any]
    build: Callable[[Any], nnx.Module]
    hf_name: Callable[[str, Any], str]
    ignorable: Callable[[str, Any], bool] = lambda name, cfg: False


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
