"""Codebooks and norm-times-codebook quantization of rows: theory, gains, edge cases, recipe."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax.formats import block_plan, pack_codes, unpack_codes
from cqjax.passes.codebook_core import (
    GAINS,
    analytic_codebook,
    dequantize_rows,
    fit_codebook,
    fit_codebooks,
    quantize_rows,
    relative_mse,
    unit_blocks,
)
from cqjax.formats.rotation import make_rotation, rotate_rows_np, unrotate_rows_np

THEORY_D128 = {1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}  # /work/shared/FACTS.md
GAUSS_LLOYD_MAX = {1: [0.7979], 2: [0.4528, 1.5104]}  # positive levels for N(0, 1)


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)


@pytest.mark.parametrize("d", [16, 64, 128, 576])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_analytic_codebook_shape_order_symmetry(d, bits):
    cb = analytic_codebook(d, bits)
    assert cb.dtype == np.float32 and cb.shape == (1 << bits,)
    assert np.all(np.diff(cb) > 0)
    np.testing.assert_array_equal(cb, -cb[::-1])
    assert 0 < cb[-1] < 1


def test_analytic_codebook_known_cases():
    # d = 3: the coordinate is uniform on [-1, 1]; Lloyd-Max is the uniform quantizer.
    np.testing.assert_allclose(analytic_codebook(3, 2), [-0.75, -0.25, 0.25, 0.75], atol=1e-5)
    # Large d: sqrt(d) * coordinate -> N(0, 1); compare with Gaussian Lloyd-Max levels.
    for bits, pos in GAUSS_LLOYD_MAX.items():
        got = analytic_codebook(4096, bits)[1 << (bits - 1) :] * np.sqrt(4096)
        np.testing.assert_allclose(got, pos, rtol=2e-3)


def test_analytic_codebook_is_cached_but_returns_copies():
    a = analytic_codebook(64, 2)
    a[:] = 0
    assert np.all(analytic_codebook(64, 2) != 0)
    with pytest.raises(ValueError, match="analytic_codebook"):
        analytic_codebook(1, 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_analytic_mse_on_gaussian_matches_theory(gauss, bits):
    blocks = (128,) * 8
    cb = {128: analytic_codebook(128, bits)}
    codes, norms = quantize_rows(gauss, blocks, cb)
    assert codes.dtype == np.uint8 and norms.dtype == np.float16 and norms.shape == (512, 8)
    assert codes.max() < (1 << bits)
    mse = relative_mse(gauss, dequantize_rows(codes, norms, blocks, cb))
    assert abs(mse / THEORY_D128[bits] - 1) < 0.03, mse


@pytest.mark.parametrize("bits", [2, 4])
def test_gains(gauss, bits):
    blocks = (128,) * 8
    cb = {128: analytic_codebook(128, bits)}
    rec = {g: dequantize_rows(*quantize_rows(gauss, blocks, cb, g), blocks, cb) for g in GAINS}
    mse = {g: relative_mse(gauss, r) for g, r in rec.items()}
    assert mse["ls"] < mse["none"]  # per-block least-squares scale can only help (up to fp16)
    # "norm": each reconstructed block keeps the original block norm (to float16 rounding).
    got = np.linalg.norm(rec["norm"].reshape(512, 8, 128), axis=2)
    want = np.linalg.norm(gauss.reshape(512, 8, 128), axis=2)
    np.testing.assert_allclose(got, want, rtol=2e-3)


@pytest.mark.parametrize("gain", GAINS)
def test_zero_blocks_and_zero_rows(gain):
    w = np.random.default_rng(1).standard_normal((4, 48)).astype(np.float32)
    w[0] = 0
    w[2, 32:] = 0
    blocks = (32, 16)
    cb = {32: analytic_codebook(32, 2), 16: analytic_codebook(16, 2)}
    codes, norms = quantize_rows(w, blocks, cb, gain)
    assert np.all(np.isfinite(norms.astype(np.float32)))
    assert norms[0].tolist() == [0, 0] and norms[2, 1] == 0
    rec = dequantize_rows(codes, norms, blocks, cb)
    assert np.all(rec[0] == 0) and np.all(rec[2, 32:] == 0)
    assert relative_mse(w, rec) < 0.2


def test_nearest_level_and_exact_reconstruction():
    cb = analytic_codebook(16, 2)
    levels = np.array([0, 1, 2, 3] * 4)
    u = cb[levels].astype(np.float64)
    w = (u / np.linalg.norm(u) * 2.0)[None].astype(np.float32)  # norm 2.0 is exact in float16
    codes, norms = quantize_rows(w, (16,), [cb])
    np.testing.assert_array_equal(codes[0], levels)
    rec = dequantize_rows(codes, norms, (16,), [cb])
    np.testing.assert_allclose(rec[0], 2.0 * cb[levels], rtol=1e-6)  # gain "none": n * levels
    for gain in ("ls", "norm"):  # u is a multiple of the chosen levels: both gains are exact
        rec = dequantize_rows(*quantize_rows(w, (16,), [cb], gain), (16,), [cb])
        np.testing.assert_allclose(rec, w, rtol=1e-3)


def test_codebooks_by_size_or_by_block_agree():
    w = np.random.default_rng(2).standard_normal((8, 112)).astype(np.float32)
    blocks = block_plan(112)  # (64, 32, 16)
    by_size = {d: analytic_codebook(d, 3) for d in set(blocks)}
    a = quantize_rows(w, blocks, by_size)
    b = quantize_rows(w, blocks, [by_size[d] for d in blocks])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"no codebook for block sizes \[16\]"):
        quantize_rows(w, blocks, {64: by_size[64], 32: by_size[32]})
    with pytest.raises(ValueError, match="gain must be"):
        quantize_rows(w, blocks, by_size, "max")
    with pytest.raises(ValueError, match="expected"):
        quantize_rows(w[:, :100], blocks, by_size)


def test_float16_overflow_and_non_finite_are_reported():
    w = np.full((1, 16), 3e4, np.float32)
    with pytest.raises(ValueError, match="overflows float16"):
        quantize_rows(w, (16,), [analytic_codebook(16, 2)])
    w[0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(w, (16,), [analytic_codebook(16, 2)])


def test_fit_codebook_recovers_clusters_and_is_deterministic():
    rng = np.random.default_rng(3)
    centers = np.array([-3.0, -1.0, 0.5, 4.0])
    x = centers[rng.integers(0, 4, 4000)] + 0.05 * rng.standard_normal(4000)
    cb = fit_codebook(x, 2)
    assert cb.dtype == np.float32 and np.all(np.diff(cb) > 0)
    np.testing.assert_allclose(cb, centers, atol=0.01)
    np.testing.assert_array_equal(cb, fit_codebook(x, 2))
    np.testing.assert_allclose(fit_codebook(np.full(10, 2.0), 1), [2.0, 2.0])
    with pytest.raises(ValueError, match="init must have 4"):
        fit_codebook(x, 2, init=[0.0, 1.0])


def test_weighted_fit_equals_repeating_each_value_by_its_weight():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(3000)
    reps = rng.integers(0, 4, x.size)
    init = [-1.5, -0.4, 0.4, 1.5]
    np.testing.assert_array_equal(fit_codebook(x, 2, init=init, weights=reps.astype(float)),
                                  fit_codebook(np.repeat(x, reps), 2, init=init))
    np.testing.assert_array_equal(fit_codebook(x, 2, weights=np.ones_like(x)), fit_codebook(x, 2))
    heavy = fit_codebook(x, 2, weights=np.where(x > 0, 20.0, 1.0))
    assert np.sum(heavy > 0) == 3  # the levels follow the weight
    for bad in (np.ones(5), -np.ones_like(x), np.zeros_like(x), np.full_like(x, np.nan)):
        with pytest.raises(ValueError, match="weights"):
            fit_codebook(x, 2, weights=bad)


def test_column_weighted_codebooks_lower_the_weighted_error():
    """With weights ``n² · h[k]`` the levels minimize ``Σ_k h[k] (w − ŵ)²`` among codebooks of
    fixed codes; on a strongly uneven ``h`` they beat the unweighted fit in that metric."""
    rng = np.random.default_rng(6)
    blocks = (128, 128, 64)
    w = rng.standard_t(4, size=(192, sum(blocks))).astype(np.float32) * np.exp(rng.standard_normal((192, 1)))
    h = np.exp(2.0 * rng.standard_normal(sum(blocks)))
    plain, weighted = fit_codebooks(w, blocks, 2), fit_codebooks(w, blocks, 2, column_weights=h)
    assert set(weighted) == {128, 64}

    def err(books):
        w_hat = dequantize_rows(*quantize_rows(w, blocks, books), blocks, books)
        return float(np.sum(h * np.square(w.astype(np.float64) - w_hat)))

    assert err(weighted) < 0.97 * err(plain)
    n2 = np.sum(np.square(w[:, 256:], dtype=np.float64), axis=1)  # the size-64 block's norm²
    np.testing.assert_array_equal(
        fit_codebooks(w, blocks, 2, column_weights=np.ones(sum(blocks)))[64],
        fit_codebook(unit_blocks(w, blocks)[64], 2, init=analytic_codebook(64, 2), weights=np.repeat(n2, 64)))
    with pytest.raises(ValueError, match="column_weights"):
        fit_codebooks(w, blocks, 2, column_weights=np.ones(5))


def test_fitted_codebooks_beat_analytic_on_non_spherical_blocks():
    # Unrotated heavy-tailed rows: unit vectors are far from uniform on the sphere.
    w = np.random.default_rng(4).standard_t(3, size=(256, 256)).astype(np.float32)
    blocks = (128, 128)
    ana = {128: analytic_codebook(128, 2)}
    fit = fit_codebooks(w, blocks, 2)
    assert set(fit) == {128} and unit_blocks(w, blocks)[128].shape == (512, 128)
    m_ana = relative_mse(w, dequantize_rows(*quantize_rows(w, blocks, ana), blocks, ana))
    m_fit = relative_mse(w, dequantize_rows(*quantize_rows(w, blocks, fit), blocks, fit))
    assert m_fit < 0.9 * m_ana


def test_full_recipe_rotation_helps_on_outliers():
    """rotate -> quantize -> pack -> unpack -> dequantize -> unrotate, on rows with outlier columns."""
    rng = np.random.default_rng(5)
    K, rows, bits = 200, 128, 3
    w = rng.standard_normal((rows, K))
    w[:, rng.choice(K, 6, replace=False)] *= 20.0
    blocks = block_plan(K)
    cbs = {d: analytic_codebook(d, bits) for d in set(blocks)}

    def roundtrip(rot):
        w_rot = rotate_rows_np(w, rot) if rot else np.pad(w, [(0, 0), (0, sum(blocks) - K)])
        codes, norms = quantize_rows(w_rot, blocks, cbs, "ls")
        codes = unpack_codes(pack_codes(codes, bits), bits, sum(blocks))
        rec = dequantize_rows(codes, norms, blocks, cbs)
        return unrotate_rows_np(rec, rot, K) if rot else rec[:, :K]

    m_rot = relative_mse(w, roundtrip(make_rotation(K, blocks, seed=0)))
    m_plain = relative_mse(w, roundtrip(None))
    assert m_rot < 0.05 and m_rot < 0.5 * m_plain


def _quantize_rows_oracle(w_rot, blocks, codebooks, gain):
    """The original per-block quantize_rows (searchsorted on float32 midpoints), kept as the oracle."""
    cbs = [np.asarray(codebooks[b] if isinstance(codebooks, dict) else cb, np.float32)
           for b, cb in zip(blocks, codebooks if not isinstance(codebooks, dict) else blocks)]
    rows = w_rot.shape[0]
    codes = np.empty(w_rot.shape, np.uint8)
    norms = np.empty((rows, len(blocks)))
    offs = np.concatenate([[0], np.cumsum(blocks)])
    for j, (lo, hi, cb) in enumerate(zip(offs[:-1], offs[1:], cbs)):
        seg = w_rot[:, lo:hi].astype(np.float32)
        n = np.sqrt(np.sum(np.square(seg, dtype=np.float64), axis=1))
        u = seg / np.where(n > 0, n, 1.0)[:, None].astype(np.float32)
        q = np.searchsorted(0.5 * (cb[:-1] + cb[1:]), u, side="left")
        codes[:, lo:hi] = q
        g = np.ones(rows)
        if gain != "none":
            c = cb[q].astype(np.float64)
            cc = np.sum(c * c, axis=1)
            if gain == "ls":
                num = np.sum(u.astype(np.float64) * c, axis=1)
            else:
                num = np.sqrt(np.sum(np.square(u, dtype=np.float64), axis=1))
                cc = np.sqrt(cc)
            g = np.where(cc > 0, num / np.where(cc > 0, cc, 1.0), 1.0)
        norms[:, j] = n * g
    return codes, norms.astype(np.float16)


@pytest.mark.parametrize("chunk", [None, 64])  # 64 weights per chunk: many row chunks
@pytest.mark.parametrize("gain", GAINS)
def test_quantize_rows_bit_identical_to_per_block_oracle(gain, chunk, monkeypatch):
    import cqjax.passes.codebook_core as core

    if chunk is not None:
        monkeypatch.setattr(core, "_CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(7)
    dyadic = np.array([-0.75, -0.25, 0.25, 0.75], np.float32)  # midpoints -0.5, 0, 0.5
    cases = []
    # Gaussian rows, mixed block sizes, with zero rows and zero blocks; float32 and float64 input.
    for K, bits in [(100, 3), (200, 2), (576, 4), (40, 1)]:
        blocks = block_plan(K)
        w = rng.standard_normal((37, sum(blocks))).astype(np.float32)
        w[3] = 0
        w[5, : blocks[0]] = 0
        books = {d: analytic_codebook(d, bits) for d in set(blocks)}
        cases += [(w, blocks, books), (w.astype(np.float64) * 1.3, blocks, books)]
    # Ties: sparse integer blocks give unit values exactly 0, ±0.5 and ±1 (midpoints 0, ±0.5).
    w = rng.integers(-1, 2, size=(64, 48)).astype(np.float32) * (rng.random((64, 48)) < 0.15)
    w[:2, :16] = 0
    w[0, [0, 4, 8, 12]] = 3.0  # u = 0.5 on the midpoint between levels 2 and 3
    w[1, [1, 5, 9, 13]] = -3.0  # u = -0.5 between levels 0 and 1
    tie = quantize_rows(w, (16, 16, 16), {16: dyadic}, gain)[0]
    assert tie[0, 0] == 2 and tie[1, 1] == 0 and tie[0, 1] == 1  # ties (also at 0) go to the lower level
    cases.append((w, (16, 16, 16), {16: dyadic}))
    # One codebook per block: same size, different levels (and duplicate levels) in a row.
    w = rng.standard_normal((33, 64)).astype(np.float32)
    cases.append((w, (16, 16, 16, 16), [dyadic, dyadic, dyadic * 0.5, np.array([-0.5, 0, 0, 0.5], np.float32)]))
    for w, blocks, books in cases:
        got = quantize_rows(w, blocks, books, gain)
        want = _quantize_rows_oracle(w, blocks, books, gain)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1].view(np.uint16), want[1].view(np.uint16))  # bits, incl. -0


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_cpp_quantizer_equals_the_numpy_reference(bits):
    """The C++ loops behind quantize_rows (float32, no gain) give the reference's codes and its
    float64 norms bit for bit, for block sizes up to 512 (NumPy's pairwise sum splits there)."""
    import cqjax.passes.codebook_core as core
    from cqjax import _xla_ext

    rng = np.random.default_rng(bits)
    for blocks in [(128, 128, 64, 16), (256,), (512, 32), (8, 16)]:
        w = (rng.standard_normal((129, sum(blocks))) * rng.uniform(1e-3, 1e3, (129, 1))).astype(np.float32)
        w[4] = 0
        w[7, : blocks[0]] = 0
        cbs = [np.asarray(analytic_codebook(b, bits), np.float16).astype(np.float32) for b in blocks]
        mids = np.stack([0.5 * (c[:-1] + c[1:]) for c in cbs])
        codes, norms, finite = _xla_ext.quantize_rows(w, list(blocks), mids)
        want_codes, want_norms = core._quantize_reference(w, blocks, cbs, "none", True)
        assert finite
        np.testing.assert_array_equal(codes, want_codes)
        assert norms.tobytes() == want_norms.tobytes()
        w[9, 3] = np.nan
        assert not _xla_ext.quantize_rows(w, list(blocks), mids)[2]
    with pytest.raises(ValueError, match="quantize_rows"):
        _xla_ext.quantize_rows(np.zeros((2, 20), np.float32), [16], np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_cpp_rotated_error_sums_equal_float64_sums(bits):
    from cqjax import _xla_ext

    rng = np.random.default_rng(bits)
    blocks = (128, 64, 16)
    w = rng.standard_normal((61, sum(blocks))).astype(np.float32)
    books = {b: np.asarray(analytic_codebook(b, bits), np.float16).astype(np.float32) for b in set(blocks)}
    codes, norms = quantize_rows(w, blocks, books)
    deq = dequantize_rows(codes, norms, blocks, books).astype(np.float64)
    err, ref = _xla_ext.rotated_error_sums(w, pack_codes(codes, bits), bits, norms.view(np.uint16), list(blocks),
                                           np.stack([books[b] for b in blocks]))
    want_err, want_ref = np.sum((w - deq) ** 2), np.sum(w.astype(np.float64) ** 2)
    assert err == pytest.approx(want_err, rel=1e-12) and ref == pytest.approx(want_ref, rel=1e-12)
    with pytest.raises(ValueError, match="rotated_error_sums"):
        _xla_ext.rotated_error_sums(w, pack_codes(codes, bits), bits, norms.view(np.uint16), [128, 64],
                                    np.stack([books[b] for b in blocks]))
