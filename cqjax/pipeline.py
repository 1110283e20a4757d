"""Passes: pure rewrites of the IR, their composition, and a runner that times and checks them.

A **pass** is an object ``(ir, ctx) -> IR`` that returns a new IR and never mutates its input,
and says what it needs and what it may touch: the five members of :class:`PassLike`. What it
reads besides the IR (calibration statistics, calibration rows, the float reference) it
declares as :class:`Needs` and finds in the :class:`Context`. :class:`Pass` is the convenient
base: a frozen keyword-only dataclass whose fields are its hyperparameters plus a ``where``
filter (see :mod:`cqjax.select`); a subclass implements :meth:`Pass.rewrite` per selected
leaf. The same dataclass is its Hydra structured config (``_target_: cqjax.passes.x.MyPass``
calls the constructor with the YAML fields). A plain function becomes a pass with
:func:`as_pass` (``chain`` and ``masked`` do that for you).

==========================  ===================================================================
law / contract              checked by
==========================  ===================================================================
``chain(a, b)(ir)``         equals ``b(a(ir))``; ``chain()`` is the identity; chain is associative
``masked(p, where)``        ``p`` sees only the selected leaves; ``masked(p, True) == p``,
                            ``masked(p, False)`` is the identity
unselected leaves           come back as the same objects (``run`` verifies: identity, else bits)
``meta.role/tower/...``     unchanged unless the pass lists the field in ``may_change``
written filters            a ``where`` or mask written for a step selects at least one path
                            of the input IR (``run`` checks it before any pass runs)
==========================  ===================================================================

Example: a user-written pass that records a bit width (layer 0 at 4 bits, the rest at 2),
masked to skip the LM head, then a plain function whose ``where`` skips it too:

>>> import dataclasses
>>> import numpy as np
>>> from cqjax import pipeline, select
>>> from cqjax.ir import IR, TensorMeta
>>> shapes = {"embed/embedding": ("embedding", (8, 4)), "layers/0/mlp/kernel": ("linear", (4, 4)),
...           "layers/1/mlp/kernel": ("linear", (4, 4)), "lm_head/kernel": ("lm_head", (4, 8))}
>>> ir = IR("toy", None, {p: np.ones(s, np.float32) for p, (r, s) in shapes.items()},
...         {p: TensorMeta(role=r, shape=s, dtype="float32") for p, (r, s) in shapes.items()})
>>> @dataclasses.dataclass(frozen=True, kw_only=True)
... class SetBits(pipeline.Pass):
...     '''Records ``meta.info["bits"]`` from rules (no math: a toy).'''
...     default_where = ("role:linear", "role:lm_head")
...     bits: select.Rules = select.Rules([(r"layers/0/.*", 4), (True, 2)])
...
...     def rewrite(self, path, leaf, meta, ctx):
...         return leaf, meta.replace(info={**meta.info, "bits": self.bits.get(path, meta)})
>>> double = pipeline.as_pass(lambda path, x, meta: (2 * x, meta), where=select.Not("role:lm_head"))
>>> pipe = pipeline.named_chain(
...     ("bits", pipeline.masked(SetBits(), select.Not("role:lm_head"))),
...     ("double", double))
>>> out, report = pipeline.run(pipe, ir, progress=False)
>>> {p: m.info.get("bits") for p, m in out.meta.items()}
{'embed/embedding': None, 'layers/0/mlp/kernel': 4, 'layers/1/mlp/kernel': 2, 'lm_head/kernel': None}
>>> [(r["name"], r["changed"]) for r in report]
[('bits', 2), ('double', 3)]
>>> out.params["lm_head/kernel"] is ir.params["lm_head/kernel"], float(out.params["embed/embedding"][0, 0])
(True, 2.0)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from cqjax import ir as ir_lib
from cqjax import select as select_lib
from cqjax.ir import IR, TensorMeta
from cqjax.progress import Progress

#: Metadata fields a pass may change only if it lists them in ``may_change``; ``"paths"`` there
#: allows adding or removing paths (within the pass's selection).
PROTECTED = ("role", "tower", "hf_name", "shape", "dtype")


class PassError(ValueError):
    """A pass broke an IR invariant or the pass contract; the message names the pass and path."""


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a pass reads besides the IR it rewrites; the run's :class:`Context` carries it.

    ==============  ============================================  ============================
    field           the pass reads                                provided by
    ==============  ============================================  ============================
    ``statistics``  ``ctx.calibration[path][name]`` per tensor    calibration (``"hessian"``,
                    (a pass falls back where one is missing)      ``"fisher"``)
    ``rows``        ``ctx.rows``: at least this many calibration  calibration (draws
                    token rows (0: none)                          ``max(calib.rows, rows)``)
                    ``[n, length]``
    ``reference``   ``ctx.reference``: the float IR               :func:`run` (its input IR)
    ==============  ============================================  ============================

    ``a | b`` is what a pass made of ``a`` and ``b`` needs; a ``Needs()`` is falsy.
    """

    statistics: frozenset[str] = frozenset()
    rows: int = 0
    reference: bool = False

    def __post_init__(self):
        object.__setattr__(self, "statistics", frozenset(self.statistics))

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.statistics | other.statistics, max(self.rows, other.rows), self.reference or other.reference)

    def __bool__(self) -> bool:
        return bool(self.statistics) or self.rows > 0 or self.reference

    @property
    def calibration(self) -> bool:
        """Whether calibration rows must be drawn (for statistics or for the rows themselves)."""
        return bool(self.statistics) or self.rows > 0


