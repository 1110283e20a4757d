"""GPTQ error feedback: the core against a naive OBS reference, the passes against the plain
recipe (less output error on correlated inputs, identical output without correlation), the
fallback without calibration, and a pipeline run through the quantized runtime."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import pipeline
from cqjax.formats import cq as fmt
from cqjax.io import artifact, hf
from cqjax.ir import TensorMeta, materialize
from cqjax.kernels import backend
from cqjax.formats import rtn
from cqjax.kernels.qarrays import CQArray, RTNArray, is_quantized
from cqjax.passes import codebook_core, gptq_core, rtn_core
from cqjax.passes.common import bits_rules
from cqjax.passes.cq import FitCodebook, Pack, Rotate
from cqjax.passes.gptq import (ErrorFeedbackPack, GPTQRoundToNearest, block_matrices, cq_rotated,
                               cq_unrotated, rotate_hessian, rtn_gptq)
from cqjax.formats.rotation import Rotation, make_rotation, rotate_rows_np, rotated_diagonal, unrotate_rows_np
from cqjax.passes.rtn import RoundToNearest
from cqjax.pipeline import Context, same
from test_import_errors import write
from test_quant_passes import ODD, tensors

PATH = "layers/0/mlp/kernel"


def correlated_hessian(K: int, seed: int = 0, rho: float = 0.9, rank: int = 4) -> np.ndarray:
    """``XᵀX / n`` for inputs with neighbour correlation ``rho``, a rank-``rank`` shared part
    and uneven per-feature scales (as LLM activations have)."""
    rng = np.random.default_rng(seed)
    n = 4 * K
    z = rng.standard_normal((n, K))
    x = np.empty_like(z)
    x[:, 0] = z[:, 0]
    for k in range(1, K):
        x[:, k] = rho * x[:, k - 1] + np.sqrt(1 - rho**2) * z[:, k]
    x += rng.standard_normal((n, rank)) @ rng.standard_normal((rank, K))
    x *= np.exp(0.5 * rng.standard_normal(K))
    return x.T @ x / n


def output_error(w_rows: np.ndarray, w_hat_rows: np.ndarray, H: np.ndarray) -> float:
    d = np.asarray(w_rows, np.float64) - np.asarray(w_hat_rows, np.float64)
    return float(np.einsum("ij,jk,ik->", d, H, d))


def kernel(K: int, N: int = 48, seed: int = 1) -> tuple[np.ndarray, TensorMeta]:
    w = (np.random.default_rng(seed).standard_normal((K, N)) * 0.05).astype(np.float32)
    return w, TensorMeta(role="linear", shape=(K, N), dtype="float32")


def rotated(w, meta, bits, block=128):
    ctx = Context()
    r, m = Rotate(block=block).rewrite(PATH, w, meta, ctx)
    return FitCodebook(bits=bits).rewrite(PATH, r, m, ctx)


def ctx_with(H) -> Context:
    return Context(calibration={PATH: {"hessian": H, "tokens": 1000}})


def rows_of_leaf(leaf) -> np.ndarray:
    """The float64 rows ``[N, K]`` a leaf stands for, decoded in NumPy (no JAX compiles; the
    leaf's own ``dequantize`` is checked against the core in one test)."""
    Kpad = sum(leaf.blocks) if isinstance(leaf, CQArray) else rtn.kpad(leaf.K)
    codes = fmt.unpack_codes(np.asarray(leaf.codes), leaf.bits, Kpad)
    if isinstance(leaf, RTNArray):
        return rtn_core.rtn_dequantize(codes[:, : leaf.K], np.asarray(leaf.scales), np.asarray(leaf.zeros),
                                       leaf.blocks[0]).astype(np.float64)
    rows = codebook_core.dequantize_rows(codes, np.asarray(leaf.norms), leaf.blocks,
                                         list(np.asarray(leaf.codebooks, np.float32)))
    rot = Rotation(leaf.blocks, leaf.seed, np.asarray(leaf.s1), np.asarray(leaf.s2), np.asarray(leaf.perm))
    return unrotate_rows_np(rows.astype(np.float64), rot, leaf.K)


# ----------------------------------------------------------------------------- the core


def naive_obs(w, H, bounds, quant, percdamp=0.01):
    """Group OBS with explicit inverses of the remaining Hessian (no Cholesky, no batching)."""
    Hd, dead = gptq_core.damped(H, percdamp)
    W = np.array(w, np.float64)
    W[:, dead] = 0
    Q = np.zeros_like(W)
    for lo, hi in bounds:
        Hf = np.linalg.inv(Hd[lo:, lo:])
        g = hi - lo
        Q[:, lo:hi] = quant(W[:, lo:hi])
        W[:, hi:] -= (W[:, lo:hi] - Q[:, lo:hi]) @ np.linalg.solve(Hf[:g, :g], Hf[:g, g:])
    return Q


def half_grid(j, state, c0, v):
    return np.round(v * 2) / 2, None


@pytest.mark.parametrize("group", [1, 3, None])
def test_core_equals_naive_obs_and_loss_is_the_output_error(group):
    K, blocks = 37, (16, 8, 13)
    rng = np.random.default_rng(0)
    H = correlated_hessian(K, 3)
    w = rng.standard_normal((5, K))
    starts = np.cumsum((0,) + blocks)
    bounds = [(lo + c, min(lo + c + (group or b), lo + b)) for lo, b in zip(starts, blocks)
              for c in range(0, b, group or b)]
    ref = naive_obs(w, H, bounds, lambda v: np.round(v * 2) / 2)
    for lazy in (1, 20, 128):
        res = gptq_core.error_feedback(w, H, blocks, half_grid, group=group, lazy=lazy)
        np.testing.assert_allclose(res.q, ref, atol=1e-12)
        Hd, _ = gptq_core.damped(H)
        assert res.loss == pytest.approx(output_error(w, res.q, Hd), rel=1e-9)
        assert res.base == pytest.approx(output_error(w, 0 * w, Hd), rel=1e-12)
    assert output_error(w, res.q, H) < 0.8 * output_error(w, np.round(w * 2) / 2, H)


def test_core_begin_sees_updated_block_and_diagonal_hessian_gives_no_feedback():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 12))
    seen = []
    res = gptq_core.error_feedback(w, np.diag(rng.uniform(0.5, 2, 12)), (4, 8), half_grid,
                                   begin=lambda j, v: seen.append(v.copy()) or j)
    np.testing.assert_array_equal(res.q, np.round(w * 2) / 2)
    np.testing.assert_array_equal(seen[1], w[:, 4:])
    assert res.states == [0, 1]
    res = gptq_core.error_feedback(w, correlated_hessian(12), (4, 8), half_grid,
                                   begin=lambda j, v: seen.append(v.copy()))
    assert not np.array_equal(seen[-1], w[:, 4:])  # the first block's error arrived


