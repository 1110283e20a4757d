"""Calibrated conversion block by block (cqjax.stream_calibrated) against the in-memory recipe."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import pipeline as pl
from cqjax import recipes, stream_calibrated
from cqjax.passes.tune import Tune
from cqjax.pipeline import Context, run
from cqjax.calib.stats import collect
from cqjax.io import artifact, hf
from cqjax.io.artifact_writer import ArtifactWriter, partial_dir
from cqjax.ir import materialize
from cqjax.runtime import dequantized_model
from test_import_errors import write
from test_quant_passes import tensors
from test_recipes import CFG as ONE_BLOCK

CFG = {**ONE_BLOCK, "num_hidden_layers": 2}
EXTRA = {"recipe": {"method": "cq-ef", "bits": 3}}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    weights = tensors(CFG, seed=5, scale=0.05)
    weights |= {k.replace(".0.", ".1."): v for k, v in tensors(CFG, seed=6, scale=0.05).items() if ".0." in k}
    return write(tmp_path_factory.mktemp("calibrated") / "ckpt", config=CFG, weights=weights, sharded=True)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).integers(0, CFG["vocab_size"], size=(5, 12)).astype(np.int32)


def converted(ckpt, rows, out, pipeline=None, **kw):
    kw = {"ctx": Context(rng_seed=1), "extra": EXTRA, "key": "k", "progress": False, **kw}
    return stream_calibrated.convert(pipeline or recipes.recipe("cq-ef", bits=3), hf.import_checkpoint(ckpt), out,
                                     tokens=rows, **kw)


def tuned(**kw):
    """cq-ef 3-bit and a tune step bounded by steps (not time), so that runs are reproducible."""
    tune = Tune(rows=4, steps=15, batch=2, e2e_steps=8, max_seconds=1e5, **kw)
    return pl.named_chain(*pl.steps(recipes.recipe("cq-ef", bits=3)), ("tune", tune))


def files(directory):
    return {name: (directory / name).read_bytes() for name in (artifact.WEIGHTS, artifact.MANIFEST)}


def test_float_carry_is_the_in_memory_recipe(ckpt, rows, tmp_path):
    """With the float stream carried, each block sees the Hessians the whole float model gives."""
    ir = hf.import_checkpoint(ckpt)
    calib = collect(hf.to_model(ir), ir, rows, progress=False)
    want, _ = run(recipes.recipe("cq-ef", bits=3), ir, Context(rng_seed=1, calibration=calib))
    converted(ckpt, rows, tmp_path / "a", carry="float", batch=2)  # a ragged last batch
    got = artifact.load(tmp_path / "a")
    assert set(got.params) == set(want.params)
    for path, leaf in want.params.items():
        assert got.meta[path].info.get("error_feedback") == want.meta[path].info.get("error_feedback"), path
        if hasattr(leaf, "codes"):
            same = np.mean(np.asarray(got.params[path].codes) == np.asarray(leaf.codes))
            assert same > 0.99, (path, same)
            a, b = (np.asarray(x.norms, np.float32) for x in (got.params[path], leaf))
            assert np.mean(np.isclose(a, b, rtol=2e-3)) > 0.99, path  # a flipped code moves its row's later norms
        else:
            np.testing.assert_array_equal(materialize(got.params[path]), materialize(leaf))
    assert got.meta["layers/0/self_attn/q_proj/kernel"].info["error_feedback"] == "rotated"
    assert got.meta["embed_tokens/embedding"].info["error_feedback"] == ("rotated" if "lm_head/kernel" not in ir.meta
                                                                        else "none")


def test_quantized_carry_follows_the_quantized_prefix(ckpt, rows, tmp_path):
    """The default carry differs from the float one past block 0, and the model it makes is at
    least as close to the float model on the calibration rows."""
    ir = hf.import_checkpoint(ckpt)
    converted(ckpt, rows, tmp_path / "q")
    converted(ckpt, rows, tmp_path / "f", carry="float")
    q, f = artifact.load(tmp_path / "q"), artifact.load(tmp_path / "f")
    first = "layers/0/self_attn/q_proj/kernel"
    np.testing.assert_array_equal(np.asarray(q.params[first].codes), np.asarray(f.params[first].codes))
    last = f"layers/{CFG['num_hidden_layers'] - 1}/mlp/down_proj/kernel"
    assert not np.array_equal(np.asarray(q.params[last].codes), np.asarray(f.params[last].codes))

    ref = np.asarray(hf.to_model(ir)(rows))
    err = {k: float(np.mean((np.asarray(dequantized_model(m)(rows)) - ref) ** 2)) for k, m in (("q", q), ("f", f))}
    assert err["q"] <= 1.05 * err["f"], err


def test_killed_conversion_resumes_to_the_same_bytes(ckpt, rows, tmp_path, monkeypatch):
    converted(ckpt, rows, tmp_path / "once")
    add, calls = ArtifactWriter.add, []

    def dying_add(self, *args, **kw):
        if len(calls) == 13:  # inside the second block
            raise Killed
        calls.append(args[0]["path"])
        add(self, *args, **kw)

    monkeypatch.setattr(ArtifactWriter, "add", dying_add)
    with pytest.raises(Killed):
        converted(ckpt, rows, tmp_path / "resumed")
    monkeypatch.setattr(ArtifactWriter, "add", add)
    assert (partial_dir(tmp_path / "resumed") / "carry.npz").is_file()
    said = []
    converted(ckpt, rows, tmp_path / "resumed", resume=True, ctx=Context(rng_seed=1, log=said.append))
    assert len(said) == 1 and said[0].startswith("resuming: 13 of ") and said[0].endswith("from block 1")
    assert files(tmp_path / "resumed") == files(tmp_path / "once")
    assert not partial_dir(tmp_path / "resumed").exists()


def killed_in_block_1(monkeypatch, convert) -> None:
    """Runs ``convert()`` with the artifact writer dying at block 1's first tensor."""
    add = ArtifactWriter.add

    def dying_add(self, entry, *args, **kw):
        if entry["path"].startswith("layers/1/"):
            raise Killed
        add(self, entry, *args, **kw)

    monkeypatch.setattr(ArtifactWriter, "add", dying_add)
    with pytest.raises(Killed):
        convert()
    monkeypatch.setattr(ArtifactWriter, "add", add)