@runtime_checkable
class PassLike(Protocol):
    """The whole pass protocol: what :func:`chain`, :func:`masked` and :func:`run` use.

    =================  ======================================================================
    member             meaning
    =================  ======================================================================
    ``name``           the name in reports
    ``needs``          a :class:`Needs`: what it reads from the :class:`Context`
    ``may_change``     :data:`PROTECTED` meta fields it may change (``"paths"``: add/remove)
    ``selected(ir)``   the paths it may change, or None for "it does not say"
    ``__call__``       ``(ir, ctx) -> IR``, a new IR; the input is never mutated
    =================  ======================================================================

    :class:`Pass` (a dataclass, per-leaf ``rewrite``), :class:`Chain`, :class:`Masked` and
    :func:`as_pass` (a plain function) implement it.
    """

    name: str
    needs: Needs
    may_change: frozenset[str]

    def selected(self, ir: IR) -> list[str] | None: ...

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """Read-only things shared by all passes of a run (see :class:`Needs`).

    Attributes:
      calibration: per-path statistics, ``{path: {"hessian": ..., "fisher": ...}}``.
      rows: calibration token rows ``int32 [n, length]`` (None: not drawn).
      reference: the float IR the run started from (:func:`run` sets it when a pass needs it).
      rng_seed: the run's seed; use :meth:`seed_for` for a per-path seed.
      log: a callback for one-line messages (default: the ``cqjax.pipeline`` logger).
      progress: passes print progress lines on stderr.
      step: the name of the step running (set by :func:`run`, for progress lines).
    """

    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rows: Any = None
    reference: IR | None = None
    rng_seed: int = 0
    log: Callable[[str], None] = logging.getLogger(__name__).info
    progress: bool = False
    step: str = ""

    def __post_init__(self):
        object.__setattr__(self, "calibration", MappingProxyType(dict(self.calibration)))

    def seed_for(self, path: str) -> int:
        """A deterministic 32-bit seed for ``path`` derived from ``rng_seed``."""
        return zlib.crc32(f"{self.rng_seed}:{path}".encode())

    def replace(self, **changes) -> Context:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pass:
    """Base of leaf-wise passes. Subclass as a frozen kw-only dataclass and define ``rewrite``.

    Class attributes: ``name`` (default: the class name in snake_case), ``default_where``
    (the filter used when ``where`` is None), ``may_change`` (see :data:`PROTECTED`), ``needs``
    (a :class:`Needs`; a pass may make it a property of its fields).
    A subclass may override ``__call__`` for a whole-IR pass; it must then touch only
    ``self.selected(ir)`` (``run`` checks it).
    """

    name: ClassVar[str] = "pass"
    default_where: ClassVar[Any] = True
    may_change: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[Needs] = Needs()
    #: ``rewrite`` of a block of a tensor's rows (output rows of a kernel, rows of a table) gives
    #: those rows of ``rewrite`` of the whole tensor: :mod:`cqjax.stream` may then convert a large
    #: tensor in row chunks.
    row_separable: ClassVar[bool] = False

    where: Any = None  # a cqjax.select filter; None means ``default_where``

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def __post_init__(self):
        object.__setattr__(self, "where", select_lib.freeze(self.where))
        try:
            select_lib.to_predicate(self.filter)
        except ValueError as e:
            raise ValueError(f"pass {self.name!r}: bad where: {e}") from None

    @property
    def filter(self) -> Any:
        return self.default_where if self.where is None else self.where

    def selected(self, ir: IR) -> list[str]:
        """The paths this pass may change in ``ir``."""
        return select_lib.select(ir, self.filter)

    def rewrite(self, path: str, leaf: Any, meta: TensorMeta, ctx: Context) -> tuple[Any, TensorMeta]:
        """Returns the new ``(leaf, meta)`` of one selected path."""
        raise NotImplementedError(f"pass {self.name!r} defines neither rewrite nor __call__")

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        paths = self.selected(ir)
        bar = Progress(f"pass {ctx.step or self.name}", total=len(paths), unit="tensors", every_s=5.0, tag="cqjax",
                       enabled=ctx.progress)
        params, meta = {}, {}
        for path in paths:
            params[path], meta[path] = self.rewrite(path, ir.params[path], ir.meta[path], ctx)
            bar.update(1)
        bar.close()
        return ir.replace(params=params, meta=meta)