def test_core_dead_inputs_are_zeroed_and_finite():
    rng = np.random.default_rng(3)
    H = correlated_hessian(20)
    H[[2, 7], :] = 0
    H[:, [2, 7]] = 0
    w = rng.standard_normal((6, 20))
    exact = gptq_core.error_feedback(w, H, (20,), lambda j, s, c0, v: (v.copy(), None))
    assert exact.loss == pytest.approx(0, abs=1e-20) and list(np.flatnonzero(exact.dead)) == [2, 7]
    np.testing.assert_array_equal(exact.q[:, [2, 7]], 0)
    np.testing.assert_allclose(np.delete(exact.q, [2, 7], 1), np.delete(w, [2, 7], 1), atol=1e-12)
    res = gptq_core.error_feedback(w, H, (8, 12), half_grid)
    assert np.all(np.isfinite(res.q))


def test_core_rejects_bad_input():
    w = np.ones((2, 4))
    with pytest.raises(ValueError, match="sum to K=4"):
        gptq_core.error_feedback(w, np.eye(4), (3,), half_grid)
    with pytest.raises(ValueError, match=r"hessian must be \[4, 4\]"):
        gptq_core.error_feedback(w, np.eye(3), (4,), half_grid)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_core.error_feedback(w, -np.eye(4), (4,), half_grid, percdamp=0)


# ----------------------------------------------------------------------------- rotation helpers


def test_block_matrices_are_the_rotation_and_rotate_the_hessian():
    K = 100
    rot = make_rotation(K, (64, 32, 16), 5)
    mats = block_matrices(rot)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, K))
    pad = np.zeros((3, rot.Kpad))
    pad[:, :K] = w
    by_blocks = np.concatenate([pad[:, lo:lo + m.shape[0]] @ m for lo, m in zip((0, 64, 96), mats)], axis=1)
    np.testing.assert_allclose(by_blocks, rotate_rows_np(w, rot), atol=1e-12)
    x = rng.standard_normal((50, K))
    xr = rotate_rows_np(x, rot)
    np.testing.assert_allclose(rotate_hessian(x.T @ x, mats), xr.T @ xr, atol=1e-9)
    np.testing.assert_allclose(rotated_diagonal(x.T @ x, rot), np.diag(xr.T @ xr), atol=1e-9)


