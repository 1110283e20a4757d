"""The recipes are written once (conf/pipeline/*.yaml) and built the same way everywhere; the
stored tensors of each recipe at a fixed seed are pinned (tests/golden/recipes_v1.json, made
before the recipes moved into the config group: a refactor must not change a byte)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cqjax import pipeline, recipes
from cqjax.errors import ConfigError
from cqjax.io import artifact, hf
from test_import_errors import CONFIG, write
from test_quant_passes import tensors

GOLDEN = json.loads((Path(__file__).parent / "golden" / "recipes_v1.json").read_text())
# hidden 160 = 128 + 32 and intermediate 200 (blocks 128, 64, 16: 8 padded) at the default block 128
CFG = {**CONFIG, "vocab_size": 37, "hidden_size": 160, "intermediate_size": 200,
       "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, "num_hidden_layers": 1}


def hessians(ir):
    """Input second moments from float64 draws with uneven channel scales and one dead channel."""
    rng = np.random.default_rng(11)
    out = {}
    for p, m in ir.meta.items():
        if m.role != "linear":
            continue
        K = m.shape[0]
        x = rng.standard_normal((512, K)) * np.exp(rng.standard_normal(K))
        x[:, 3] = 0.0
        out[p] = {"hessian": x.T @ x / 512}
    return out


def digest(qir) -> dict[str, str]:
    tensors = {n: a for p, leaf in qir.params.items() for n, a in artifact.stored(p, leaf, qir.meta[p])[1].items()}
    return {n: hashlib.sha256(np.ascontiguousarray(a).tobytes() + str((a.dtype.name, a.shape)).encode()).hexdigest()
            for n, a in sorted(tensors.items())}


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    return hf.import_checkpoint(write(tmp_path_factory.mktemp("pin") / "ckpt", config=CFG, weights=tensors(CFG, seed=7, scale=0.05)))


@pytest.mark.parametrize("name", ["cq", "cq-ef", "rtn", "gptq"])
def test_recipe_bytes_are_pinned(ir, name):
    qir, _ = pipeline.run(recipes.recipe(name), ir, pipeline.Context(rng_seed=0, calibration=hessians(ir)),
                          progress=False)
    got = digest(qir)
    assert sorted(got) == sorted(GOLDEN[name])
    assert [n for n in got if got[n] != GOLDEN[name][n]] == []


def test_recipes_are_the_config_group():
    assert recipes.names() == ["cq", "cq-ef", "cq-tune", "gptq", "rtn"]
    with pytest.raises(ConfigError, match="not one of"):
        recipes.config("nope")
    with pytest.raises(ConfigError, match="quant.bits=5"):
        recipes.recipe("cq", bits=5)


def test_recipes_doctest():
    import doctest

    assert doctest.testmod(recipes).failed == 0