def to_pass(p: Any) -> PassLike:
    """``p`` if it implements :class:`PassLike`, else the plain function wrapped by :func:`as_pass`."""
    if isinstance(p, PassLike):
        return p
    if callable(p):
        return as_pass(p)
    raise TypeError(f"not a pass: {p!r} (expected a PassLike or a function)")


def sub_ir(ir: IR, paths) -> IR:
    """The IR restricted to ``paths`` (same family and config)."""
    return dataclasses.replace(ir, params={p: ir.params[p] for p in paths}, meta={p: ir.meta[p] for p in paths})


def _merge(ir: IR, selected: list[str], sub: IR) -> IR:
    """``ir`` with the ``selected`` paths replaced by ``sub`` (paths ``sub`` dropped are dropped)."""
    chosen = set(selected)
    keep = [p for p in ir.params if p not in chosen or p in sub.params]
    keep += [p for p in sub.params if p not in ir.params]
    pick = lambda p, d, s: s[p] if p in s else d[p]  # noqa: E731
    return dataclasses.replace(ir, params={p: pick(p, ir.params, sub.params) for p in keep},
                               meta={p: pick(p, ir.meta, sub.meta) for p in keep})


@dataclasses.dataclass(frozen=True, kw_only=True)
class FunctionPass(Pass):
    """A plain function as a pass; build it with :func:`as_pass`."""

    fn: Callable[..., Any]
    leafwise: bool
    label: str = ""
    declared: frozenset[str] = frozenset()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label or getattr(self.fn, "__name__", "function")

    @property
    def may_change(self) -> frozenset[str]:  # type: ignore[override]
        return self.declared

    def selected(self, ir: IR) -> list[str] | None:  # type: ignore[override]
        return super().selected(ir) if self.leafwise or self.where is not None else None

    def rewrite(self, path, leaf, meta, ctx):
        return self.fn(path, leaf, meta)

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        if self.leafwise:
            return super().__call__(ir, ctx)
        if self.where is None:
            return self.fn(ir, Context() if ctx is None else ctx)
        return masked(as_pass(self.fn, name=self.name), self.where)(ir, ctx)