def test_hessian_codebook_mode_fits_to_the_weighted_error_and_falls_back_without_one():
    K = 200
    w, meta = kernel(K)
    H = correlated_hessian(K, seed=3)
    r, m = Rotate(block=128).rewrite(PATH, w, meta, Context())
    fitted, fmeta = FitCodebook(bits=2, mode="fitted").rewrite(PATH, r, m, Context())
    hess, hmeta = FitCodebook(bits=2, mode="hessian").rewrite(PATH, r, m, ctx_with(H))
    alone, ameta = FitCodebook(bits=2, mode="hessian").rewrite(PATH, r, m, Context())
    assert FitCodebook(mode="hessian").needs.statistics == {"hessian"} and not FitCodebook().needs
    assert (fmeta.info["codebook"], hmeta.info["codebook"], ameta.info["codebook"]) == ("fitted", "hessian", "fitted")
    for d in fitted.codebooks:
        np.testing.assert_array_equal(alone.codebooks[d], fitted.codebooks[d])
    assert any(not np.array_equal(hess.codebooks[d], fitted.codebooks[d]) for d in fitted.codebooks)
    Hr = np.diag(rotated_diagonal(H, r.rotation))  # the metric the weighted fit minimizes

    def err(leaf):
        q = Pack().rewrite(PATH, leaf, m, Context())[0]
        codes = fmt.unpack_codes(np.asarray(q.codes), q.bits, sum(q.blocks))
        rot_hat = codebook_core.dequantize_rows(codes, np.asarray(q.norms), q.blocks,
                                                list(np.asarray(q.codebooks, np.float32)))
        return output_error(r.rows, rot_hat, Hr)

    assert err(hess) < err(fitted)


# ----------------------------------------------------------------------------- the passes


VARIANTS = ("rotated", "unrotated", "gptq_rtn")


def run_variant(variant, w, meta, bits, H, block=128):
    """``((plain leaf, meta), (error-feedback leaf, meta))`` for one kernel."""
    ctx = ctx_with(H)
    if variant == "gptq_rtn":
        return (RoundToNearest(bits=bits, block=block).rewrite(PATH, w, meta, ctx),
                GPTQRoundToNearest(bits=bits, block=block).rewrite(PATH, w, meta, ctx))
    r, m = rotated(w, meta, bits, block)
    return Pack().rewrite(PATH, r, m, ctx), ErrorFeedbackPack(basis=variant).rewrite(PATH, r, m, ctx)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("K", [200, 576])
