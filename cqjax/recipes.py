"""Recipes: the pipelines of ``conf/pipeline/*.yaml``, their one definition, built for the
command line, the Python API and the benchmarks alike.

=============================  ===================================================================
call                           gives
=============================  ===================================================================
``config(name, quant, steps)``  the config the CLI would compose for ``pipeline=<name>`` (the
                               schema, ``conf/quant/default.yaml``, ``conf/pipeline/<name>.yaml``)
                               with ``quant`` values and per-step options on top
``build(cfg)``                 the named chain of ``cfg.pipeline``: passes with ``bits: null`` get
                               the ``quant`` width rules; an ``awq`` step wraps the quantizing
                               steps; ``quant.bpw`` puts the allocator first, measuring exactly
                               those quantizing steps
``recipe(name, ...)``          ``build(config(name, ...))``
``check_rules(cfg, ir)``       the ``quant`` rules against a model: an ``overrides`` pattern that
                               matches no eligible tensor is a :class:`ConfigError`; bundle and
                               ``embed_bits`` rules that match nothing are returned as skipped
``check_budget(chain, ir)``    a ``quant.bpw`` the choices cannot reach is a :class:`ConfigError`
                               before any work (sizes from the formats' byte counts)
``allocation_report(chain)``   what the allocator measured (``allocation`` in report.json)
=============================  ===================================================================

The quantizing steps are those that do not need the float reference (:class:`cqjax.pipeline.Needs`);
steps that do (tuning) run after them and are neither wrapped by ``awq`` nor measured.

>>> [name for name, _ in recipe("cq", bits=2).steps]
['rotate', 'codebook', 'pack']
>>> recipe("rtn", bits=4, block=64).steps[0][1].block
64
>>> unrotated = recipe("cq-ef", steps={"pack": {"basis": "unrotated"}})
>>> unrotated.steps[-1][1].basis, sorted(unrotated.needs.statistics)
('unrotated', ['hessian'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cqjax import select
from cqjax.config import Config, config_dir, validate
from cqjax.errors import ConfigError
from cqjax.ir import IR
from cqjax.passes.common import width_rules
from cqjax.pipeline import Chain, describe, named_chain
from cqjax.pipeline import steps as steps_of
from cqjax.quant_stats import ELIGIBLE


def names() -> list[str]:
    """The recipes shipped in ``conf/pipeline/``."""
    return sorted(p.stem for p in (Path(config_dir()) / "pipeline").glob("*.yaml"))


def config(name: str = "cq", quant: Mapping[str, Any] | None = None,
           steps: Mapping[str, Any] | None = None) -> DictConfig:
    """The composed config of recipe ``name`` with ``quant`` values and step options on top.

    Args:
      name: a recipe of :func:`names` (``cq``, ``cq-ef``, ``rtn``, ``gptq``, ...).
      quant: :class:`cqjax.config.QuantConfig` values (``bits``, ``embed_bits``, ``block``,
        ``codebook``, ``seed``, ``overrides``, ``roles``, ``bpw``, ``choices``, ``proxy``).
      steps: ``{step: {option: value}}`` merged into the pipeline (a new step needs its
        ``_target_``; ``{step: None}`` drops one).

    Raises:
      ConfigError: an unknown recipe or a bad value, naming the key.
    """
    if name not in names():
        raise ConfigError(f"recipe {name!r} is not one of {names()} (conf/pipeline/)")
    conf = Path(config_dir())
    cfg = OmegaConf.structured(Config)
    try:
        cfg.quant = OmegaConf.merge(cfg.quant, OmegaConf.load(conf / "quant" / "default.yaml"), dict(quant or {}))
        cfg.pipeline = OmegaConf.merge(OmegaConf.load(conf / "pipeline" / f"{name}.yaml"), dict(steps or {}))
    except Exception as e:  # noqa: BLE001 - OmegaConf's validation errors name the key
        raise ConfigError(f"recipe {name!r}: {e}") from e
    validate(cfg)
    return cfg


def rules(cfg: DictConfig) -> list[tuple[Any, int, str]]:
    """``(filter, bits, source)`` of ``cfg.quant`` in the order they are tried."""
    q = cfg.quant
    container = lambda x: OmegaConf.to_container(x, resolve=True) if x else None  # noqa: E731
    return width_rules(q.bits, q.embed_bits, container(q.get("overrides")), container(q.get("roles")))


def build(cfg: DictConfig) -> Chain:
    """The named chain of ``cfg.pipeline`` (see the module table).

    Raises:
      ConfigError: a step that cannot be built (naming ``pipeline.<step>`` and its allowed
        keys), an ``awq`` step with nothing to wrap, or a ``quant.bpw`` allocator that cannot be set up.
    """
    from hydra.utils import instantiate

    from cqjax.passes.allocate import AllocateBits
    from cqjax.passes.awq import compose

    width = rules(cfg)
    steps = []
    for name, pcfg in cfg.pipeline.items():
        if pcfg is None:
            continue
        extra = {"bits": select.Rules([(f, b) for f, b, _ in width])} if "bits" in pcfg and pcfg.bits is None else {}
        try:
            p = instantiate(pcfg, _partial_=True)(**extra)
        except Exception as e:  # noqa: BLE001 - hydra wraps the real error; name the pass
            raise _instantiate_error(name, pcfg, e) from e
        steps.append((name, p))
    try:
        chain = compose(steps)  # an `awq` step wraps the quantizing steps
    except ValueError as e:
        raise ConfigError(f"pipeline: {e}") from e
    q = cfg.quant
    if q.get("bpw") is None:
        return chain
    quantizing = [(n, p) for n, p in chain.steps if not p.needs.reference]
    fixed = select.Rules([(f, b) for f, b, _ in width[:-1]]) if len(width) > 1 else None
    try:
        allocate = AllocateBits(recipe=named_chain(*quantizing), bpw=float(q.bpw), choices=tuple(q.choices),
                                proxy=q.proxy, fixed=fixed)
    except ValueError as e:
        raise ConfigError(f"quant.bpw={q.bpw}: {e}") from e
    return named_chain(("allocate", allocate), *chain.steps)


def recipe(name: str = "cq", *, steps: Mapping[str, Any] | None = None, **quant: Any) -> Chain:
    """:func:`build` of :func:`config` (``quant`` as keywords: ``bits=3, embed_bits=4, ...``)."""
    return build(config(name, quant, steps))


def check_rules(cfg: DictConfig, ir: IR) -> list[dict]:
    """Checks the ``quant`` rules against the eligible tensors of ``ir`` before any work.

    Returns:
      ``[{"rule", "bits", "from"}]``: the ``quant.roles`` and ``quant.embed_bits`` rules that
      match no eligible tensor (skipped: a text-only model has no vision tower, a tied head
      no ``lm_head``).

    Raises:
      ConfigError: a ``quant.overrides`` pattern (the user's own) matches no eligible tensor;
        the message names the pattern and the nearest paths.
    """
    skipped = []
    for f, bits, source in rules(cfg)[:-1]:
        if select.select(ir, select.All(ELIGIBLE, f)):
            continue
        if source == "quant.overrides":
            raise ConfigError(f"quant.overrides: {select.no_match(f, ir, ELIGIBLE, what='quantizable tensors')}")
        skipped.append({"rule": str(f), "bits": int(bits), "from": source})
    return skipped


def check_budget(chain: Chain, ir: IR) -> None:
    """A ``quant.bpw`` target below what the allocator's smallest width stores fails here, before
    any work, in stored bits/weight (sizes from the formats' byte counts, no quantizing).

    Raises:
      ConfigError: the target is out of reach, with the reachable range.
    """
    from cqjax.formats import cq, rtn
    from cqjax.ir import KERNEL_ROLES
    from cqjax.passes.allocate import AllocateBits

    alloc = next((p for _, p in chain.steps if isinstance(p, AllocateBits)), None)
    layout = _layout(alloc.recipe) if alloc is not None and alloc.bpw is not None else None
    if layout is None:
        return
    kind, block, min_block = layout

    def nbytes(path: str, bits: int) -> int:
        shape = ir.meta[path].shape
        K, rows = (shape[0], shape[1]) if ir.meta[path].role in KERNEL_ROLES else (shape[1], shape[0])
        if kind == "rtn":
            return rtn.stored_bytes(rows, K, bits, block)
        return cq.stored_bytes(rows, K, bits, cq.block_plan(K, block, min_block))

    paths = alloc.selected(ir)
    params = sum(int(np.prod(ir.meta[p].shape)) for p in paths)
    ends = []
    for f in (min, max):
        total = 0
        for p in paths:
            fixed = alloc.fixed.get(p, ir.meta[p]) if alloc.fixed else None
            total += nbytes(p, int(fixed)) if fixed is not None else f(nbytes(p, b) for b in alloc.choices)
        ends.append(8 * total / params)
    if alloc.bpw < ends[0]:
        raise ConfigError(f"quant.bpw={alloc.bpw:g} is out of reach: with quant.choices={list(alloc.choices)} and "
                          f"the fixed widths, this model stores {ends[0]:.3f} to {ends[1]:.3f} bits/weight "
                          "(at least; input scales add more)")


def _layout(recipe) -> tuple[str, int, int] | None:
    """``(format, block, min_block)`` that a recipe's steps pack into (None: not a known one)."""
    from cqjax.passes.awq import ActivationScale
    from cqjax.passes.cq import Rotate
    from cqjax.passes.gptq import GPTQRoundToNearest
    from cqjax.passes.rtn import RoundToNearest
    from cqjax.pipeline import Masked

    for _, p in steps_of(recipe):
        if isinstance(p, Masked):
            p = p.inner
        if isinstance(p, ActivationScale) and p.recipe is not None:
            return _layout(p.recipe)
        if isinstance(p, Rotate):
            return "cq", p.block, p.min_block
        if isinstance(p, (RoundToNearest, GPTQRoundToNearest)):
            return "rtn", p.block, p.block
    return None


def allocation_report(chain: Chain) -> dict | None:
    """``{"proxy", "bpw", "choices", "measured_steps"}`` of the chain's allocator (None without one)."""
    from cqjax.passes.allocate import AllocateBits

    alloc = next((p for _, p in chain.steps if isinstance(p, AllocateBits)), None)
    if alloc is None:
        return None
    return {"proxy": "random" if alloc.random_seed is not None else alloc.proxy, "bpw": alloc.bpw,
            "choices": list(alloc.choices), "measured_steps": describe(alloc.recipe)}


def _instantiate_error(name: str, pcfg: DictConfig, e: Exception) -> ConfigError:
    cause = e
    while cause.__cause__ is not None and type(cause).__name__ == "InstantiationException":
        cause = cause.__cause__
    msg = str(cause)
    if isinstance(cause, TypeError) and "unexpected keyword" in msg:
        from hydra.utils import get_class

        try:
            fields = [f.name for f in dataclasses.fields(get_class(pcfg._target_))]
            msg += f"; allowed keys of pipeline.{name}: {fields}"
        except Exception:  # noqa: BLE001 - the original message is still useful
            pass
    return ConfigError(f"pipeline.{name} ({pcfg.get('_target_')}): {msg}")


__all__ = ["allocation_report", "build", "check_budget", "check_rules", "config", "names", "recipe", "rules"]