def as_pass(fn: Callable[..., Any], where: Any = None, *, name: str = "", may_change=()) -> FunctionPass:
    """Wraps ``fn(path, leaf, meta) -> (leaf, meta)`` (applied to the leaves ``where``
    selects) or ``fn(ir, ctx) -> ir`` (seeing only the ``where`` sub-IR, if given) as a pass."""
    import inspect

    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) not in (2, 3):
        label = name or getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(f"as_pass({label}): expected (path, leaf, meta) or (ir, ctx), "
                         f"got {len(params)} required arguments")
    return FunctionPass(fn=fn, leafwise=len(params) == 3, where=where, label=name,
                        declared=frozenset(may_change))


@dataclasses.dataclass(frozen=True)
class Chain:
    """Passes applied in order; ``steps`` are ``(name, pass)`` pairs. See :func:`chain`."""

    steps: tuple[tuple[str, PassLike], ...]
    name: str = "chain"

    @property
    def may_change(self) -> frozenset[str]:
        return frozenset().union(*(p.may_change for _, p in self.steps))

    @property
    def needs(self) -> Needs:
        out = Needs()
        for _, p in self.steps:
            out = out | p.needs
        return out

    def selected(self, ir: IR) -> None:
        return None  # its steps say, one by one (run flattens chains)

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        for n, p in self.steps:
            ir = p(ir, ctx.replace(step=f"{ctx.step}/{n}" if ctx.step else n))
        return ir


def chain(*passes: Any) -> Chain:
    """``chain(a, b)(ir, ctx) == b(a(ir, ctx), ctx)``; ``chain()`` is the identity. Plain
    functions are wrapped by :func:`as_pass`."""
    passes = [to_pass(p) for p in passes]
    return Chain(tuple((p.name, p) for p in passes))


def named_chain(*named: tuple[str, Any]) -> Chain:
    """Like :func:`chain` with explicit names for reports (unique, non-empty).

    From a Hydra pipeline dict: ``named_chain(*instantiate(cfg.pipeline, _convert_="all").items())``
    (:func:`cqjax.recipes.build` does this and more).
    """
    names = [n for n, _ in named]
    bad = [n for n in names if not isinstance(n, str) or not n or names.count(n) > 1]
    if bad:
        raise ValueError(f"named_chain: names must be unique non-empty strings, got {bad!r}")
    return Chain(tuple((n, to_pass(p)) for n, p in named))


@dataclasses.dataclass(frozen=True)
class Masked:
    """``inner`` applied to the sub-IR that ``where`` selects. See :func:`masked`."""

    inner: PassLike
    where: Any

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def may_change(self) -> frozenset[str]:
        return self.inner.may_change

    @property
    def needs(self) -> Needs:
        return self.inner.needs

    @property
    def filter(self) -> Any:
        """What the masked step may rewrite: ``where`` and the inner pass's own filter."""
        return select_lib.All(self.where, getattr(self.inner, "filter", True))

    def selected(self, ir: IR) -> list[str]:
        paths = select_lib.select(ir, self.where)
        inner = self.inner.selected(sub_ir(ir, paths))
        return paths if inner is None else inner

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        paths = select_lib.select(ir, self.where)
        if not paths:
            return ir
        return _merge(ir, paths, self.inner(sub_ir(ir, paths), Context() if ctx is None else ctx))


def masked(inner: Any, where: Any) -> Masked:
    """``inner`` sees and affects only the leaves ``where`` selects; others come back identical."""
    select_lib.to_predicate(where)  # fail early on a bad filter
    return Masked(to_pass(inner), select_lib.freeze(where))


def steps(p: PassLike, name: str = "") -> list[tuple[str, PassLike]]:
    """``p`` flattened: its chains' steps in order, names joined with '/'."""
    if isinstance(p, Chain):
        return [s for n, q in p.steps for s in steps(q, f"{name}/{n}" if name else n)]
    return [(name or p.name, p)]