@pytest.mark.parametrize("variant", VARIANTS)
def test_error_feedback_lowers_output_error(variant, K, bits):
    w, meta = kernel(K)
    H = correlated_hessian(K, seed=K)
    (plain, pmeta), (ef, emeta) = run_variant(variant, w, meta, bits, H)
    rows = w.T
    ratio = output_error(rows, rows_of_leaf(ef), H) / output_error(rows, rows_of_leaf(plain), H)
    assert ratio < 0.8, ratio
    assert type(ef) is type(plain)
    assert emeta.info["error_feedback"] == {"gptq_rtn": "gptq"}.get(variant, variant)
    assert 0 < emeta.info["ef_rel_error"] < 1
    extra = ("error_feedback", "percdamp", "ef_rel_error", "ef_base")
    assert {k: v for k, v in emeta.info.items() if k not in extra} == pmeta.info  # the plain keys, same values


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [200, 576, 100])
def test_uncorrelated_inputs_give_exactly_the_plain_codes(K, bits):
    """Nothing to feed forward: GPTQ-RTN with any diagonal Hessian reproduces RoundToNearest
    bit for bit; the unrotated variant reproduces Pack up to float rounding (it rotates each
    block back and forth in float64, Rotate works in float32). The rotated variant needs
    ``H ∝ I`` (a diagonal ``H`` is not diagonal after rotation) and then reproduces Pack bit for
    bit, except in a zero-padded last block: the padded coordinates have zero activations, so
    the rotated Hessian there is not diagonal and the feedback uses those free directions."""
    w, meta = kernel(K, N=24, seed=K + bits)
    diag = np.diag(np.random.default_rng(bits).uniform(0.5, 2.0, K))
    for variant in VARIANTS:
        H = 1.7 * np.eye(K) if variant == "rotated" else diag
        (plain, _), (ef, _) = run_variant(variant, w, meta, bits, H, block=64)
        if variant == "unrotated":  # rounding may flip a code or an fp16 norm, rarely
            assert np.mean(np.isclose(rows_of_leaf(ef), rows_of_leaf(plain), rtol=2e-3, atol=0)) > 0.99
            assert np.mean(np.asarray(ef.codes) == np.asarray(plain.codes)) > 0.99
        elif variant == "rotated" and K % 16:
            codes = [fmt.unpack_codes(np.asarray(q.codes), bits, sum(q.blocks))[:, : K // 64 * 64] for q in (ef, plain)]
            np.testing.assert_array_equal(*codes)  # the unpadded 64-blocks
            np.testing.assert_array_equal(np.asarray(ef.norms)[:, : K // 64], np.asarray(plain.norms)[:, : K // 64])
            assert output_error(w.T, rows_of_leaf(ef), H) < output_error(w.T, rows_of_leaf(plain), H)
        else:
            assert same(ef, plain), variant


@pytest.mark.parametrize("K", [200, 100])
@pytest.mark.parametrize("variant", VARIANTS)
def test_leaf_dequantizes_to_the_core_reconstruction(variant, K):
    """The packed leaf holds the core's codes and norms (scales), its ``dequantize`` (the
    runtime's reference decode) gives the core's reconstruction, and the core's loss is the
    damped output error in the basis it worked in."""
    bits = 2
    w, meta = kernel(K, N=16)
    H = correlated_hessian(K)
    _, (leaf, _) = run_variant(variant, w, meta, bits, H, block=64)
    r, _ = rotated(w, meta, bits, block=64)
    w_in, H_in = w.T, H
    if variant == "rotated":
        codes, norms, res = cq_rotated(r, H)
        mats = block_matrices(r.rotation)
        q = np.concatenate([res.q[:, lo:lo + m.shape[0]] @ m.T for lo, m in
                            zip(np.cumsum((0,) + r.rotation.blocks), mats)], axis=1)[:, :K]
        w_in, H_in = r.rows, rotate_hessian(H, mats)
    elif variant == "unrotated":
        codes, norms, res = cq_unrotated(r, H)
        q = res.q
    else:
        codes, scales, norms, res = rtn_gptq(w.T.copy(), H, bits, 64)
        q = res.q
        np.testing.assert_array_equal(np.asarray(leaf.scales), scales)
    Kpad = codes.shape[1] if variant != "gptq_rtn" else rtn.kpad(K)
    np.testing.assert_array_equal(fmt.unpack_codes(np.asarray(leaf.codes), bits, Kpad)[:, : codes.shape[1]], codes)
    np.testing.assert_array_equal(np.asarray(leaf.norms if variant != "gptq_rtn" else leaf.zeros), norms)
    ref = np.asarray(leaf.dequantize(), np.float64).T  # the runtime's own reference decode
    np.testing.assert_allclose(ref, q, rtol=0, atol=2e-6 * np.abs(q).max())
    np.testing.assert_allclose(rows_of_leaf(leaf), q, rtol=0, atol=2e-6 * np.abs(q).max())
    assert res.loss == pytest.approx(output_error(w_in, res.q, gptq_core.damped(H_in)[0]), rel=1e-6)


def test_dead_inputs_stay_finite_and_still_help():
    K = 200
    w, meta = kernel(K)
    H = correlated_hessian(K)
    dead = [0, 5, 130, 199]
    H[dead, :] = 0
    H[:, dead] = 0
    for variant in VARIANTS:
        (plain, _), (ef, _) = run_variant(variant, w, meta, 2, H)
        q = rows_of_leaf(ef)
        assert np.all(np.isfinite(q))
        assert output_error(w.T, q, H) < 0.8 * output_error(w.T, rows_of_leaf(plain), H), variant


def test_bad_calibration_and_hyperparameters_are_named():
    w, meta = kernel(40)
    r, m = rotated(w, meta, 2)
    with pytest.raises(ValueError, match=r"calibration\['layers/0/mlp/kernel'\]\['hessian'\]: expected \[40, 40\]"):
        ErrorFeedbackPack().rewrite(PATH, r, m, ctx_with(np.eye(39)))
    with pytest.raises(ValueError, match="error_feedback_pack.basis='both'"):
        ErrorFeedbackPack(basis="both")
    with pytest.raises(ValueError, match="supports only 'none'"):
        ErrorFeedbackPack(gain="ls")
    with pytest.raises(ValueError, match="rotate"):
        ErrorFeedbackPack().rewrite(PATH, w, meta, ctx_with(np.eye(40)))


def test_hydra_override_swaps_the_pass():
    from hydra.utils import instantiate

    # What `pipeline.pack._target_=...` leaves: the Pack config's own keys plus the new target.
    p = instantiate({"_target_": "cqjax.passes.gptq.ErrorFeedbackPack", "gain": "none", "basis": "unrotated"})
    assert isinstance(p, ErrorFeedbackPack) and p.basis == "unrotated"
    p = instantiate({"_target_": "cqjax.passes.gptq.GPTQRoundToNearest", "bits": 2, "block": 64})
    assert isinstance(p, GPTQRoundToNearest) and p.block == 64


# ----------------------------------------------------------------------------- in a pipeline


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    return hf.import_checkpoint(write(tmp_path_factory.mktemp("odd"), config=ODD, weights=tensors(ODD)))


def calibration(ir, skip=()):
    """A correlated Hessian for every linear kernel except ``skip``."""
    return {p: {"hessian": correlated_hessian(m.shape[0], seed=i), "tokens": 160}
            for i, (p, m) in enumerate(ir.meta.items()) if m.role == "linear" and p not in skip}


def cq_chain(bits, pack):
    return pipeline.named_chain(("rotate", Rotate(block=32)), ("codebook", FitCodebook(bits=bits_rules(bits, 4))),
                                ("pack", pack))


@pytest.mark.parametrize("method", ["rotated", "unrotated", "gptq_rtn"])
@pytest.mark.slow
def test_pipeline_with_calibration_runs_the_quantized_model(ir, method, tmp_path):
    skip = "layers/0/mlp/up_proj/kernel"
    logs = []
    ctx = Context(calibration=calibration(ir, skip=(skip,)), log=logs.append)
    if method == "gptq_rtn":
        ef, plain = GPTQRoundToNearest(bits=bits_rules(2, 4), block=32), RoundToNearest(bits=bits_rules(2, 4), block=32)
    else:
        ef, plain = cq_chain(2, ErrorFeedbackPack(basis=method)), cq_chain(2, Pack())
    qir, report = pipeline.run(ef, ir, ctx, progress=False)  # verify=True checks the pass contract
    ref, _ = pipeline.run(plain, ir, progress=False)
    assert len(logs) == 1 and skip in logs[0] and "lm_head/kernel" in logs[0] and "embed_tokens" in logs[0]
    for path, meta in qir.meta.items():
        leaf = qir.params[path]
        if not is_quantized(leaf):
            assert leaf is ir.params[path]
        elif path in ctx.calibration:
            assert meta.info["error_feedback"] == {"gptq_rtn": "gptq"}.get(method, method)
            assert isinstance(leaf, RTNArray if method == "gptq_rtn" else CQArray)
            H = ctx.calibration[path]["hessian"]
            w = np.asarray(materialize(ir.params[path])).T
            assert output_error(w, rows_of_leaf(leaf), H) < output_error(w, rows_of_leaf(ref.params[path]), H)
        else:  # no calibration: exactly the plain recipe
            assert meta.info["error_feedback"] == "none"
            assert same(leaf, ref.params[path])
    if method == "unrotated":
        return  # the same leaf type as "rotated": the runtime checks below would repeat
    tokens = np.array([[1, 5, 9, 30, 2, 7]], np.int32)
    deq = hf.to_model(qir.replace(params={p: np.asarray(l.dequantize()) for p, l in qir.params.items()
                                          if is_quantized(l)}))(tokens)
    with backend.use_kernel("jax"):  # the exact runtime path (the CPU kernel rounds activations to int8)
        np.testing.assert_allclose(np.asarray(hf.to_model(qir)(tokens)), np.asarray(deq), atol=2e-4, rtol=1e-4)
    if method == "rotated":  # the artifact stores and restores the leaves bit for bit
        back = artifact.load(artifact.save(qir, tmp_path / "art"))
        assert all(same(back.params[p], qir.params[p]) for p in ctx.calibration)
