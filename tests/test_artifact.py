"""The artifact round trip is bit-identical; a broken artifact fails naming the file and tensor;
stored bits/weight is counted by hand."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from cqjax import pipeline, quant_stats, select
from cqjax.errors import CheckpointError
from cqjax.io import artifact, hf
from cqjax.ir import IR, TensorMeta, materialize
from cqjax.kernels.qarrays import is_quantized
from cqjax.recipes import recipe
from test_import_errors import write
from test_quant_passes import ODD, tensors

TOKENS = np.array([[1, 5, 9, 10, 2, 7], [3, 3, 8, 6, 0, 1]], np.int32)


@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    """An untied model with odd sizes (K = 40, 72) and a tied one (K = 8: one padded block)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {"odd": hf.import_checkpoint(write(root / "odd", config=ODD, weights=tensors(ODD))),
            "tied": hf.import_checkpoint(write(root / "tied"))}


PIPES = {"cq3": lambda: recipe("cq", bits=3, block=32),
         "cq2-fitted-ls": lambda: recipe("cq", bits=2, embed_bits=3, block=32, codebook="fitted",
                                         steps={"pack": {"gain": "ls"}}),
         "rtn4": lambda: recipe("rtn", bits=4, embed_bits=3, block=32), "cq-partial": lambda: pipeline.masked(
             recipe("cq", bits=1, embed_bits=2, block=16), select.Not("role:lm_head"))}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model) -> np.ndarray:
    """One compile serves two models of the same structure (the saved and the loaded one)."""
    return np.asarray(_forward(*nnx.split(model), TOKENS))


def bits_of(a) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(a))
    return a.reshape(-1).view(np.uint8)


@pytest.mark.parametrize("model", ["odd", "tied"])
@pytest.mark.parametrize("recipe", sorted(PIPES))
def test_round_trip_is_bit_identical(irs, model, recipe, tmp_path):
    ir = irs[model]
    qir, _ = pipeline.run(PIPES[recipe](), ir, progress=False)
    artifact.save(qir, tmp_path / "a")
    back = artifact.load(tmp_path / "a")
    assert back.family == qir.family and back.config == qir.config
    assert list(back.params) == list(qir.params)
    for path, leaf in qir.params.items():
        got = back.params[path]
        assert back.meta[path] == qir.meta[path], path
        if is_quantized(leaf):
            assert type(got) is type(leaf) and pipeline.same(got, leaf), path
        else:
            a, b = np.asarray(materialize(leaf)), np.asarray(materialize(got))
            assert a.dtype == b.dtype and np.array_equal(bits_of(a), bits_of(b)), path
    ours, theirs = logits(hf.to_model(qir)), logits(hf.to_model(back))
    assert np.array_equal(bits_of(ours), bits_of(theirs))
    manifest = json.loads((tmp_path / "a" / artifact.MANIFEST).read_text())
    kinds = {e["path"]: e["kind"] for e in manifest["tensors"]}
    assert kinds["layers/0/mlp/up_proj/kernel"] == ("rtn" if recipe.startswith("rtn") else "cq")
    assert kinds["layers/0/input_layernorm/scale"] == "float"


def test_save_replaces_an_artifact_but_not_other_directories(irs, tmp_path):
    qir, _ = pipeline.run(recipe("cq", bits=2, block=32), irs["odd"], progress=False)
    target = artifact.save(qir, tmp_path / "a")
    qir4, _ = pipeline.run(recipe("cq", bits=4, block=32), irs["odd"], progress=False)
    artifact.save(qir4, target)
    assert artifact.load(target).params["layers/0/mlp/up_proj/kernel"].bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or backup left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(artifact.ArtifactError, match="not a cqjax artifact"):
        artifact.save(qir, other)
    assert (other / "notes.txt").read_text() == "keep"


def test_unfinished_pipeline_is_refused(irs, tmp_path):
    half, _ = pipeline.run(recipe("cq", bits=3, block=32).steps[0][1], irs["odd"], progress=False)
    with pytest.raises(artifact.ArtifactError, match=r"embed_tokens/embedding: .*Rotated.*pack pass"):
        artifact.save(half, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def saved(irs, tmp_path):
    qir, _ = pipeline.run(recipe("cq", bits=3, block=32), irs["odd"], progress=False)
    return artifact.save(qir, tmp_path / "a")


def edit_manifest(directory, fn):
    path = directory / artifact.MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def entry(m, path):
    return next(e for e in m["tensors"] if e["path"] == path)


def test_unknown_version_and_layout_are_refused(saved):
    edit_manifest(saved, lambda m: m.update(version=3))
    with pytest.raises(artifact.ArtifactError, match=r"manifest.json: artifact version 3 .*re-run quantization"):
        artifact.load(saved)
    edit_manifest(saved, lambda m: m.update(version=1, format="gguf"))
    with pytest.raises(artifact.ArtifactError, match="manifest.json: format 'gguf'"):
        artifact.load(saved)
    edit_manifest(saved, lambda m: (m.update(format=artifact.FORMAT),
                                    entry(m, "layers/0/mlp/up_proj/kernel").update(layout_version=9)))
    with pytest.raises(artifact.ArtifactError, match=r"up_proj/kernel.*layout version 9.*re-run quantization"):
        artifact.load(saved)


def test_missing_and_misshapen_tensors_are_named(saved):
    from safetensors.numpy import load_file, save_file

    weights = load_file(saved / artifact.WEIGHTS)
    del weights["layers/0/mlp/up_proj/kernel::norms"]
    save_file(weights, saved / artifact.WEIGHTS)
    with pytest.raises(artifact.ArtifactError, match=r"weights.safetensors: tensor 'layers/0/mlp/up_proj/kernel::norms'"
                                                     r".*missing"):
        artifact.load(saved)
    weights["layers/0/mlp/up_proj/kernel::norms"] = np.zeros((3, 3), np.float16)
    save_file(weights, saved / artifact.WEIGHTS)
    with pytest.raises(artifact.ArtifactError, match=r"'layers/0/mlp/up_proj/kernel::norms'.*\[3, 3\]"):
        artifact.load(saved)
    weights["layers/0/mlp/up_proj/kernel::norms"] = np.zeros((72, 2), np.float32)
    save_file(weights, saved / artifact.WEIGHTS)
    with pytest.raises(artifact.ArtifactError, match=r"::norms'.*float32.*float16"):
        artifact.load(saved)
    edit_manifest(saved, lambda m: entry(m, "norm/scale").update(shape=[41]))
    weights["layers/0/mlp/up_proj/kernel::norms"] = np.zeros((72, 2), np.float16)
    save_file(weights, saved / artifact.WEIGHTS)
    with pytest.raises(artifact.ArtifactError, match=r"'norm/scale'.*stored shape \[40\] != manifest shape \[41\]"):
        artifact.load(saved, verify=False)  # (with verify, the zeroed norms fail their checksum first)


def test_truncated_weights_file_is_named(saved):
    path = saved / artifact.WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"weights.safetensors: truncated: tensor '.*'"):
        artifact.load(saved)


