"""Round-to-nearest baseline: error bound, exact grids, constant blocks, ragged tail; CQ beats it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqjax.passes.codebook_core import analytic_codebook, dequantize_rows, quantize_rows, relative_mse
from cqjax.formats.rtn import blocks as rtn_blocks
from cqjax.passes.rtn_core import rtn_dequantize, rtn_quantize


def test_rtn_blocks():
    assert rtn_blocks(300) == (128, 128, 44)
    assert rtn_blocks(256) == (128, 128)
    assert rtn_blocks(5, 16) == (5,)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    K=st.integers(1, 300),
    bits=st.integers(1, 8),
    block=st.sampled_from([16, 32, 128]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_error_is_within_half_a_step(rows, K, bits, block, seed, scale):
    w = (np.random.default_rng(seed).standard_normal((rows, K)) * scale).astype(np.float32)
    codes, scales, zeros = rtn_quantize(w, bits, block)
    nb = -(-K // block)
    assert codes.shape == (rows, K) and codes.dtype == np.uint8 and codes.max() < (1 << bits)
    assert scales.shape == zeros.shape == (rows, nb) and scales.dtype == zeros.dtype == np.float16
    rec = rtn_dequantize(codes, scales, zeros, block)
    assert rec.shape == (rows, K) and rec.dtype == np.float32
    s = np.repeat(scales.astype(np.float32), block, axis=1)[:, :K]
    z = np.repeat(np.abs(zeros.astype(np.float32)), block, axis=1)[:, :K]
    levels = (1 << bits) - 1
    bound = 0.5 * s + (levels * s + z) * 2.0**-10 + 1e-6 * scale  # float16 rounding of scale and zero
    assert np.all(np.abs(rec - w) <= bound)


def test_values_on_the_grid_are_exact():
    q = np.tile(np.arange(16), 8)[None].repeat(3, axis=0)  # every block holds codes 0 and 15
    w = (q * 0.25 - 1.0).astype(np.float32)
    codes, scales, zeros = rtn_quantize(w, 4, 16)
    np.testing.assert_array_equal(codes, q)
    assert np.all(scales == np.float16(0.25)) and np.all(zeros == np.float16(-1.0))
    np.testing.assert_array_equal(rtn_dequantize(codes, scales, zeros, 16), w)


def test_constant_and_zero_blocks():
    w = np.zeros((2, 40), np.float32)
    w[1, :32] = 0.75
    codes, scales, zeros = rtn_quantize(w, 2, 32)
    assert np.all(codes == 0) and np.all(scales == 1)
    np.testing.assert_array_equal(rtn_dequantize(codes, scales, zeros, 32), w)


def test_errors():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        rtn_quantize(np.zeros((1, 8)), 0)
    with pytest.raises(ValueError, match="non-finite"):
        rtn_quantize(np.array([[1.0, np.nan]]), 4)
    with pytest.raises(ValueError, match="overflows float16"):
        rtn_quantize(np.array([[-7e4, 7e4]]), 4)
    with pytest.raises(ValueError, match=r"scales/zeros must be \[1, 3\]"):
        rtn_dequantize(np.zeros((1, 300), np.uint8), np.ones((1, 2)), np.ones((1, 2)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cq_beats_rtn_on_gaussian_rows(bits):
    """Same block length (128); CQ even stores less side data (one fp16 per block, not two)."""
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    rtn = relative_mse(w, rtn_dequantize(*rtn_quantize(w, bits, 128), 128))
    blocks, cb = (128,) * 8, {128: analytic_codebook(128, bits)}
    cq = relative_mse(w, dequantize_rows(*quantize_rows(w, blocks, cb), blocks, cb))
    assert cq < rtn, (cq, rtn)