def test_resume_with_other_rows_starts_over(ckpt, rows, tmp_path, monkeypatch):
    killed_in_block_1(monkeypatch, lambda: converted(ckpt, rows, tmp_path / "a"))
    said = []
    other = rows[::-1].copy()
    converted(ckpt, other, tmp_path / "a", resume=True, ctx=Context(rng_seed=1, log=said.append))
    assert said == []
    converted(ckpt, other, tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_recipes_that_cannot_go_block_by_block(ckpt, rows, tmp_path):
    assert stream_calibrated.plan(recipes.recipe("cq-ef", bits=3)).tune is None
    assert stream_calibrated.plan(recipes.recipe("gptq", bits=3)) is not None
    assert isinstance(stream_calibrated.plan(recipes.recipe("cq-tune", bits=3)).tune, Tune)
    assert stream_calibrated.plan(pl.named_chain(("whole", pl.as_pass(lambda ir, ctx: ir)))) is None
    assert stream_calibrated.plan(pl.named_chain(("tune", Tune()), *pl.steps(recipes.recipe("cq", bits=3)))) is None
    with pytest.raises(ValueError, match="carry='nope'"):
        converted(ckpt, rows, tmp_path / "x", carry="nope")
    with pytest.raises(ValueError, match="non-empty"):
        converted(ckpt, rows[:0], tmp_path / "x")


@pytest.mark.parametrize("recipe", ["cq-ef", "gptq"])
def test_row_blocks_pool_their_error(recipe, ckpt, rows, tmp_path, monkeypatch):
    """A table converted in row blocks joins into one tensor whose error feedback error is the
    whole tensor's (pooled over the blocks), and whose codes are the unsplit run's."""
    chain = recipes.recipe(recipe, bits=3)
    converted(ckpt, rows, tmp_path / "whole", pipeline=chain)
    calls = []
    block = stream_calibrated._block
    monkeypatch.setattr(stream_calibrated, "_block", lambda *a: calls.append(a[1]) or block(*a))
    monkeypatch.setattr(stream_calibrated, "_block_params", lambda meta: 1000)  # e.g. [37, 160]: 7 row blocks
    converted(ckpt, rows, tmp_path / "split", pipeline=chain)
    assert calls.count("lm_head/kernel") == 7 and calls.count("layers/1/mlp/down_proj/kernel") == 32
    whole, split = artifact.load(tmp_path / "whole"), artifact.load(tmp_path / "split")
    for path in ("lm_head/kernel", "layers/1/mlp/down_proj/kernel"):
        a, b = whole.meta[path].info, split.meta[path].info
        assert b["ef_rel_error"] == pytest.approx(a["ef_rel_error"], rel=1e-6) and 0 < b["ef_rel_error"] < 1
        assert b["ef_base"] == pytest.approx(a["ef_base"], rel=1e-9)
        assert np.mean(np.asarray(whole.params[path].codes) == np.asarray(split.params[path].codes)) > 0.99


@pytest.mark.slow
def test_tuning_block_by_block(ckpt, rows, tmp_path):
    """cq-tune converts block by block: each block is tuned before it is written and before the
    next block's Hessians are taken, then the whole quantized model end to end; the result is
    closer to the float model than cq-ef's on the calibration rows and on other rows."""
    from test_tune import kl

    ir = hf.import_checkpoint(ckpt)
    said = []
    passes, table = converted(ckpt, rows, tmp_path / "t", pipeline=tuned(), ctx=Context(rng_seed=1, log=said.append))
    converted(ckpt, rows, tmp_path / "ef")
    t, ef = artifact.load(tmp_path / "t"), artifact.load(tmp_path / "ef")
    first = "layers/0/self_attn/q_proj/kernel"  # the first block sees the same input, so the same codes
    np.testing.assert_array_equal(np.asarray(t.params[first].codes), np.asarray(ef.params[first].codes))
    assert not np.array_equal(np.asarray(t.params[first].norms), np.asarray(ef.params[first].norms))
    record = t.meta["layers/1/mlp/down_proj/kernel"].info["tune"]
    assert record["block_loss"][1] < record["block_loss"][0] and record["kl"][1] < record["kl"][0]
    assert "block_loss" not in t.meta["norm/scale"].info["tune"] and "kl" in t.meta["norm/scale"].info["tune"]
    assert [p["name"] for p in passes] == ["rotate", "codebook", "pack", "tune"] and passes[-1]["changed"] > 0
    assert "tune block 2/2" in " ".join(said) and any(s.startswith("tune end to end") for s in said)
    assert "tune" not in artifact.read_manifest(tmp_path / "t")["extra"]  # not the unfinished marker
    other = np.random.default_rng(9).integers(0, CFG["vocab_size"], size=(4, 12)).astype(np.int32)
    for r in (rows, other):
        assert kl(ir, t, r) < kl(ir, ef, r)
    row = {r["path"]: r for r in table}[first]
    assert 0 < row["rel_error"] < 1


@pytest.mark.slow
def test_tuned_conversion_resumes_to_the_same_bytes(ckpt, rows, tmp_path, monkeypatch):
    converted(ckpt, rows, tmp_path / "once", pipeline=tuned())
    killed_in_block_1(monkeypatch, lambda: converted(ckpt, rows, tmp_path / "resumed", pipeline=tuned()))
    said = []
    converted(ckpt, rows, tmp_path / "resumed", pipeline=tuned(), resume=True,
              ctx=Context(rng_seed=1, log=said.append))
    assert said[0].endswith("from block 1")
    assert files(tmp_path / "resumed") == files(tmp_path / "once")


def test_activation_scales_block_by_block(ckpt, rows, tmp_path):
    """The AWQ step (wrapping cq-ef) converts block by block, leaf by leaf: with the float stream
    carried it picks the in-memory pass's exponents and codes."""
    from cqjax.passes.awq import ActivationScale

    ir = hf.import_checkpoint(ckpt)
    awq = pl.named_chain(("awq", ActivationScale(grid=3, recipe=recipes.recipe("cq-ef", bits=3))))
    assert [s.name for s in stream_calibrated.plan(awq).steps] == ["awq"]
    want, _ = run(awq, ir, Context(rng_seed=1, calibration=collect(hf.to_model(ir), ir, rows, progress=False)),
                  progress=False)
    converted(ckpt, rows, tmp_path / "a", pipeline=awq, carry="float")
    got = artifact.load(tmp_path / "a")
    assert set(got.params) == set(want.params)
    alphas = {p: m.info.get("awq_alpha") for p, m in want.meta.items()}
    assert {p: m.info.get("awq_alpha") for p, m in got.meta.items()} == alphas
    assert any(a for a in alphas.values()) and alphas["embed_tokens/embedding"] is None
    for path, leaf in want.params.items():
        if hasattr(leaf, "codes"):
            assert np.mean(np.asarray(got.params[path].codes) == np.asarray(leaf.codes)) > 0.99, path
