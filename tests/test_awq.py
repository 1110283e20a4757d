"""Activation-aware input scales: ``α = 0`` is the plain recipe bit for bit, the searched scales
lower the Hessian-weighted output error on inputs with outlier channels, the runtime (pure JAX
and the C++ kernel) and the artifact honour ``in_scale``, missing stats are logged, and a
config-built pipeline with ``+pipeline.awq`` wraps the other steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cqjax import pipeline
from cqjax.io import artifact, hf
from cqjax.ir import IR, TensorMeta
from cqjax.kernels import backend
from cqjax.kernels.qarrays import CQArray, RTNArray, is_quantized
from cqjax.passes.awq import ActivationScale, channel_scales, compose, output_error, scaled_entry
from cqjax.passes.common import bits_rules
from cqjax.passes.cq import FitCodebook, Pack, Rotate
from cqjax.passes.gptq import ErrorFeedbackPack, GPTQRoundToNearest
from cqjax.passes.rtn import RoundToNearest
from cqjax.pipeline import Context, Needs, same
from cqjax.quant_stats import dequantizer, tensor_bytes
from test_import_errors import write
from test_quant_passes import ODD, tensors

PATH = "layers/0/mlp/kernel"


def outlier_hessian(K: int, seed: int = 0, outliers: int = 4, big: float = 25.0) -> np.ndarray:
    """``XᵀX / n`` for inputs with uneven channel scales and a few large-magnitude channels."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(0.3 * rng.standard_normal(K))
    sigma[rng.choice(K, outliers, replace=False)] = big
    x = rng.standard_normal((4 * K, K)) * sigma
    return x.T @ x / x.shape[0]


def cq_chain(bits, pack=None, block=64):
    return pipeline.named_chain(("rotate", Rotate(block=block)), ("codebook", FitCodebook(bits=bits_rules(bits, 4))),
                                ("pack", pack or Pack()))


def rtn(bits, block=64):
    return RoundToNearest(bits=bits_rules(bits, 4), block=block)


def one_kernel(K=256, N=64, seed=1) -> IR:
    w = (np.random.default_rng(seed).standard_normal((K, N)) * 0.05).astype(np.float32)
    return IR("toy", None, {PATH: w}, {PATH: TensorMeta(role="linear", shape=(K, N), dtype="float32")})


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    return hf.import_checkpoint(write(tmp_path_factory.mktemp("odd"), config=ODD, weights=tensors(ODD)))


def calibration(ir, skip=()):
    return {p: {"hessian": outlier_hessian(m.shape[0], seed=i), "tokens": 160}
            for i, (p, m) in enumerate(ir.meta.items()) if m.role == "linear" and p not in skip}


def test_channel_scales():
    H = np.diag([4.0, 1.0, 0.25, 0.0])
    np.testing.assert_array_equal(channel_scales(H, 0.0), np.ones(4, np.float16))
    s = channel_scales(H, 1.0).astype(np.float64)
    np.testing.assert_allclose(s, [2.0, 1.0, 0.5, 1.0], rtol=1e-3)  # dead channel: 1; geomean of live: 1
    assert channel_scales(np.diag([1e30, 1e-30]), 1.0).dtype == np.float16
    assert np.all(np.isfinite(channel_scales(np.diag([1e30, 1e-30]), 1.0)))
    entry = scaled_entry({"hessian": np.eye(3) * 4, "tokens": 5}, np.array([2, 1, 1], np.float16))
    np.testing.assert_allclose(np.diag(entry["hessian"]), [1, 4, 4])
    assert entry["tokens"] == 5


@pytest.mark.parametrize("method", ["cq", "rtn"])
def test_alpha_zero_is_the_plain_recipe(ir, method):
    recipe = cq_chain(2) if method == "cq" else rtn(2)
    ctx = Context(calibration=calibration(ir))
    plain, _ = pipeline.run(recipe, ir, progress=False)
    fixed, _ = pipeline.run(ActivationScale(alpha=0.0, recipe=recipe), ir, ctx, progress=False)
    searched, _ = pipeline.run(ActivationScale(grid=2, recipe=recipe), ir, ctx, progress=False)  # alpha 0 or 1
    assert {searched.meta[p].info["awq_alpha"] for p in ctx.calibration} <= {0.0, 1.0}
    for path, leaf in plain.params.items():
        assert same(fixed.params[path], leaf), path
        info = {k: v for k, v in fixed.meta[path].info.items() if not k.startswith("awq_")}
        assert info == plain.meta[path].info
        if path in ctx.calibration:
            assert fixed.meta[path].info["awq_alpha"] == 0.0
        if searched.meta[path].info.get("awq_alpha", 0.0) == 0.0:
            assert same(searched.params[path], leaf), path
        else:
            assert searched.params[path].in_scale is not None and leaf.in_scale is None


