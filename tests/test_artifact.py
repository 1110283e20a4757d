"""The artifact round trip is bit-identical; a broken artifact fails naming the file and tensor;
stored bits/weight is counted by hand."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from cqjax import errors, pipeline, quant_stats, select
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


def test_same_recipe_and_seed_give_byte_identical_files(irs, tmp_path):
    for name in ("a", "b"):
        qir, report = pipeline.run(PIPES["cq3"](), irs["odd"], progress=False)
        artifact.save(qir, tmp_path / name, extra={"passes": report, "recipe": {"calibration": {"seconds": 1.0 * ord(name),
                                                                                              "tokens": 8}}})
    for f in (artifact.MANIFEST, artifact.WEIGHTS):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    manifest = json.loads((tmp_path / "a" / artifact.MANIFEST).read_text())
    assert "seconds" not in json.dumps(manifest["extra"]) and manifest["version"] == 2


def test_checksums_catch_a_flipped_bit_and_can_be_skipped(irs, tmp_path):
    qir, _ = pipeline.run(PIPES["cq3"](), irs["odd"], progress=False)
    path = artifact.save(qir, tmp_path / "a")
    manifest = json.loads((path / artifact.MANIFEST).read_text())
    spec = next(e for e in manifest["tensors"] if e["kind"] == "cq")["arrays"]["codes"]
    from cqjax.io.safetensors_lazy import SafetensorsFile

    f = SafetensorsFile(path / artifact.WEIGHTS)
    _, _, begin, _ = f.entries[spec["name"]]
    data = bytearray((path / artifact.WEIGHTS).read_bytes())
    data[f._data_start + begin] ^= 1
    (path / artifact.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=rf"weights.safetensors: tensor '{spec['name']}': sha256 .* does not "
                                                     r"match the manifest"):
        artifact.load(path)
    artifact.load(path, verify=False)  # the codes are valid codes: only the checksum knows


@pytest.mark.parametrize("change, needle", [
    (lambda e: e["static"].update(blocks=[2 ** 31]), r"blocks \[2147483648\].*not a block plan|must be an integer"),
    (lambda e: e["static"].update(bits=5), r"bits=5 is not one of"),
    (lambda e: e["arrays"]["perm"].update(leaf_shape=[2 ** 31]), r"array 'perm' is int32 \[2147483648\]"),
    (lambda e: e["arrays"].pop("norms"), r"arrays .*expected"),
])
def test_the_validator_refuses_before_reading(irs, tmp_path, change, needle):
    qir, _ = pipeline.run(PIPES["cq3"](), irs["odd"], progress=False)
    path = artifact.save(qir, tmp_path / "a")
    edit_manifest(path, lambda m: change(entry(m, "layers/0/mlp/up_proj/kernel")))
    with pytest.raises(errors.FormatError, match=r"manifest.json: tensor 'layers/0/mlp/up_proj/kernel': .*" + needle):
        artifact.load(path)


def test_values_the_format_forbids_are_refused(irs, tmp_path):
    from safetensors.numpy import load_file, save_file

    qir, _ = pipeline.run(PIPES["cq3"](), irs["odd"], progress=False)
    path = artifact.save(qir, tmp_path / "a")
    weights = load_file(path / artifact.WEIGHTS)
    name = "layers/0/mlp/up_proj/kernel::perm"
    weights[name] = np.zeros_like(weights[name])  # every index 0: not a permutation
    save_file(weights, path / artifact.WEIGHTS)
    with pytest.raises(errors.FormatError, match="'perm' is not a permutation within block"):
        artifact.load(path, verify=False)
    name = "layers/0/mlp/up_proj/kernel::norms"
    artifact.save(qir, tmp_path / "b")
    wb = load_file(tmp_path / "b" / artifact.WEIGHTS)
    wb[name] = wb[name].copy()
    wb[name][0, 0] = np.nan
    save_file(wb, tmp_path / "b" / artifact.WEIGHTS)
    with pytest.raises(errors.FormatError, match="'norms' has non-finite values"):
        artifact.load(tmp_path / "b", verify=False)


def test_an_absurd_config_is_refused_without_allocating(irs, tmp_path):
    qir, _ = pipeline.run(PIPES["cq3"](), irs["odd"], progress=False)
    path = artifact.save(qir, tmp_path / "a")
    edit_manifest(path, lambda m: m["config"]["fields"].update(head_dim=2 ** 31))
    with pytest.raises(artifact.ArtifactError, match=r"manifest.json: config.head_dim=2147483648 is out of bounds"):
        artifact.load(path)
    edit_manifest(path, lambda m: m["config"]["fields"].update(head_dim=16))
    with pytest.raises(artifact.ArtifactError, match=r"tensor 'layers/0/self_attn/k_proj/kernel' has shape .* the config "
                                                     r"builds"):
        artifact.load(path)


KILLER = r"""
import sys
from cqjax import pipeline, recipes
from cqjax.io import artifact, hf
ir = hf.import_checkpoint(sys.argv[1])
qirs = [pipeline.run(recipes.recipe("cq", bits=b, block=32), ir, progress=False)[0] for b in (2, 4)]
print("ready", flush=True)
i = 0
while True:
    artifact.save(qirs[i % 2], sys.argv[2])
    i += 1
"""


def test_a_kill_during_save_leaves_an_artifact(irs, tmp_path):
    """kill -9 at random moments of repeated saves: the directory always holds a complete
    artifact (the 2-bit or the 4-bit one), and the next save removes what the killed one left."""
    import signal
    import subprocess
    import sys
    import time

    ckpt = write(tmp_path / "ckpt", config=ODD, weights=tensors(ODD))
    dest = tmp_path / "art"
    rng = np.random.default_rng(0)
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-P", "-c", KILLER, str(ckpt), str(dest)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.uniform(0, 0.7))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = artifact.load(dest)  # complete and valid, whichever it is
        assert {loaded.params["layers/0/mlp/up_proj/kernel"].bits} <= {2, 4}
    left = artifact.atomic.leftovers(dest)
    artifact.save(loaded, dest)
    assert artifact.atomic.leftovers(dest) == [] and all(not p.exists() for p in left)
