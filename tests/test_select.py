"""Tests for cqjax.select: the filter vocabulary and first-match-wins rules."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cqjax.ir import IR, TensorMeta
from cqjax.select import All, Any, Not, Rules, select, to_predicate

LEAVES = {
    "embed/embedding": ("embedding", "text", (8, 4)),
    "layers/0/attn/q_proj/kernel": ("linear", "text", (4, 4)),
    "layers/0/norm/scale": ("norm", "text", (4,)),
    "layers/1/attn/q_proj/kernel": ("linear", "text", (4, 4)),
    "layers/10/attn/q_proj/kernel": ("linear", "text", (4, 4)),
    "vision/layers/0/mlp/kernel": ("linear", "vision", (4, 4)),
    "lm_head/kernel": ("lm_head", "text", (4, 8)),
}


@pytest.fixture
def ir():
    return IR("toy", None, {p: np.zeros(s, np.float32) for p, (_, _, s) in LEAVES.items()},
              {p: TensorMeta(role=r, tower=t, shape=s, dtype="float32") for p, (r, t, s) in LEAVES.items()})


def test_role_and_tower(ir):
    assert select(ir, "role:linear") == [
        "layers/0/attn/q_proj/kernel", "layers/1/attn/q_proj/kernel", "layers/10/attn/q_proj/kernel",
        "vision/layers/0/mlp/kernel"]
    assert select(ir, "tower:vision") == ["vision/layers/0/mlp/kernel"]
    assert select(ir, "role:conv") == []


def test_regex_is_fullmatch(ir):
    assert select(ir, r"layers/1/.*") == ["layers/1/attn/q_proj/kernel"]  # not layers/10
    assert select(ir, "kernel") == []  # a substring does not match
    assert select(ir, r".*/kernel") == [p for p in LEAVES if p.endswith("/kernel")]


def test_predicate_bool_none(ir):
    assert select(ir, lambda path, meta: meta.shape == (4,)) == ["layers/0/norm/scale"]
    assert select(ir, True) == list(LEAVES)
    assert select(ir, None) == list(LEAVES)
    assert select(ir, False) == []


def test_tuple_and_list_mean_any(ir):
    expected = ["embed/embedding", "lm_head/kernel"]
    assert select(ir, ("role:embedding", r"lm_head/.*")) == expected
    assert select(ir, ["role:embedding", r"lm_head/.*"]) == expected
    assert select(ir, Any("role:embedding", r"lm_head/.*")) == expected
    assert select(ir, ()) == [] and select(ir, Any()) == []


def test_not_all(ir):
    assert select(ir, All("role:linear", Not("tower:vision"), Not(r"layers/0/.*"))) == [
        "layers/1/attn/q_proj/kernel", "layers/10/attn/q_proj/kernel"]
    assert select(ir, Not(True)) == [] and select(ir, All()) == list(LEAVES)
    assert set(select(ir, Not("role:linear"))) == set(LEAVES) - set(select(ir, "role:linear"))


def test_builtin_predicates_compare_and_print():
    assert Not("role:linear") == Not("role:linear") and Not("role:linear") != Not("role:norm")
    assert repr(All("role:linear", Not(r"lm_head/.*"))) == "All(role:linear, Not('lm_head/.*'))"


@pytest.mark.parametrize("bad, words", [
    ("layers/(0", "invalid regex"),
    ("role:linera", "unknown role"),
    ("tower:speech", "unknown tower"),
    ("rol:linear", "unknown filter kind"),
    (3, "not a filter"),
    (("role:linear", "role:nope"), "role:nope"),
])
def test_bad_filters_raise_naming_them(bad, words):
    with pytest.raises(ValueError, match=words) as e:
        to_predicate(bad)
    assert repr(bad if isinstance(bad, (str, int)) else bad[1]).strip("'") in str(e.value)


def test_escaped_colon_is_a_regex():
    assert to_predicate(r"a\:b")("a:b", None)


def test_rules_first_match_wins(ir):
    rules = Rules([(r"layers/0/.*", 8), ("role:linear", 4), ("role:lm_head", 6)])
    assert rules.resolve(ir) == {
        "layers/0/attn/q_proj/kernel": 8, "layers/0/norm/scale": 8, "layers/1/attn/q_proj/kernel": 4,
        "layers/10/attn/q_proj/kernel": 4, "vision/layers/0/mlp/kernel": 4, "lm_head/kernel": 6}
    meta = ir.meta["embed/embedding"]
    assert rules.get("embed/embedding", meta) is None and rules.get("embed/embedding", meta, 16) == 16
    # Order matters: the general rule first takes everything.
    assert set(Rules([("role:linear", 4), (r"layers/0/.*", 8)]).resolve(ir, warn=False).values()) == {4, 8}
    assert Rules([("role:linear", 4), (r"layers/0/.*", 8)]).resolve(ir, warn=False)[
        "layers/0/attn/q_proj/kernel"] == 4


def test_rules_report_unused(ir, caplog):
    rules = Rules({"role:linear": 4, r"layers/1/attn/.*": 2, "role:conv": 3, r".*": 16})
    assert rules.unused(ir) == [r"layers/1/attn/.*", "role:conv"]  # shadowed, and matched nothing
    with caplog.at_level(logging.WARNING, logger="cqjax.select"):
        rules.resolve(ir)
    assert len(caplog.records) == 1
    assert "layers/1/attn/.*" in caplog.text and "role:conv" in caplog.text and "#3" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cqjax.select"):
        Rules([(True, 1)]).resolve(ir)
    assert not caplog.records


def test_rules_validate_and_coerce():
    with pytest.raises(ValueError, match=r"rule 1 .*role:lin"):
        Rules([("role:linear", 4), ("role:lin", 2)])
    with pytest.raises(ValueError, match="not a \\(filter, value\\) pair"):
        Rules([("role:linear",)])
    assert Rules.of(4).rules == ((True, 4),)
    assert Rules.of({"role:linear": 4}).rules == (("role:linear", 4),)
    assert Rules.of([[["role:linear", "role:lm_head"], 4]]).rules == ((("role:linear", "role:lm_head"), 4),)
    assert Rules.of(Rules.of(4)) == Rules.of(4)
    hash(Rules([(("role:linear",), 4)]))  # usable as a frozen dataclass default
