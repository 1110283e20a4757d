"""Tuning the stored format's continuous parameters: it lowers the error against the float model
(on held-out rows too), moves nothing but norms, codebooks and float norms/biases, keeps the
format (artifact round trip, FFI kernel), and its losses are what they claim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import pipeline as pl
from cqjax import recipes
from cqjax.io import artifact, hf
from cqjax.kernels import backend
from cqjax.kernels.qarrays import is_quantized
from cqjax.passes.tune import Tune
from cqjax.passes.tune_core import Tunable, teacher_topk, topk_kl
from cqjax.pipeline import Context, PassError
from test_import_errors import CONFIG, write
from test_quant_passes import tensors

CFG = {**CONFIG, "vocab_size": 37, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2,
       "num_key_value_heads": 1, "tie_word_embeddings": False, "num_hidden_layers": 2}


def _weights(cfg=CFG, seed=5):
    """Layer 0 random, each later layer a perturbed copy of it."""
    w = tensors(cfg, seed=seed, scale=0.1)
    rng = np.random.default_rng(seed + 1)
    for k in [k for k in w if "layers.0." in k]:
        for i in range(1, cfg["num_hidden_layers"]):
            noise = 0.05 * rng.standard_normal(w[k].shape)
            w[k.replace("layers.0.", f"layers.{i}.")] = (w[k] + noise).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ir = hf.import_checkpoint(write(tmp_path_factory.mktemp("tune") / "ckpt", config=CFG, weights=_weights()))
    rng = np.random.default_rng(0)
    rows, held_out = rng.integers(0, 37, (8, 24)).astype(np.int32), rng.integers(0, 37, (4, 24)).astype(np.int32)
    q, _ = pl.run(recipes.recipe("cq", bits=2, embed_bits=3, block=32), ir, progress=False)
    tuned, _ = pl.run(Tune(steps=40, batch=4, e2e_steps=15, max_seconds=300), q, Context(rows=rows, reference=ir),
                      progress=False)
    return ir, q, tuned, rows, held_out


def kl(ir, qir, rows) -> float:
    """Mean KL(float || quantized) per token, full vocabulary, pure JAX."""
    with backend.use_kernel("jax"):
        p = jax.nn.log_softmax(hf.to_model(ir)(rows), -1)
        q = jax.nn.log_softmax(hf.to_model(qir)(rows), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


@pytest.mark.slow
def test_tuning_lowers_the_error_on_calibration_and_held_out_rows(setup):
    ir, q, tuned, rows, held_out = setup
    assert kl(ir, tuned, rows) < 0.9 * kl(ir, q, rows)
    assert kl(ir, tuned, held_out) < kl(ir, q, held_out)
    info = tuned.meta["layers/1/mlp/down_proj/kernel"].info["tune"]
    assert info["block_loss"][1] < info["block_loss"][0] and info["kl"][1] <= info["kl"][0]


def test_only_continuous_parameters_move_and_the_format_stays(setup, tmp_path):
    _, q, tuned, _, _ = setup
    moved = 0
    for path, leaf in q.params.items():
        new = tuned.params[path]
        if is_quantized(leaf):
            for field in ("codes", "s1", "s2", "perm"):
                np.testing.assert_array_equal(np.asarray(getattr(new, field)), np.asarray(getattr(leaf, field)))
            assert new.norms.dtype == leaf.norms.dtype == jnp.float16 and new.codebooks.dtype == jnp.float16
            assert (new.bits, new.blocks, new.K, new.seed) == (leaf.bits, leaf.blocks, leaf.K, leaf.seed)
            moved += not np.array_equal(np.asarray(new.norms), np.asarray(leaf.norms))
        elif q.meta[path].role == "norm":
            moved += not np.array_equal(np.asarray(new), np.asarray(leaf))
    assert moved > 5
    artifact.save(tuned, tmp_path / "a")
    back = artifact.load(tmp_path / "a")
    tokens = np.array([[1, 5, 9, 30, 2, 7]], np.int32)
    with backend.use_kernel("jax"):
        ref = np.asarray(hf.to_model(tuned)(tokens))
    with backend.use_kernel("ffi" if backend.ffi_available() else "jax"):
        got = np.asarray(hf.to_model(back)(tokens))
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_tuning_needs_rows_and_reference_and_checks_its_settings(setup):
    ir, q, _, _, _ = setup
    with pytest.raises(PassError, match="needs calibration rows"):
        pl.run(Tune(), q, progress=False)
    with pytest.raises(ValueError, match="needs the float reference and calibration rows"):
        Tune()(q, Context())
    with pytest.raises(ValueError, match="must be the float model"):
        pl.run(Tune(), q, Context(rows=np.zeros((1, 4), np.int32)), progress=False)  # the reference would be q
    with pytest.raises(ValueError, match=r"tune.batch=0"):
        Tune(batch=0)
    with pytest.raises(ValueError, match=r"tune.block_share=2"):
        Tune(block_share=2)
    chain = recipes.recipe("cq-tune", bits=3)
    assert [n for n, _ in chain.steps] == ["rotate", "codebook", "pack", "tune"]
    assert chain.needs.rows == 48 and chain.needs.reference and chain.needs.statistics == {"hessian"}


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    rng = np.random.default_rng(1)
    t_logits, s_logits = rng.standard_normal((2, 5, 50)) * 3, rng.standard_normal((2, 5, 50)) * 3
    p, q = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
    full = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    assert float(topk_kl(s_logits, *teacher_topk(t_logits, 50))) == pytest.approx(full, rel=1e-4)
    coarse = [float(topk_kl(s_logits, *teacher_topk(t_logits, k))) for k in (1, 5, 20)]
    assert all(0 <= c <= full + 1e-6 for c in coarse) and coarse == sorted(coarse)


def test_tunable_at_zero_offsets_is_the_tree_itself():
    tree = {"a": {"value": jnp.arange(4.0)}, "b": jnp.arange(3, dtype=jnp.int32)}
    tun = Tunable.of(tree, lambda path, field: True)
    assert list(tun.base) == ["0"] and tun.frozen[1] is tree["b"]
    back = tun.tree(tun.zeros())
    np.testing.assert_array_equal(back["a"]["value"], tree["a"]["value"])
    moved = tun.tree({"0": jnp.ones(4)})["a"]["value"]  # additive: start + rms(start) * t
    np.testing.assert_allclose(moved, tree["a"]["value"] + np.sqrt(np.mean(np.arange(4.0) ** 2)), rtol=1e-6)


def _chained_and_whole_gradients(ir, q, rows, k=8):
    """The end-to-end KL's gradient on ``rows`` by :class:`_Chain` (block by block) and by
    ``jax.grad`` through the whole quantized model, both as ``{(path, field): array}``."""
    from flax import nnx

    from cqjax.passes.tune import _Chain, seedless
    from cqjax.passes.tune_core import optimizer

    mask = np.ones(rows.shape, bool)
    with backend.use_kernel("jax"):
        qmodel, choose = hf.to_model(seedless(q)), Tune().chooser(q)
        top, ids, rest = teacher_topk(hf.to_model(ir)(rows), k)
        chain = _Chain(qmodel, choose, optimizer(1e-3, 10))
        chained = chain.named(chain.grad(chain.zeros(), rows, mask, top, ids, rest))
        graphdef, state = nnx.split(qmodel)
        tun = Tunable.of(state, choose)

        def loss(t):
            return topk_kl(nnx.merge(graphdef, tun.tree(t))(rows, mask), top, ids, rest, mask)

        whole = {tun.names[key]: np.asarray(g) for key, g in jax.grad(loss)(tun.zeros()).items()}
    return chained, whole


def _assert_same_gradients(chained, whole):
    assert chained.keys() == whole.keys() and len(whole) > 10
    for name, g in whole.items():
        np.testing.assert_allclose(chained[name], g, rtol=1e-3, atol=1e-4 * np.abs(g).max() + 1e-9, err_msg=str(name))


@pytest.mark.slow  # ~40 s on 2 cores: two gradients of a whole model compiled and compared
def test_the_end_to_end_gradient_block_by_block_is_the_whole_models(tmp_path):
    """Tied table: the head's and the lookup's shares of its gradient are summed."""
    cfg = {**CFG, "tie_word_embeddings": True, "num_hidden_layers": 3}
    ir = hf.import_checkpoint(write(tmp_path / "ckpt", config=cfg, weights=_weights(cfg, seed=3)))
    q, _ = pl.run(recipes.recipe("cq", bits=2, embed_bits=3, block=32), ir, progress=False)
    rows = np.random.default_rng(2).integers(0, 37, (2, 10)).astype(np.int32)
    _assert_same_gradients(*_chained_and_whole_gradients(ir, q, rows))


@pytest.mark.slow
def test_the_end_to_end_gradient_block_by_block_carries_float_side_inputs(tmp_path):
    """Gemma 4: per-layer inputs and the keys/values that KV-shared layers reuse are float side
    inputs made from weights; their cotangents travel back with the activation's."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_gemma4 import F, S, config, write_gemma4

    # layer 2 reuses layer 1's keys and values; every layer reads its per-layer input
    write_gemma4(config(num_hidden_layers=3, layer_types=[S, F, F], num_kv_shared_layers=1), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    q, _ = pl.run(recipes.recipe("cq", bits=2, embed_bits=3, block=16), ir, progress=False)
    rows = np.random.default_rng(3).integers(0, 97, (2, 9)).astype(np.int32)
    _assert_same_gradients(*_chained_and_whole_gradients(ir, q, rows))


def test_bfloat16_gradient_steps_point_where_the_float32_ones_do(tmp_path):
    """``dot_dtype=bfloat16`` rounds the weight dots' operands of the gradient steps only: the
    gradient keeps its direction, and the KL the stage reports is float32's."""
    from cqjax.passes.tune import _Chain, seedless
    from cqjax.passes.tune_core import optimizer

    cfg = {**CFG, "num_hidden_layers": 2}
    ir = hf.import_checkpoint(write(tmp_path / "ckpt", config=cfg, weights=_weights(cfg, seed=8)))
    q, _ = pl.run(recipes.recipe("cq", bits=2, embed_bits=3, block=32), ir, progress=False)
    rows = np.random.default_rng(4).integers(0, 37, (2, 10)).astype(np.int32)
    mask = np.ones(rows.shape, bool)
    with backend.use_kernel("jax"):
        qmodel, choose = hf.to_model(seedless(q)), Tune().chooser(q)
        teacher = teacher_topk(hf.to_model(ir)(rows), 8)
        chains = {d: _Chain(qmodel, choose, optimizer(1e-3, 10), d) for d in ("float32", "bfloat16")}
        grads = {d: c.named(c.grad(c.zeros(), rows, mask, *teacher)) for d, c in chains.items()}
        kls = {d: c.kl(c.zeros(), rows, *teacher) for d, c in chains.items()}
    flat = {d: np.concatenate([g[k].ravel() for k in sorted(g, key=str)]) for d, g in grads.items()}
    a, b = flat["float32"], flat["bfloat16"]
    assert not np.array_equal(a, b)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    assert kls["bfloat16"] == kls["float32"]


def test_a_relaxed_kernel_computes_its_hard_codes_and_hardening_packs_them(setup):
    """The straight-through kernel's forward is the CQ kernel of its latents' nearest levels: at
    zero offsets the leaf itself, after moving them the re-packed leaf (ragged K: 96 = 3 blocks of
    32, and 64); the gradient reaches the latents."""
    from cqjax.passes import recode

    _, q, _, _, _ = setup
    state = {"down": q.params["layers/0/mlp/down_proj/kernel"], "q": q.params["layers/1/self_attn/q_proj/kernel"]}
    lat = recode.latents(state, lambda p, f: True, "")
    assert set(lat) == {"down", "q"}
    zeros = {p: jnp.zeros_like(u0) for p, (u0, _) in lat.items()}
    moved = {p: 0.7 * jax.random.normal(jax.random.key(i), u0.shape) for i, (p, (u0, _)) in enumerate(lat.items())}
    with backend.use_kernel("jax"):
        for p, leaf in state.items():
            x = jax.random.normal(jax.random.key(7), (3, leaf.K))
            np.testing.assert_allclose(recode.relax(state, lat, zeros)[p].matmul(x), leaf.matmul(x), atol=1e-5)
            hard, codes, changed = recode.harden(state, lat, moved)
            assert 0.05 < changed < 0.95 and hard[p].codes.dtype == leaf.codes.dtype == jnp.uint8
            np.testing.assert_array_equal(np.asarray(hard[p].codes), codes[p])
            np.testing.assert_allclose(recode.relax(state, lat, moved)[p].matmul(x), hard[p].matmul(x), atol=1e-5)
            g = jax.grad(lambda t: jnp.sum(recode.relax(state, lat, t)[p].matmul(x) ** 2))(zeros)[p]
            assert float(jnp.abs(g).max()) > 0
        assert recode.harden(state, lat, zeros)[2] == 0.0


def test_recoding_moves_codes_where_the_block_loss_pays(setup, tmp_path):
    """``recode_lr > 0``: the block stage re-assigns some codes, reaches a lower block loss on its
    rows than with codes fixed, records the fraction, and the artifact runs on the FFI kernel."""
    ir, q, _, rows, _ = setup
    common = dict(steps=40, batch=4, e2e_steps=0, max_seconds=300)
    fixed, _ = pl.run(Tune(**common), q, Context(rows=rows, reference=ir), progress=False)
    moved, _ = pl.run(Tune(**common, recode_lr=0.03), q, Context(rows=rows, reference=ir), progress=False)
    path = "layers/1/mlp/down_proj/kernel"
    info, base = moved.meta[path].info["tune"], fixed.meta[path].info["tune"]
    assert 0 < info["recoded"] < 0.5 and "recoded" not in base
    assert info["block_loss"][1] < base["block_loss"][1]
    changed = [p for p, leaf in q.params.items()
               if is_quantized(leaf) and not np.array_equal(np.asarray(moved.params[p].codes), np.asarray(leaf.codes))]
    assert "layers/0/mlp/up_proj/kernel" in changed and not {"embed_tokens/embedding", "lm_head/kernel"} & set(changed)
    artifact.save(moved, tmp_path / "a")
    tokens = np.array([[1, 5, 9, 30, 2, 7]], np.int32)
    with backend.use_kernel("jax"):
        ref = np.asarray(hf.to_model(moved)(tokens))
    with backend.use_kernel("ffi" if backend.ffi_available() else "jax"):
        got = np.asarray(hf.to_model(artifact.load(tmp_path / "a"))(tokens))
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