@pytest.mark.parametrize("method, bits", [("cq", 2), ("cq", 3), ("rtn", 3), ("ef", 2), ("gptq_rtn", 3)])
def test_scales_lower_the_output_error_on_outlier_channels(method, bits):
    one = one_kernel()
    H = outlier_hessian(256, seed=3)
    ctx = Context(calibration={PATH: {"hessian": H, "tokens": 1024}})
    recipe = {"cq": lambda: cq_chain(bits), "rtn": lambda: rtn(bits),
              "ef": lambda: cq_chain(bits, ErrorFeedbackPack()),
              "gptq_rtn": lambda: GPTQRoundToNearest(bits=bits_rules(bits, 4), block=64)}[method]()
    plain = recipe(one, ctx).params[PATH]
    out, _ = pipeline.run(ActivationScale(recipe=recipe), one, ctx, progress=False)
    leaf, info = out.params[PATH], out.meta[PATH].info
    w = one.params[PATH]
    err, err0 = output_error(w, leaf.dequantize(), H), output_error(w, plain.dequantize(), H)
    assert info["awq_rel_error"] == pytest.approx(err, rel=1e-6)
    assert info["awq_rel_error_plain"] == pytest.approx(err0, rel=1e-6)
    assert type(leaf) is type(plain) and leaf.bits == bits
    if method in ("ef", "gptq_rtn"):  # error feedback already uses H; the search keeps what helps
        assert err <= err0
    else:
        assert 0 < info["awq_alpha"] <= 1 and leaf.in_scale is not None
        assert err < 0.7 * err0, (err, err0)
    if leaf.in_scale is not None:  # the scale is the one the exponent gives, in fp16
        np.testing.assert_array_equal(np.asarray(leaf.in_scale), channel_scales(H, info["awq_alpha"]))


@pytest.fixture(scope="module")
def scaled_leaf():
    """A 3-bit CQ kernel with input scales, big enough for the C++ kernel."""
    one = one_kernel(K=576, N=120, seed=2)
    ctx = Context(calibration={PATH: {"hessian": outlier_hessian(576, seed=4), "tokens": 1}})
    out = ActivationScale(alpha=0.5, recipe=cq_chain(3, block=128))(one, ctx)
    return out.params[PATH]


def test_runtime_honours_the_input_scale(scaled_leaf):
    q = scaled_leaf
    assert isinstance(q, CQArray) and q.in_scale.dtype == jnp.float16 and q.in_scale.shape == (576,)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 576)), jnp.float32)
    ref = np.asarray(x) @ np.asarray(q.dequantize(), np.float64)
    unscaled = q.replace(in_scale=None)
    assert not np.allclose(np.asarray(unscaled.dequantize()), np.asarray(q.dequantize()))
    matmul = jax.jit(lambda q, x: q.matmul(x))
    with backend.use_kernel("jax"):
        np.testing.assert_allclose(np.asarray(matmul(q, x)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        rows = np.asarray(jax.jit(lambda t, i: t.take_rows(i))(q.replace(transposed=False), jnp.asarray([0, 7])))
    np.testing.assert_allclose(rows, np.asarray(q.dequantize()).T[[0, 7]], rtol=1e-6, atol=1e-7)
    if not backend.ffi_available():
        pytest.skip("the C++ extension is not built")
    with backend.use_kernel("ffi"):
        got = np.asarray(matmul(q, x))
        rows_ffi = np.asarray(jax.jit(lambda t, i: t.take_rows(i))(q.replace(transposed=False), jnp.asarray([0, 7])))
    rel = lambda a, b: np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))  # noqa: E731
    assert rel(got, ref) < 3e-2  # int8 activations: close to x @ dequantize(), not equal
    assert rel(got, np.asarray(x) @ np.asarray(unscaled.dequantize(), np.float64)) > 0.3  # the scale mattered
    np.testing.assert_allclose(rows_ffi, rows, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["cq", "rtn"])