def user_filters(p: PassLike, name: str = "") -> list[tuple[str, Any]]:
    """``(step name, filter)`` of every filter written for ``p`` and its parts (a pass's
    ``where``, a mask), not their defaults."""
    out = []
    for n, q in steps(p, name):
        if isinstance(q, Masked):
            out += [(n, q.where)] + user_filters(q.inner, n)
        elif isinstance(q, Pass) and q.where is not None:
            out.append((n, q.where))
    return out


def describe(p: PassLike) -> list[dict]:
    """JSON-able ``[{"name", "pass", "options"}]`` of ``p``'s steps: the class of each and its
    fields (a nested recipe is described the same way), for reports."""
    out = []
    for name, q in steps(p):
        if isinstance(q, Masked):
            out.append({"name": name, "pass": "masked", "options": {"where": repr(q.where),
                                                                    "inner": describe(q.inner)}})
        elif isinstance(q, FunctionPass):
            out.append({"name": name, "pass": f"{q.fn.__module__}.{q.fn.__qualname__}",
                        "options": {"where": None if q.where is None else repr(q.where)}})
        else:
            options = {f.name: _option(getattr(q, f.name)) for f in dataclasses.fields(q)} \
                if dataclasses.is_dataclass(q) else {}
            out.append({"name": name, "pass": f"{type(q).__module__}.{type(q).__qualname__}", "options": options})
    return out


def _option(v: Any) -> Any:
    if isinstance(v, PassLike):
        return describe(v)
    if isinstance(v, select_lib.Rules):
        return [[f if isinstance(f, str) else repr(f), _option(x)] for f, x in v.rules]
    if callable(v):
        return repr(v)
    return _jsonable(v)


# ---------------------------------------------------------------------------------- running


