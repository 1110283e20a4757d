"""The CQ and RTN passes on a tiny model: the quantized runtime equals a plain
dequantize-then-matmul reference, coverage follows roles, and custom passes compose."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import pipeline, select
from cqjax.io import hf
from cqjax.ir import materialize
from cqjax.kernels.qarrays import CQArray, RTNArray, is_quantized
from cqjax.passes.common import bits_rules
from cqjax.quant_stats import is_eligible
from cqjax.passes.cq import FitCodebook, Pack, Rotate
from cqjax.passes.rtn import RoundToNearest
from test_import_errors import CONFIG, write

# hidden 40 = 32 + 8: a power-of-two tail block and padding (min_block 16 -> 8 zeros).
ODD = {**CONFIG, "vocab_size": 37, "hidden_size": 40, "intermediate_size": 72,
       "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}


def tensors(cfg, seed=1, scale=0.2):
    """Random weights of a one-layer llama ``cfg`` with half as many k/v heads as heads."""
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["hidden_size"] // 2
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,),
              "model.layers.0.input_layernorm.weight": (d,), "model.layers.0.post_attention_layernorm.weight": (d,),
              "model.layers.0.self_attn.q_proj.weight": (d, d), "model.layers.0.self_attn.k_proj.weight": (hd, d),
              "model.layers.0.self_attn.v_proj.weight": (hd, d), "model.layers.0.self_attn.o_proj.weight": (d, d),
              "model.layers.0.mlp.gate_proj.weight": (f, d), "model.layers.0.mlp.up_proj.weight": (f, d),
              "model.layers.0.mlp.down_proj.weight": (d, f)}
    return {k: (rng.standard_normal(s) * (1.0 if "norm" in k else scale)).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    return hf.import_checkpoint(write(tmp_path_factory.mktemp("odd"), config=ODD, weights=tensors(ODD)))


def cq(bits, embed_bits=4, **kw):
    return pipeline.named_chain(("rotate", Rotate(block=32, **kw)),
                                ("codebook", FitCodebook(bits=bits_rules(bits, embed_bits))), ("pack", Pack()))


def reference_model(qir):
    """The plain reference: every quantized leaf replaced by its dequantized float array."""
    return hf.to_model(qir.replace(params={p: np.asarray(l.dequantize()) for p, l in qir.params.items()
                                           if is_quantized(l)}))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["cq", "rtn"])
def test_quantized_runtime_matches_dequantized_reference(ir, bits, method):
    pipe = cq(bits) if method == "cq" else RoundToNearest(bits=bits_rules(bits, 4), block=32)
    qir, report = pipeline.run(pipe, ir, progress=False)
    tokens = np.array([[1, 5, 9, 30, 2, 7], [3, 3, 8, 36, 0, 1]], np.int32)
    ours = np.asarray(hf.to_model(qir)(tokens))
    ref = np.asarray(reference_model(qir)(tokens))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    for path, meta in qir.meta.items():
        leaf = qir.params[path]
        assert is_quantized(leaf) == is_eligible(path, meta), path
        if is_quantized(leaf):
            assert leaf.logical_shape == meta.shape
            assert meta.info["bits"] == (4 if meta.role in ("embedding", "lm_head") else bits)
            assert isinstance(leaf, CQArray if method == "cq" else RTNArray)
        else:
            assert leaf is ir.params[path]  # untouched


def test_error_shrinks_with_bits_and_cq_beats_rtn(ir):
    path = "layers/0/mlp/gate_proj/kernel"
    w = np.asarray(materialize(ir.params[path]))
    err = {}
    for bits in (2, 3, 4):
        # Equal side information per 40-wide row: CQ's two fp16 norms vs RTN's fp16 scale + zero.
        for name, pipe in [("cq", cq(bits)), ("rtn", RoundToNearest(bits=bits, block=64))]:
            q = pipeline.run(pipe, ir, progress=False)[0].params[path]
            err[name, bits] = float(np.sum((np.asarray(q.dequantize()) - w) ** 2) / np.sum(w**2))
    assert err["cq", 2] > err["cq", 3] > err["cq", 4]
    for bits in (2, 3):
        assert err["cq", bits] < err["rtn", bits]


def test_rotation_is_recorded_and_padding_counted(ir):
    qir = pipeline.run(cq(3), ir, progress=False)[0]
    meta = qir.meta["layers/0/self_attn/q_proj/kernel"]
    assert meta.info["blocks"] == [32, 16] and meta.info["padding"] == 8
    leaf = qir.params["layers/0/self_attn/q_proj/kernel"]
    assert leaf.codes.shape == (40, 48 * 3 // 8)  # padded K packed


def test_custom_passes_keep_layer0_at_4_bits_and_skip_lm_head(ir):
    rules = select.Rules([("layers/0/.*", 4), ("role:linear", 2), (True, 4)])
    pipe = pipeline.masked(pipeline.chain(Rotate(block=32), FitCodebook(bits=rules), Pack()),
                           select.Not("role:lm_head"))
    qir, _ = pipeline.run(pipe, ir, progress=False)
    assert not is_quantized(qir.params["lm_head/kernel"])
    assert qir.meta["layers/0/mlp/up_proj/kernel"].info["bits"] == 4

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class HalveNorms(pipeline.Pass):  # a user-written pass on the packed leaves
        default_where = "role:linear"

        def rewrite(self, path, leaf, meta, ctx):
            return leaf.replace(norms=(leaf.norms.astype(jnp.float32) / 2).astype(jnp.float16)), meta

    halved, _ = pipeline.run(HalveNorms(), qir, progress=False)
    a = np.asarray(qir.params["layers/0/mlp/up_proj/kernel"].dequantize())
    b = np.asarray(halved.params["layers/0/mlp/up_proj/kernel"].dequantize())
    np.testing.assert_allclose(b, a / 2, rtol=1e-3, atol=1e-6)


def test_pack_requires_rotation_first(ir):
    with pytest.raises(ValueError, match="rotate"):
        pipeline.run(pipeline.chain(FitCodebook(bits=3)), ir, progress=False)


def test_path_without_a_bits_rule_is_named(ir):
    with pytest.raises(ValueError, match="embed_tokens/embedding: no bits rule"):
        pipeline.run(pipeline.chain(Rotate(block=32), FitCodebook(bits={"role:linear": 2})), ir, progress=False)


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="codebook.mode='kmeans'"):
        FitCodebook(mode="kmeans")
    with pytest.raises(ValueError, match="pack.gain='x'"):
        Pack(gain="x")