def test_extra_tensor_and_unknown_config_class_are_refused(saved):
    from safetensors.numpy import load_file, save_file

    weights = load_file(saved / artifact.WEIGHTS)
    save_file({**weights, "stray": np.zeros(2, np.float32)}, saved / artifact.WEIGHTS)
    with pytest.raises(artifact.ArtifactError, match="not listed in manifest.json.*stray"):
        artifact.load(saved)
    save_file(weights, saved / artifact.WEIGHTS)
    edit_manifest(saved, lambda m: m["config"].update(__dataclass__="os.system"))
    with pytest.raises(artifact.ArtifactError, match="unknown config class 'os.system'"):
        artifact.load(saved)


def test_tagged_json_round_trips_configs_and_info():
    value = {"a": (1, 2.5, float("inf")), "b": [None, True], 3: "int key", "__x": {"y": (("p", 1),)}}
    assert artifact.from_json(json.loads(json.dumps(artifact.to_json(value)))) == value
    with pytest.raises(artifact.ArtifactError, match="info.k: cannot store a value of type object"):
        artifact.to_json({"k": object()}, "info")


# ------------------------------------------------------------------------- storage


def toy_ir():
    rng = np.random.default_rng(0)
    return IR("toy", None, {"w/kernel": rng.standard_normal((40, 72)).astype(np.float32),
                            "n/weight": np.ones(72, np.float32)},
              {"w/kernel": TensorMeta(role="linear", shape=(40, 72), dtype="float32"),
               "n/weight": TensorMeta(role="norm", shape=(72,), dtype="float32")})


def test_storage_counted_by_hand():
    ir = toy_ir()
    qir, _ = pipeline.run(recipe("cq", bits=3, block=32), ir, progress=False)
    # rows 72, K 40 -> blocks (32, 16), Kpad 48: codes 72*48*3/8, fp16 norms 72*2, fp16 codebooks
    # 2*8, sign bits 2*48/8, block-local uint8 permutation 48.
    expect = 72 * 18 + 72 * 2 * 2 + 2 * 8 * 2 + 2 * 6 + 48
    assert expect == 1676
    rows = {r["path"]: r for r in quant_stats.tensors(qir, ir)}
    assert rows["w/kernel"]["bytes"] == expect and rows["w/kernel"]["bits"] == 3
    assert rows["n/weight"]["bytes"] == 2 * 72 and not rows["n/weight"]["eligible"]
    assert 0 < rows["w/kernel"]["rel_error"] < 0.1 and "rel_error" not in rows["n/weight"]
    s = quant_stats.storage(qir)
    assert s["bits_per_weight"]["quantized_tensors"] == pytest.approx(expect * 8 / 2880)
    assert s["bits_per_weight"]["model"] == pytest.approx((expect + 144) * 8 / 2952)
    assert s["bytes"] == {"float": 2 * 2952, "quantized": expect + 144, "eligible": expect}
    assert s["params"] == {"eligible": 2880, "quantized": 2880, "model": 2952}
    # A float copy of another tool's quantization is charged the bytes that tool stores.
    ext = {r["path"]: r for r in quant_stats.tensors(ir, external={"w/kernel": 999})}
    assert ext["w/kernel"]["kind"] == "external" and ext["w/kernel"]["bytes"] == 999
    assert ext["n/weight"]["kind"] == "float"
    assert quant_stats.storage(ir, list(ext.values()))["bytes"]["eligible"] == 999


def test_storage_counts_float_eligible_tensors_at_16_bits_and_matches_the_artifact(irs, tmp_path):
    ir = irs["odd"]
    qir, _ = pipeline.run(PIPES["cq-partial"](), ir, progress=False)
    rows = {r["path"]: r for r in quant_stats.tensors(qir)}
    head = rows["lm_head/kernel"]
    assert head["kind"] == "float" and head["eligible"] and head["bytes"] == 2 * 37 * 40
    artifact.save(qir, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / artifact.MANIFEST).read_text())
    for e in manifest["tensors"]:  # quantized tensors: the bytes the artifact really holds
        if e["kind"] != "float":
            assert e["bytes"] == rows[e["path"]]["bytes"], e["path"]
    s = quant_stats.storage(qir)
    assert s["bits_per_weight"]["quantized_tensors"] == pytest.approx(
        8 * sum(r["bytes"] for r in rows.values() if r["eligible"]) / ir.num_params(
            lambda p, m: rows[p]["eligible"]))