def test_model_runs_and_artifact_round_trips_with_scales(ir, method, tmp_path):
    skip = "layers/0/mlp/up_proj/kernel"
    logs = []
    ctx = Context(calibration=calibration(ir, skip=(skip,)), log=logs.append)
    recipe = cq_chain(2, block=32) if method == "cq" else rtn(2, block=32)
    qir, _ = pipeline.run(ActivationScale(alpha=0.5, recipe=recipe), ir, ctx, progress=False)
    ref, _ = pipeline.run(recipe, ir, progress=False)
    assert len(logs) == 1 and skip in logs[0] and "lm_head/kernel" in logs[0] and "for 2 of" in logs[0]
    assert "embed_tokens" not in logs[0]  # tables are not candidates
    scaled = [p for p, leaf in qir.params.items() if is_quantized(leaf) and leaf.in_scale is not None]
    assert sorted(scaled) == sorted(ctx.calibration)
    assert same(qir.params[skip], ref.params[skip]) and same(qir.params["lm_head/kernel"], ref.params["lm_head/kernel"])
    for p in scaled:
        leaf = qir.params[p]
        assert isinstance(leaf, CQArray if method == "cq" else RTNArray)
        # in_scale is stored: 16 bits per input channel on top of the plain leaf's bytes
        assert tensor_bytes(leaf, 0) == tensor_bytes(ref.params[p], 0) + 2 * leaf.K
    back = artifact.load(artifact.save(qir, tmp_path / "art"))
    assert all(same(back.params[p], qir.params[p]) for p in qir.params if is_quantized(qir.params[p]))
    manifest = artifact.read_manifest(tmp_path / "art")
    fields = {e["path"]: set(e["arrays"]) for e in manifest["tensors"]}
    assert "in_scale" in fields[scaled[0]] and "in_scale" not in fields[skip]
    assert back.params[skip].in_scale is None
    if method == "cq":
        return  # CQ leaves' matmul is checked in test_runtime_honours_the_input_scale (the model run takes 10 s)
    tokens = np.array([[1, 5, 9, 30, 2, 7]], np.int32)
    dequantize = dequantizer()  # jitted: eager decoding of every leaf takes seconds
    deq = hf.to_model(qir.replace(params={p: np.asarray(dequantize(l)) for p, l in qir.params.items()
                                          if is_quantized(l)}))(tokens)
    with backend.use_kernel("jax"):
        np.testing.assert_allclose(np.asarray(hf.to_model(qir)(tokens)), np.asarray(deq), atol=2e-4, rtol=1e-4)


def _composed(*overrides):
    from test_config import composed

    return composed("+model=smollm2-135m", "quant.bits=2", *overrides)


@pytest.mark.parametrize("pipe", ["cq", "rtn"])
def test_one_override_adds_the_stage(pipe):
    from cqjax.recipes import build

    cfg = _composed(f"pipeline={pipe}", "+pipeline.awq._target_=cqjax.passes.awq.ActivationScale",
                    "+pipeline.awq.grid=5")
    chain = build(cfg)  # appended last by the override, composed to wrap the others
    assert [n for n, _ in chain.steps] == ["awq"] and chain.needs == Needs(statistics={"hessian"})
    awq = chain.steps[0][1]
    assert isinstance(awq, ActivationScale) and awq.grid == 5
    inner = [n for n, _ in awq.recipe.steps]
    assert inner == list(OmegaConf.to_container(_composed(f"pipeline={pipe}").pipeline))
    assert compose(chain) == chain  # idempotent
    plain = build(_composed(f"pipeline={pipe}"))
    assert compose(plain).steps == plain.steps
    # With the allocator, allocation runs first on the float IR, outside the wrapped recipe,
    # and measures the wrapped recipe itself.
    alloc = build(_composed(f"pipeline={pipe}", "+pipeline.awq._target_=cqjax.passes.awq.ActivationScale",
                            "quant.bpw=3"))
    assert [n for n, _ in alloc.steps] == ["allocate", "awq"]
    assert alloc.steps[0][1].recipe.steps == (alloc.steps[1],)


def test_bad_use_is_named():
    with pytest.raises(ValueError, match=r"awq.alpha=1.5"):
        ActivationScale(alpha=1.5)
    with pytest.raises(ValueError, match=r"awq.grid=1"):
        ActivationScale(grid=1)
    with pytest.raises(ValueError, match="no recipe to wrap"):
        ActivationScale()(one_kernel(), Context())
    with pytest.raises(ValueError, match="no quantization steps"):
        compose([("awq", ActivationScale())])
    ctx = Context(calibration={PATH: {"hessian": np.eye(256), "tokens": 1}})
    with pytest.raises(ValueError, match="left layers/0/mlp/kernel as a Rotated"):
        ActivationScale(alpha=0.5, recipe=Rotate())(one_kernel(), ctx)
