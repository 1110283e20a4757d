"""Tests for cqjax.pipeline: the Pass protocol, composition laws, the runner and its verifier."""

from __future__ import annotations

import dataclasses
import doctest
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cqjax.pipeline
from cqjax import select
from cqjax.ir import IR, LazyTensor, TensorMeta
from cqjax.pipeline import (Context, Needs, Pass, PassError, as_pass, chain, masked, named_chain, run,
                            same)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale(Pass):
    """Multiplies selected leaves by ``factor`` and counts the scalings in ``meta.info``."""

    default_where = "role:linear"
    factor: float = 2.0

    def rewrite(self, path, leaf, meta, ctx):
        return leaf * np.float32(self.factor), meta.replace(info={**meta.info, "n": meta.info.get("n", 0) + 1})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shift(Pass):
    offset: float = 1.0

    def rewrite(self, path, leaf, meta, ctx):
        return leaf + np.float32(self.offset), meta


def make_ir(spec, seed=0):
    """``spec``: {path: (role, shape)}; float32 leaves drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return IR("toy", None, {p: rng.standard_normal(s).astype(np.float32) for p, (_, s) in spec.items()},
              {p: TensorMeta(role=r, shape=s, dtype="float32") for p, (r, s) in spec.items()})


TOY = {"embed/embedding": ("embedding", (6, 3)), "layers/0/mlp/kernel": ("linear", (3, 3)),
       "layers/0/norm/scale": ("norm", (3,)), "layers/1/mlp/kernel": ("linear", (3, 2)),
       "lm_head/kernel": ("lm_head", (3, 6))}


def ir_same(a: IR, b: IR) -> bool:
    return list(a.params) == list(b.params) and all(
        same(a.params[p], b.params[p]) and same(a.meta[p], b.meta[p]) for p in a.params)


# ------------------------------------------------------------------------- hypothesis laws

ROLES = ("linear", "norm", "embedding", "lm_head")
WHERES = (None, True, False, "role:linear", "role:norm", r"layers/0/.*", select.Not("role:lm_head"),
          ("role:norm", "role:embedding"))


@st.composite
def irs(draw):
    n = draw(st.integers(0, 6))
    spec = {f"layers/{i}/w{i % 3}": (draw(st.sampled_from(ROLES)),
                                     tuple(draw(st.lists(st.integers(1, 3), max_size=2))))
            for i in range(n)}
    return make_ir(spec, draw(st.integers(0, 2**16)))


def _leaf_passes():
    return st.one_of(
        st.builds(Scale, factor=st.sampled_from([-1.0, 0.5, 3.0]), where=st.sampled_from(WHERES)),
        st.builds(Shift, offset=st.sampled_from([-2.0, 1.0]), where=st.sampled_from(WHERES)))


passes = st.recursive(
    _leaf_passes(),
    lambda inner: st.one_of(st.builds(lambda ps: chain(*ps), st.lists(inner, max_size=3)),
                            st.builds(masked, inner, st.sampled_from(WHERES))),
    max_leaves=4)

LAWS = settings(derandomize=True, max_examples=60, deadline=None)


@LAWS
@given(irs(), passes, passes)
def test_chain_is_composition(ir, a, b):
    ctx = Context()
    assert ir_same(chain(a, b)(ir, ctx), b(a(ir, ctx), ctx))


@LAWS
@given(irs())
def test_empty_chain_is_identity(ir):
    out = chain()(ir)
    assert list(out.params) == list(ir.params)
    assert all(out.params[p] is ir.params[p] and out.meta[p] is ir.meta[p] for p in ir.params)


@LAWS
@given(irs(), passes, passes, passes)
def test_chain_is_associative(ir, a, b, c):
    assert ir_same(chain(chain(a, b), c)(ir), chain(a, chain(b, c))(ir))


@LAWS
@given(irs(), passes, st.sampled_from(WHERES))
def test_masked_laws(ir, p, where):
    assert ir_same(masked(p, True)(ir), p(ir))
    out = masked(p, False)(ir)
    assert all(out.params[q] is ir.params[q] and out.meta[q] is ir.meta[q] for q in ir.params)
    out = masked(p, where)(ir)
    chosen = set(select.select(ir, where))
    assert list(out.params) == list(ir.params)
    for q in ir.params:
        if q not in chosen:
            assert out.params[q] is ir.params[q] and out.meta[q] is ir.meta[q], q


@LAWS
@given(irs(), passes)
def test_run_verifies_and_never_mutates_input(ir, p):
    before = {q: v.copy() for q, v in ir.params.items()}
    out, report = run(p, ir, progress=False, strict=False)  # random filters may select nothing
    assert ir_same(out, p(ir))
    assert all(same(ir.params[q], before[q]) for q in ir.params)
    assert all(r["changed"] <= len(ir.params) for r in report)


# ---------------------------------------------------------------------------- plain tests


def test_a_written_filter_that_selects_nothing_is_an_error_before_any_work():
    ir = make_ir(TOY)
    calls = []
    spy = as_pass(lambda ir, ctx: calls.append(1) or ir, name="spy")
    with pytest.raises(PassError, match=r"pass 'scale': where 'layers/9/.*' matches none of the 5 tensors; "
                                        r"nearest paths: layers/1/mlp/kernel, "):
        run(chain(spy, Scale(where=r"layers/9/.*")), ir, progress=False)
    with pytest.raises(PassError, match=r"where 'tower:vision' matches none .* the towers present: text"):
        run(chain(spy, masked(Shift(), "tower:vision")), ir, progress=False)
    assert calls == []
    run(masked(Shift(), "tower:vision"), ir, progress=False, strict=False)  # opted out
    run(Scale(), make_ir({"layers/0/norm/scale": ("norm", (3,))}), progress=False)  # a default filter may


def test_plain_functions_take_part_in_the_protocol():
    fn = as_pass(lambda path, x, meta: (x, meta), where="role:norm")
    c = chain(lambda ir, ctx: ir, fn)
    assert [n for n, _ in c.steps] == ["<lambda>", "<lambda>"] and c.needs == Needs()
    assert masked(lambda ir, ctx: ir, True).needs == Needs()
    with pytest.raises(TypeError, match="not a pass"):
        chain(3)


def test_unselected_leaves_are_identical_objects():
    ir = make_ir(TOY)
    out = Scale(factor=3.0)(ir)
    for p in TOY:
        if TOY[p][0] == "linear":
            np.testing.assert_array_equal(out.params[p], 3 * ir.params[p])
            assert out.meta[p].info == {"n": 1}
        else:
            assert out.params[p] is ir.params[p] and out.meta[p] is ir.meta[p]


def test_named_chain_names_and_report(capsys):
    ir = make_ir(TOY)
    pipe = named_chain(("double", Scale()), ("inner", chain(Shift(where="role:norm"), Scale(where=False))))
    out, report = run(pipe, ir)
    assert [r["name"] for r in report] == ["double", "inner/shift", "inner/scale"]
    assert [r["changed"] for r in report] == [2, 1, 0]
    assert [r["selected"] for r in report] == [2, 1, 0]
    assert all(r["seconds"] >= 0 for r in report)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "inner/shift" in lines[1] and "1 changed" in lines[1]
    with pytest.raises(ValueError, match="unique"):
        named_chain(("a", Scale()), ("a", Shift()))


def test_pass_names_and_bad_where():
    assert Scale.name == "scale" and Shift().name == "shift"
    assert as_pass(lambda path, x, meta: (x, meta), name="noop").name == "noop"
    with pytest.raises(ValueError, match=r"pass 'scale'.*role:linaer"):
        Scale(where="role:linaer")
    with pytest.raises(ValueError, match="unknown role"):
        masked(Scale(), "role:nope")


def test_as_pass_leaf_and_whole_ir_functions():
    ir = make_ir(TOY)
    neg = as_pass(lambda path, x, meta: (-x, meta), where="role:norm")
    out = neg(ir)
    assert same(out.params["layers/0/norm/scale"], -ir.params["layers/0/norm/scale"])
    assert out.params["embed/embedding"] is ir.params["embed/embedding"]

    seen = []

    def drop_all(sub, ctx):  # a whole-IR function sees only the sub-IR that `where` selects
        seen.append(list(sub.params))
        return IR(sub.family, sub.config, {}, {})

    out, _ = run(as_pass(drop_all, r"layers/.*", may_change={"paths"}), ir, progress=False)
    assert seen[-1] == ["layers/0/mlp/kernel", "layers/0/norm/scale", "layers/1/mlp/kernel"]
    assert list(out.params) == ["embed/embedding", "lm_head/kernel"]
    with pytest.raises(PassError, match=r"pass 'drop_all' added/removed paths"):
        run(as_pass(drop_all, r"layers/.*"), ir, progress=False)
    with pytest.raises(ValueError, match="expected"):
        as_pass(lambda x: x)


# ------------------------------------------------------------------------------- verifier


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reshape(Pass):
    """Broken: changes the leaf shape but not the meta."""

    def rewrite(self, path, leaf, meta, ctx):
        return leaf.reshape(-1), meta


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sneaky(Pass):
    """Broken: a whole-IR pass that selects linear leaves but also rescales the norms."""

    default_where = "role:linear"

    def __call__(self, ir, ctx=None):
        return ir.replace(params={p: v * 2 for p, v in ir.params.items()})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Copying(Pass):
    """Fine: returns new but bit-identical arrays for unselected leaves."""

    default_where = "role:linear"

    def __call__(self, ir, ctx=None):
        return ir.replace(params={p: v.copy() for p, v in ir.params.items()})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Retag(Pass):
    """Changes ``meta.role``; legal only when it is declared."""

    def rewrite(self, path, leaf, meta, ctx):
        return leaf, meta.replace(role="other")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeclaredRetag(Retag):
    may_change = frozenset({"role"})


def test_verifier_catches_shape_change():
    with pytest.raises(PassError, match=r"pass 'reshape'.*layers/0/mlp/kernel: leaf shape \(9,\)"):
        run(chain(Scale(), Reshape(where=r"layers/0/mlp/kernel")), make_ir(TOY), progress=False)


def test_verifier_catches_modified_unselected_leaf():
    with pytest.raises(PassError, match=r"pass 'sneaky' modified the leaf of unselected path embed/embedding"):
        run(Sneaky(), make_ir(TOY), progress=False)
    out, report = run(Copying(), make_ir(TOY), progress=False)  # new objects, same bits: fine
    assert report[0]["changed"] == 0


def test_verifier_checks_undeclared_meta_changes():
    ir = make_ir(TOY)
    with pytest.raises(PassError, match=r"pass 'retag': embed/embedding: meta.role changed 'embedding' -> 'other'"):
        run(Retag(), ir, progress=False)
    out, _ = run(masked(DeclaredRetag(), "role:norm"), ir, progress=False)
    assert out.meta["layers/0/norm/scale"].role == "other"
    run(Retag(), ir, verify=False, progress=False)  # the check is optional


def test_dump_files(tmp_path):
    ir = make_ir(TOY)
    lazy = LazyTensor(shape=(3, 6), dtype="float32", source="mem:lm_head",
                      reader=lambda: np.zeros((3, 6), np.float32))
    ir = ir.replace(params={"lm_head/kernel": lazy})
    pipe = named_chain(("scale x2", Scale()), ("norms", Shift(where="role:norm")))
    run(pipe, ir, dump_dir=tmp_path / "dumps", progress=False)
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["00-input.json", "01-scale_x2.json", "02-norms.json"]
    doc = json.loads((tmp_path / "dumps" / "01-scale_x2.json").read_text())
    assert list(doc) == list(TOY)
    assert doc["layers/0/mlp/kernel"] == {"shape": [3, 3], "dtype": "float32", "role": "linear",
                                          "tower": "text", "leaf": "ndarray", "info": {"n": 1}}
    assert doc["lm_head/kernel"]["leaf"] == "LazyTensor" and doc["lm_head/kernel"]["info"] == {}


def test_dump_never_writes_arrays(tmp_path):
    ir = make_ir(TOY)
    tag = as_pass(lambda path, x, meta: (x, meta.replace(info={"codebook": np.arange(4.0), "bits": np.int8(3)})),
                  where="role:linear")
    run(tag, ir, dump_dir=tmp_path, progress=False)
    info = json.loads((tmp_path / "01-_lambda_.json").read_text())["layers/1/mlp/kernel"]["info"]
    assert info == {"codebook": "<ndarray float64 (4,)>", "bits": 3}


def test_context_is_read_only_and_seeds_are_deterministic():
    ctx = Context(calibration={"a": 1}, rng_seed=7)
    with pytest.raises(TypeError):
        ctx.calibration["b"] = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.rng_seed = 1
    assert ctx.seed_for("x") == Context(rng_seed=7).seed_for("x") != ctx.seed_for("y")
    assert ctx.seed_for("x") != ctx.replace(rng_seed=8).seed_for("x")


def test_hydra_instantiate_calls_the_dataclass():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    p = instantiate({"_target_": f"{__name__}.Scale", "factor": 3.0, "where": ["role:linear", "role:norm"]})
    assert p == Scale(factor=3.0, where=("role:linear", "role:norm"))
    assert p.selected(make_ir(TOY)) == ["layers/0/mlp/kernel", "layers/0/norm/scale", "layers/1/mlp/kernel"]
    cfg = OmegaConf.structured(Scale)  # the dataclass doubles as a structured config
    assert cfg.factor == 2.0 and cfg.where is None
    pipe = instantiate({"double": {"_target_": f"{__name__}.Scale"}, "shift": {"_target_": f"{__name__}.Shift"}},
                       _convert_="all")
    assert named_chain(*pipe.items()).steps == (("double", Scale()), ("shift", Shift()))


def test_module_doctest():
    result = doctest.testmod(cqjax.pipeline)
    assert result.attempted > 0 and result.failed == 0
    result = doctest.testmod(select)
    assert result.attempted > 0 and result.failed == 0
