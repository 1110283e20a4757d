"""Filters and rules over IR paths: one vocabulary to say *which* parameters a pass touches.

A **filter** is any of:

=======================  ==================================================================
filter                   selects
=======================  ==================================================================
``"role:linear"``        leaves whose ``meta.role`` is ``linear`` (a name in ``ir.ROLES``)
``"tower:vision"``       leaves whose ``meta.tower`` is ``vision`` (a name in ``ir.TOWERS``)
any other string         paths that the regex matches with ``re.fullmatch``
callable                 a predicate ``(path: str, meta: TensorMeta) -> bool``
``True`` / ``None``      everything
``False``                nothing
tuple or list            paths that *any* of its filters selects
``Not(f)``               paths that ``f`` does not select
``All(f, g, ...)``       paths that every filter selects
``Any(f, g, ...)``       paths that at least one filter selects (same as a tuple)
=======================  ==================================================================

A string that starts like ``word:`` with another prefix raises (a typo such as ``rol:linear``
would otherwise be a regex that silently selects nothing); write ``\\:`` for a literal colon.

**Rules** map paths to values, first match wins (like qwix's rules)::

    >>> from cqjax.ir import TensorMeta
    >>> bits = Rules([(r"layers/0/.*", 8), ("role:linear", 4)])
    >>> meta = TensorMeta(role="linear", shape=(2, 2), dtype="float32")
    >>> bits.get("layers/0/mlp/kernel", meta), bits.get("layers/1/mlp/kernel", meta)
    (8, 4)
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Union

from cqjax import ir as ir_lib

if TYPE_CHECKING:
    from cqjax.ir import IR, TensorMeta

Predicate = Callable[[str, "TensorMeta"], bool]
Filter = Union[str, bool, None, Predicate, Sequence["Filter"]]

_log = logging.getLogger(__name__)
_KIND = re.compile(r"([A-Za-z_]+):")
_FIELDS = {"role": ir_lib.ROLES, "tower": ir_lib.TOWERS}


class _Named:
    """Base of the built-in predicates: equality and hashing by ``repr``, a readable repr."""

    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self):
        return hash(repr(self))


class _Everything(_Named):
    def __call__(self, path, meta):
        return True

    def __repr__(self):
        return "True"


class _Nothing(_Named):
    def __call__(self, path, meta):
        return False

    def __repr__(self):
        return "False"


class _Field(_Named):
    """``role:NAME`` / ``tower:NAME``: compares one metadata field."""

    __slots__ = ("field", "value")

    def __init__(self, field: str, value: str):
        self.field, self.value = field, value

    def __call__(self, path, meta):
        return getattr(meta, self.field) == self.value

    def __repr__(self):
        return f"{self.field}:{self.value}"


class _Regex(_Named):
    """A regex matched with ``re.fullmatch`` on the '/'-joined path."""

    __slots__ = ("pattern",)

    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regex filter {pattern!r}: {e}") from None

    def __call__(self, path, meta):
        return self.pattern.fullmatch(path) is not None

    def __repr__(self):
        return repr(self.pattern.pattern)


class Not(_Named):
    """Selects what ``f`` does not select."""

    __slots__ = ("f",)

    def __init__(self, f: Filter):
        self.f = to_predicate(f)

    def __call__(self, path, meta):
        return not self.f(path, meta)

    def __repr__(self):
        return f"Not({self.f!r})"


class All(_Named):
    """Selects what every filter selects (``All()`` selects everything)."""

    __slots__ = ("fs",)

    def __init__(self, *fs: Filter):
        self.fs = tuple(to_predicate(f) for f in fs)

    def __call__(self, path, meta):
        return builtins.all(f(path, meta) for f in self.fs)

    def __repr__(self):
        return f"All({', '.join(map(repr, self.fs))})"


class Any(_Named):
    """Selects what at least one filter selects (``Any()`` selects nothing)."""

    __slots__ = ("fs",)

    def __init__(self, *fs: Filter):
        self.fs = tuple(to_predicate(f) for f in fs)

    def __call__(self, path, meta):
        return builtins.any(f(path, meta) for f in self.fs)

    def __repr__(self):
        return f"Any({', '.join(map(repr, self.fs))})"


def to_predicate(filter: Filter) -> Predicate:
    """Turns a filter (see the module docstring) into a predicate ``(path, meta) -> bool``.

    Raises:
      ValueError: naming the filter, for an invalid regex, an unknown role or tower, an
        unknown ``kind:`` prefix, or a value that is not a filter.
    """
    if filter is None or filter is True:
        return _Everything()
    if filter is False:
        return _Nothing()
    if isinstance(filter, str):
        kind = _KIND.match(filter)
        if kind is None:
            return _Regex(filter)
        kind, value = kind.group(1), filter[kind.end():]
        allowed = _FIELDS.get(kind)
        if allowed is None:
            raise ValueError(
                f"unknown filter kind {kind + ':'!r} in {filter!r}; use role:, tower: or a regex"
                " (write '\\:' for a literal colon)")
        if value not in allowed:
            raise ValueError(f"unknown {kind} in filter {filter!r}; expected one of {allowed}")
        return _Field(kind, value)
    if isinstance(filter, Sequence):  # tuple, list, omegaconf ListConfig
        return Any(*filter)
    if callable(filter):
        return filter
    raise ValueError(f"not a filter: {filter!r} (expected a string, bool, None, callable or tuple)")


def select(ir: IR, filter: Filter) -> list[str]:
    """Returns the paths of ``ir`` that ``filter`` selects, in IR order."""
    pred = to_predicate(filter)
    return [path for path, meta in ir.meta.items() if pred(path, meta)]


def freeze(filter: Filter) -> Filter:
    """Lists (e.g. from YAML) become tuples, so rules and passes stay hashable."""
    if isinstance(filter, Sequence) and not isinstance(filter, str):
        return tuple(freeze(f) for f in filter)
    return filter


def no_match(filter: Filter, ir: IR, among: Filter = True, n: int = 3, what: str = "tensors") -> str:
    """Says why ``filter`` selects none of the paths that ``among`` selects in ``ir``: the
    nearest paths to a regex, the roles and towers present for a ``role:``/``tower:`` filter.

    >>> from cqjax.ir import IR, TensorMeta
    >>> toy = IR("toy", None, {"lm_head/kernel": 0, "embed/embedding": 0},
    ...          {p: TensorMeta(role=r, shape=(), dtype="float32")
    ...           for p, r in (("lm_head/kernel", "lm_head"), ("embed/embedding", "embedding"))})
    >>> no_match("lm_head", toy)
    "'lm_head' matches none of the 2 tensors; nearest paths: lm_head/kernel, embed/embedding"
    """
    import difflib

    paths = select(ir, among)
    head = f"{filter!r} matches none of the {len(paths)} {what}"
    m = _KIND.match(filter) if isinstance(filter, str) else None
    if m and m.group(1) in _FIELDS:
        field = m.group(1)
        present = sorted({getattr(ir.meta[p], field) for p in paths})
        return f"{head}; the {field}s present: {', '.join(present)}"
    if isinstance(filter, str):
        near = difflib.get_close_matches(filter, paths, n=n, cutoff=0.0)
        return f"{head}; nearest paths: {', '.join(near)}"
    return f"{head}; e.g. {', '.join(paths[:n])}"


@dataclasses.dataclass(frozen=True, init=False)
class Rules:
    """An ordered list of ``(filter, value)`` pairs; for each path the first match wins.

    Args:
      rules: ``(filter, value)`` pairs, or a mapping ``{filter: value}`` (ordered, as Hydra
        gives it), or another ``Rules``.

    Raises:
      ValueError: naming the rule, when one of its filters is bad.
    """

    rules: tuple[tuple[Filter, object], ...]

    def __init__(self, rules: Iterable[tuple[Filter, object]] | Mapping | Rules = ()):
        if isinstance(rules, Rules):
            rules = rules.rules
        elif isinstance(rules, Mapping):
            rules = rules.items()
        pairs, preds = [], []
        for i, pair in enumerate(rules):
            try:
                filter, value = pair
            except (TypeError, ValueError):
                raise ValueError(f"rule {i} is not a (filter, value) pair: {pair!r}") from None
            try:
                preds.append(to_predicate(filter))
            except ValueError as e:
                raise ValueError(f"rule {i} ({filter!r}): {e}") from None
            pairs.append((freeze(filter), value))
        object.__setattr__(self, "rules", tuple(pairs))
        object.__setattr__(self, "_preds", tuple(preds))

    @classmethod
    def of(cls, x) -> Rules:
        """Coerces a config value: ``Rules`` as is, a mapping or list of pairs, or a scalar
        (one rule that selects everything)."""
        if isinstance(x, (Rules, Mapping)):
            return cls(x)
        if isinstance(x, Sequence) and not isinstance(x, str):
            return cls(x)
        return cls([(True, x)])

    def index(self, path: str, meta: TensorMeta) -> int | None:
        """Returns the index of the first rule that selects ``path``, or None."""
        for i, pred in enumerate(self._preds):
            if pred(path, meta):
                return i
        return None

    def get(self, path: str, meta: TensorMeta, default=None):
        """Returns the value of the first rule that selects ``path``, else ``default``."""
        i = self.index(path, meta)
        return default if i is None else self.rules[i][1]

    def _winners(self, ir: IR) -> dict[str, int]:
        winners = {}
        for path, meta in ir.meta.items():
            i = self.index(path, meta)
            if i is not None:
                winners[path] = i
        return winners

    def resolve(self, ir: IR, *, warn: bool = True) -> dict[str, object]:
        """Returns ``{path: value}`` for every path some rule selects (first match wins).

        With ``warn``, logs one warning line naming the rules that won no path.
        """
        winners = self._winners(ir)
        if warn:
            unused = sorted(set(range(len(self.rules))) - set(winners.values()))
            if unused:
                _log.warning("rules that matched no path in %s: %s", ir.family,
                             ", ".join(f"#{i} {self.rules[i][0]!r}" for i in unused))
        return {path: self.rules[i][1] for path, i in winners.items()}

    def unused(self, ir: IR) -> list[Filter]:
        """Returns the filters of the rules that won no path of ``ir`` (matched nothing, or
        only paths that an earlier rule already took), in rule order."""
        used = set(self._winners(ir).values())
        return [f for i, (f, _) in enumerate(self.rules) if i not in used]

    def __len__(self):
        return len(self.rules)
