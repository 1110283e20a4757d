"""The pure-JAX quantized path (what TPU and GPU hosts run): the column-oriented decode equals the
row decode bit for bit, and matmul / attend / take_rows agree with the plain reference
``x @ dequantize()`` on odd and ragged sizes, every width, CQ and RTN, with and without input
scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.formats import cq as fmt
from cqjax.formats import rtn
from cqjax.kernels import backend
from cqjax.kernels.qarrays import RTNArray, select_levels
from test_kernel_support import make_cq, rel_rms

SIZES = [(7, 100), (33, 576), (5, 8)]  # (rows, K): ragged block plans (64+32+16, 128x4+64), padding


def make_rtn(rng, N, K, bits, block=64):
    nb = len(rtn.blocks(K, block))
    return RTNArray.pack(rng.integers(0, 1 << bits, (N, K)).astype(np.uint8),
                         (rng.random((N, nb)) * 0.1 + 0.01).astype(np.float16),
                         rng.standard_normal((N, nb)).astype(np.float16) * 0.1, bits=bits, block=block, K=K,
                         transposed=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("N,K", SIZES)
def test_decode_kn_is_decode_rows_transposed(bits, N, K):
    rng = np.random.default_rng(bits * 1000 + K)
    for q in (make_cq(rng, N, K, bits), make_rtn(rng, N, K, bits)):
        rows = np.asarray(q.decode_rows(q.codes, q.norms_or_scales()))  # CQ [N, Kpad], RTN [N, K]
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.decode_kn())(q)), rows.T)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("N,K", SIZES)
def test_pure_jax_matmul_attend_and_rows_match_the_reference(bits, N, K):
    rng = np.random.default_rng(bits + 7 * K)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    scale = jnp.asarray(rng.random(K) + 0.5, jnp.float16)
    ids = jnp.asarray([0, N - 1, N // 2], jnp.int32)
    for q in (make_cq(rng, N, K, bits), make_rtn(rng, N, K, bits)):
        for leaf in (q, q.replace(in_scale=scale)):
            ref = np.asarray(leaf.reference_dot(x))
            with backend.use_kernel("jax"):
                y = np.asarray(jax.jit(lambda q, x: q.matmul(x))(leaf, x))
                logits = np.asarray(jax.jit(lambda q, x: q.attend(x))(leaf.replace(transposed=False), x))
                rows = np.asarray(jax.jit(lambda q, i: q.take_rows(i))(leaf.replace(transposed=False), ids))
            assert rel_rms(y, ref) < 1e-5
            np.testing.assert_array_equal(y, logits)
            table = np.asarray(leaf.dequantize()).T  # the [rows, K] table the leaf stands for
            np.testing.assert_allclose(rows, table[np.asarray(ids)], rtol=1e-5, atol=1e-6)


def test_select_levels_picks_per_position_levels():
    rng = np.random.default_rng(0)
    for n_levels in (2, 4, 8, 16, 256):
        levels = jnp.asarray(rng.standard_normal((24, n_levels)), jnp.float32)
        codes = jnp.asarray(rng.integers(0, n_levels, (24, 5)), jnp.uint8)
        want = np.take_along_axis(np.asarray(levels), np.asarray(codes, np.int64), axis=1)
        np.testing.assert_array_equal(np.asarray(select_levels(codes, levels)), want)


def test_unpack_along_axis0_is_the_transposed_unpack():
    rng = np.random.default_rng(1)
    for bits in (1, 2, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, (9, 48)).astype(np.uint8)
        packed = fmt.pack_codes(codes, bits)
        got = np.asarray(fmt.unpack_codes_jnp(jnp.asarray(packed.T), bits, 48, axis=0))
        np.testing.assert_array_equal(got, codes.T)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.slow
def test_column_tiles_match_the_row_layout(bits):
    from cqjax.kernels.columns import to_columns

    rng = np.random.default_rng(bits)
    N, K = 37, 200
    x = jnp.asarray(rng.standard_normal((2, K)), jnp.float32)
    ids = jnp.asarray([[0, 36, 17]], jnp.int32)
    q = make_cq(rng, N, K, bits).replace(in_scale=jnp.asarray(rng.random(K) + 0.5, jnp.float16))
    with backend.use_kernel("jax"):
        ref = np.asarray(q.matmul(x))
        table = q.replace(transposed=False)
        ref_rows = np.asarray(table.take_rows(ids))
    for tile in (16, 4096):  # three tiles (the last one ragged), one tile
        c = to_columns(q, tile)
        assert c.codes.shape[0] == -(-N // min(tile, N))
        y = np.asarray(jax.jit(lambda c, x: c.matmul(x))(c, x))
        assert rel_rms(y, ref) < 1e-6
        ct = to_columns(table, tile)
        np.testing.assert_allclose(np.asarray(jax.jit(lambda c, i: c.take_rows(i))(ct, ids)), ref_rows, rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(ct.attend(x)), y)
