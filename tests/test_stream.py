"""Streamed conversion (cqjax.stream): the same bytes as the in-memory pipeline and save, row
blocks the same bytes as whole tensors, and a killed conversion resumed to the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cqjax import pipeline, recipes, stream
from cqjax.io import artifact, hf
from cqjax.ir import materialize
from cqjax.io.artifact_writer import ArtifactWriter, partial_dir
from test_import_errors import write
from test_recipes import CFG
from test_quant_passes import tensors

EXTRA = {"recipe": {"method": "cq", "bits": 3}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    weights = {k: v.astype(np.float32) for k, v in tensors(CFG, seed=3, scale=0.05).items()}
    return write(tmp_path_factory.mktemp("stream") / "ckpt", config=CFG, weights=weights, sharded=True)


def files(directory):
    return {name: (directory / name).read_bytes() for name in (artifact.WEIGHTS, artifact.MANIFEST)}


def converted(ckpt, out, **kw):
    kw = {"ctx": pipeline.Context(rng_seed=1), "extra": EXTRA, "key": "k", "progress": False, **kw}
    return stream.convert(recipes.recipe("cq", bits=3), hf.import_checkpoint(ckpt), out, **kw)


def test_streamed_artifact_is_the_saved_pipeline_run(ckpt, tmp_path):
    passes, rows = converted(ckpt, tmp_path / "streamed")
    ir = hf.import_checkpoint(ckpt)
    qir, ran = pipeline.run(recipes.recipe("cq", bits=3), ir, pipeline.Context(rng_seed=1), progress=False)
    artifact.save(qir, tmp_path / "saved", extra={**EXTRA, "passes": ran})
    assert files(tmp_path / "streamed") == files(tmp_path / "saved")
    assert [{k: p[k] for k in ("name", "changed", "selected")} for p in passes] == \
           [{k: p[k] for k in ("name", "changed", "selected")} for p in ran]
    assert not partial_dir(tmp_path / "streamed").exists()
    # one row per tensor, with the error of the quantized ones against the float checkpoint
    from cqjax import quant_stats
    want = {r["path"]: r for r in quant_stats.tensors(qir, ir, progress=False)}
    assert [r["path"] for r in rows] == list(ir.meta)
    for r in rows:
        assert r.keys() == want[r["path"]].keys()
        if r.get("rel_error") is not None:
            assert r["rel_error"] == pytest.approx(want[r["path"]]["rel_error"], rel=1e-5)


def test_row_blocks_give_the_whole_tensor(ckpt, tmp_path):
    """Every step is row by row (the C++ rotation too), so splitting a tensor changes no byte."""
    converted(ckpt, tmp_path / "whole")
    converted(ckpt, tmp_path / "blocks", max_params=3200, workers=3)  # every quantized tensor split
    converted(ckpt, tmp_path / "serial", max_params=3200, workers=1)
    assert files(tmp_path / "blocks") == files(tmp_path / "serial") == files(tmp_path / "whole")
    whole = artifact.load(tmp_path / "whole")
    assert sum(hasattr(leaf, "codes") and np.prod(leaf.logical_shape) > 3200 for leaf in whole.params.values()) == 9


def test_row_blocks_read_only_their_rows(ckpt):
    ir = hf.import_checkpoint(ckpt)
    steps = stream.leafwise_steps(recipes.recipe("cq", bits=3))
    path = "layers/0/mlp/down_proj/kernel"  # [in 200, out 160], stored [160, 200]
    meta = ir.meta[path]
    blocks = stream.row_blocks(ir.params[path], meta, steps, path, 200 * 50)
    assert [m.shape for _, m in blocks] == [(200, 50)] * 3 + [(200, 10)]
    got = np.concatenate([np.asarray(materialize(b)) for b, _ in blocks], axis=1)
    np.testing.assert_array_equal(got, np.asarray(materialize(ir.params[path])))
    assert stream.row_blocks(ir.params[path], meta, steps, path, 200 * 160) is None


def test_calibrated_recipes_do_not_stream(ckpt, tmp_path):
    assert stream.leafwise_steps(recipes.recipe("cq", bits=3)) is not None
    for name in ("cq-ef", "gptq", "cq-tune"):
        assert stream.leafwise_steps(recipes.recipe(name, bits=3)) is None, name
    with pytest.raises(ValueError, match="leaf by leaf"):
        stream.convert(recipes.recipe("cq-ef", bits=3), hf.import_checkpoint(ckpt), tmp_path / "a")


class Killed(Exception):
    pass


def test_killed_conversion_resumes_to_the_same_bytes(ckpt, tmp_path, monkeypatch):
    converted(ckpt, tmp_path / "once")
    add, calls = ArtifactWriter.add, []

    def dying_add(self, *args, **kw):
        if len(calls) == 5:
            raise Killed
        calls.append(args[0]["path"])
        add(self, *args, **kw)

    monkeypatch.setattr(ArtifactWriter, "add", dying_add)
    with pytest.raises(Killed):
        converted(ckpt, tmp_path / "resumed")
    monkeypatch.setattr(ArtifactWriter, "add", add)
    parts = partial_dir(tmp_path / "resumed")
    assert len(list(parts.glob("*.json"))) == 1 + 5  # run.json and five finished tensors
    (parts / "000005.bin").write_bytes(b"half a tensor")  # an unfinished part: redone
    (parts / "000007.json").write_text("{}")  # what a later attempt left: dropped

    said = []
    converted(ckpt, tmp_path / "resumed", resume=True, ctx=pipeline.Context(rng_seed=1, log=said.append))
    assert said == [f"resuming: 5 of {len(hf.import_checkpoint(ckpt).meta)} tensors already converted"]
    assert files(tmp_path / "resumed") == files(tmp_path / "once")
    assert not parts.exists()


def test_resume_of_another_run_starts_over(ckpt, tmp_path, monkeypatch):
    add = ArtifactWriter.add

    def dying_add(self, entry, *args, **kw):
        if entry["path"].endswith("mlp/up_proj/kernel"):
            raise Killed
        add(self, entry, *args, **kw)

    monkeypatch.setattr(ArtifactWriter, "add", dying_add)
    with pytest.raises(Killed):
        converted(ckpt, tmp_path / "a")
    monkeypatch.setattr(ArtifactWriter, "add", add)
    said = []
    converted(ckpt, tmp_path / "a", resume=True, ctx=pipeline.Context(rng_seed=2, log=said.append))  # another seed
    assert said == []
    converted(ckpt, tmp_path / "b", ctx=pipeline.Context(rng_seed=2))
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_a_directory_that_is_not_an_artifact_is_never_replaced(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(artifact.ArtifactError, match="not a cqjax artifact"):
        converted(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_manifest_records_the_passes(ckpt, tmp_path):
    converted(ckpt, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / artifact.MANIFEST).read_text())
    assert [p["name"] for p in manifest["extra"]["passes"]] == ["rotate", "codebook", "pack"]
    assert manifest["extra"]["recipe"] == EXTRA["recipe"]


def test_bf16_checkpoint_streams_and_keeps_float_tensors_bf16(tmp_path):
    import ml_dtypes

    from cqjax.io.artifact_writer import raw_bytes, safetensors_header

    bf16 = np.dtype(ml_dtypes.bfloat16)
    weights = {k: v.astype(bf16) for k, v in tensors(CFG, seed=5, scale=0.05).items()}
    src = write(tmp_path / "ckpt", config=CFG, weights={})  # config.json; the weights are written below
    (src / "model.safetensors").unlink()
    head, order = safetensors_header([(k, bf16, v.shape, v.nbytes) for k, v in weights.items()], {"format": "pt"})
    (src / "model.safetensors").write_bytes(head + b"".join(raw_bytes(weights[name]).tobytes() for name, *_ in order))
    converted(src, tmp_path / "a")
    qir = artifact.load(tmp_path / "a")  # verifies every stored array's sha256
    assert qir.params["norm/scale"].dtype == bf16
    np.testing.assert_array_equal(materialize(qir.params["norm/scale"]), weights["model.norm.weight"])
    ir = hf.import_checkpoint(src)
    run, ran = pipeline.run(recipes.recipe("cq", bits=3), ir, pipeline.Context(rng_seed=1), progress=False)
    artifact.save(run, tmp_path / "b", extra={**EXTRA, "passes": ran})
    assert files(tmp_path / "a") == files(tmp_path / "b")


@pytest.mark.parametrize("path, rotated", [("layers/0/mlp/gate_proj/kernel", True),  # K = 160: no padding
                                           ("layers/0/mlp/down_proj/kernel", False)])  # K = 200 -> 208
def test_error_in_the_rotated_basis_is_the_error(ckpt, path, rotated):
    from cqjax import quant_stats

    ir = hf.import_checkpoint(ckpt)
    steps = stream.leafwise_steps(recipes.recipe("cq", bits=3))
    w = np.asarray(materialize(ir.params[path]), np.float32)
    seen = []
    q, *_ = stream._run_steps(steps, path, w, ir.meta[path], pipeline.Context(), ir.meta[path].shape, seen)
    fast = stream._rotated_error_sums(q, seen)
    assert (fast is not None) == rotated
    if rotated:
        want = quant_stats.error_sums(w, quant_stats.dequantizer()(q))
        np.testing.assert_allclose(fast, want, rtol=1e-5)