def same(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` are the same object or bit-identical (arrays, containers,
    dataclasses such as TensorMeta or quantized leaves)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if hasattr(a, "__array__") and hasattr(a, "shape") and hasattr(a, "dtype"):
        a, b = np.asarray(a), np.asarray(b)
        return (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
            np.ascontiguousarray(a).reshape(-1).view(np.uint8),
            np.ascontiguousarray(b).reshape(-1).view(np.uint8)))
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable means "not the same"
        return False


def changed_paths(before: IR, after: IR) -> list[str]:
    """Paths added, removed, or whose leaf or meta differ (identity first, then bits)."""
    out = [p for p in before.params if p not in after.params]
    for p, leaf in after.params.items():
        if p not in before.params or not (same(before.params[p], leaf) and same(before.meta[p], after.meta[p])):
            out.append(p)
    return out


def check_step(name: str, p: Any, before: IR, after: IR, selected: list[str] | None) -> None:
    """Raises :class:`PassError` naming the pass and path when ``after`` breaks the contract."""
    if not isinstance(after, IR):
        raise PassError(f"pass {name!r} returned {type(after).__name__}, not an IR")
    try:
        ir_lib.verify(after)
    except ValueError as e:
        raise PassError(f"pass {name!r} produced an invalid IR: {e}") from None
    allowed = p.may_change
    chosen = set(before.params) if selected is None else set(selected)
    removed = [q for q in before.params if q not in after.params]
    added = [q for q in after.params if q not in before.params]
    if (removed or added) and "paths" not in allowed:
        raise PassError(f"pass {name!r} added/removed paths {(removed + added)[:3]} without "
                        "declaring 'paths' in may_change")
    for q in removed:
        if q not in chosen:
            raise PassError(f"pass {name!r} removed unselected path {q}")
    for q in before.params:
        if q not in after.params:
            continue
        mb, ma = before.meta[q], after.meta[q]
        for field in PROTECTED:
            if field not in allowed and getattr(mb, field) != getattr(ma, field):
                raise PassError(f"pass {name!r}: {q}: meta.{field} changed {getattr(mb, field)!r} -> "
                                f"{getattr(ma, field)!r} but the pass does not declare it in may_change")
        if q not in chosen:
            if not same(before.params[q], after.params[q]):
                raise PassError(f"pass {name!r} modified the leaf of unselected path {q}")
            if not same(mb, ma):
                raise PassError(f"pass {name!r} modified the meta of unselected path {q}")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"<{type(x).__name__} {x.dtype} {tuple(x.shape)}>"
    return repr(x)


def dump(ir: IR, path: str | os.PathLike) -> None:
    """Writes ``{path: {shape, dtype, role, tower, leaf, info}}`` (never the arrays) as JSON,
    atomically."""
    doc = {q: {"shape": list(m.shape), "dtype": m.dtype, "role": m.role, "tower": m.tower,
               "leaf": type(ir.params[q]).__name__, "info": _jsonable(m.info)} for q, m in ir.meta.items()}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dump-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_filters(pipeline: PassLike, ir: IR) -> None:
    """Raises :class:`PassError` for a filter written for a step (a ``where``, a mask) that
    selects no path of ``ir``, naming the step, the filter and the nearest paths (``False``,
    written to switch a step off, is exempt)."""
    for name, f in user_filters(pipeline):
        if f is not False and not select_lib.select(ir, f):
            raise PassError(f"pass {name!r}: where {select_lib.no_match(f, ir)}")


def run(pipeline: PassLike, ir: IR, ctx: Context | None = None, *, verify: bool = True, strict: bool = True,
        dump_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[IR, list[dict]]:
    """Runs ``pipeline`` pass by pass (chains are flattened, names joined with '/').

    Before any pass runs, every filter written for a step must select something
    (:func:`check_filters`, unless ``strict=False``) and what the steps need must be there
    (:class:`Needs`): the reference is ``ir`` itself unless ``ctx`` gives one; rows must come
    with ``ctx``.

    Args:
      pipeline: a pass, or a (named) chain of passes (a plain function is wrapped).
      ir: the input IR (not modified).
      ctx: shared read-only context (default: ``Context()``).
      verify: check each step with :func:`check_step` (raises :class:`PassError`).
      dump_dir: if set, write ``00-input.json`` and ``NN-<name>.json`` there (see :func:`dump`).
      progress: print one line per pass to stderr.

    Returns:
      ``(ir, report)``; report has one ``{"name", "seconds", "changed", "selected"}`` per pass
      (``selected`` is None for passes that do not say what they select).
    """
    pipeline = to_pass(pipeline)
    ctx = Context() if ctx is None else ctx
    if strict:
        check_filters(pipeline, ir)
    needs = pipeline.needs
    if needs.reference and ctx.reference is None:
        ctx = ctx.replace(reference=ir)
    if needs.rows and ctx.rows is None:
        raise PassError(f"pipeline {[n for n, p in steps(pipeline) if p.needs.rows]} needs calibration rows "
                        "(Context(rows=...)): run calibration first")
    todo = steps(pipeline)
    if dump_dir is not None:
        os.makedirs(dump_dir, exist_ok=True)
        dump(ir, os.path.join(dump_dir, "00-input.json"))
    report = []
    for i, (name, p) in enumerate(todo, 1):
        selected = p.selected(ir)
        start = time.perf_counter()
        out = p(ir, ctx.replace(step=name))
        if isinstance(out, IR) and "jax" in sys.modules:  # wait for async dispatch before timing
            sys.modules["jax"].block_until_ready([v for k, v in out.params.items() if ir.params.get(k) is not v])
        seconds = time.perf_counter() - start
        if verify:
            check_step(name, p, ir, out, selected)
        changed = len(changed_paths(ir, out))
        report.append({"name": name, "seconds": seconds, "changed": changed,
                       "selected": None if selected is None else len(selected)})
        if progress:
            print(f"cqjax: pass {i}/{len(todo)} {name}: {changed} changed in {seconds:.2f}s",
                  file=sys.stderr, flush=True)
        if dump_dir is not None:
            dump(out, os.path.join(dump_dir, f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"))
        ir = out
    return ir, report
