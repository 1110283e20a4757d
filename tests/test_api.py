"""The public API: the module doctest runs on a tiny checkpoint with a tokenizer; generation
from a loaded artifact equals generation from the in-memory quantized model."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import cqjax
from cqjax import api
from cqjax.errors import ConfigError
from cqjax.eval.testing import tiny_tokenizer
from test_import_errors import write
from test_quant_passes import ODD, tensors

CFG = {**ODD, "vocab_size": 300}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("ckpt") / "tiny", config=CFG, weights=tensors(CFG))
    tok = tiny_tokenizer()
    assert len(tok) <= CFG["vocab_size"]
    tok.save_pretrained(path)
    return path


def test_module_doctest_runs(checkpoint, tmp_path):
    result = doctest.testmod(api, extraglobs={"checkpoint": str(checkpoint), "tmp": str(tmp_path)},
                             optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 8 and result.failed == 0


def test_package_reexports():
    assert sorted(cqjax.__all__) == ["Quantized", "generate", "load", "quantize", "save", "storage"]
    assert cqjax.quantize is api.quantize and cqjax.Quantized is api.Quantized
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cqjax.nope  # noqa: B018


@pytest.mark.parametrize("method", ["cq", "rtn"])
def test_generate_from_loaded_artifact_equals_in_memory(checkpoint, tmp_path, method):
    q = cqjax.quantize(checkpoint, bits=2, method=method, block=32, progress=False)
    assert q.recipe["method"] == method and q.recipe["source"] == str(checkpoint)
    path = cqjax.save(q, tmp_path / "art")
    q2 = cqjax.load(path)
    assert q2.recipe["bits"] == 2 and [r["name"] for r in q2.report] == [r["name"] for r in q.report]
    assert q2.storage == q.storage
    prompt = np.array([[5, 17, 3, 42, 8]], np.int32)
    a = cqjax.generate(q, None, prompt, max_new_tokens=6, stop_at_eos=False)
    b = cqjax.generate(q2, None, prompt, max_new_tokens=6, stop_at_eos=False)
    assert a.shape == (1, 11)
    np.testing.assert_array_equal(a, b)
    sampled = [cqjax.generate(x, None, "The quick", max_new_tokens=5, temperature=1.0, top_k=20, seed=4)
               for x in (q, q2)]
    assert isinstance(sampled[0], str) and sampled[0] == sampled[1]


def test_quantize_accepts_ir_and_model_ir_pairs_and_a_custom_pipeline(checkpoint):
    from cqjax.io import hf
    from cqjax.recipes import recipe

    model, ir = hf.load(checkpoint)
    q1 = cqjax.quantize(ir, bits=3, block=32, progress=False)
    q2 = cqjax.quantize((model, ir), pipeline=recipe("rtn", bits=4, embed_bits=4, block=32), progress=False)
    assert q1.tokenizer_path is None and q1.tokenizer is None
    assert q2.recipe["method"] == "custom"
    assert q2.ir.params["layers/0/mlp/up_proj/kernel"].format == "rtn"
    with pytest.raises(ConfigError, match="recipe 'nope' is not one of"):
        cqjax.quantize(ir, method="nope")
    with pytest.raises(ValueError, match="needs calibration"):
        cqjax.quantize(ir, method="gptq")
    with pytest.raises(ConfigError, match="quant.overrides: .no_such. matches none of the 9 quantizable tensors"):
        cqjax.quantize(ir, overrides={"no_such": 4})
    with pytest.raises(TypeError, match="checkpoint directory or hub id"):
        cqjax.quantize(model)
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        cqjax.generate(q1, None, "hello")


def test_recipes_and_package_doctests():
    from cqjax import recipes

    for module in (recipes, cqjax):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


@pytest.mark.parametrize("K", [8, 40, 100, 576])
def test_fast_rotation_matches_the_float64_reference(K):
    from cqjax.formats import cq as fmt
    from cqjax.formats import rotation

    w = np.random.default_rng(K).standard_normal((33, K)).astype(np.float32)
    rot = rotation.make_rotation(K, fmt.block_plan(K, 128, 16), seed=K)
    ref = rotation.rotate_rows_np(w, rot)
    got = rotation.rotate_rows(w, rot)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_calibrated_recipe_from_a_checkpoint(checkpoint):
    """A recipe that needs calibration draws its rows from the checkpoint's own float model."""
    q = cqjax.quantize(checkpoint, method="cq-ef", bits=3, block=32, calib={"rows": 2, "length": 16}, progress=False)
    assert q.recipe["calibration"]["tokens"] == 2 * 16
    infos = [m.info for p, m in q.ir.meta.items() if m.role == "linear"]
    assert infos and {i["error_feedback"] for i in infos} == {"rotated"}
