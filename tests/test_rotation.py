"""Block-local randomized Hadamard rotation: definition, orthogonality, matmul invariance, jnp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqjax.formats import block_offsets, block_plan
from cqjax.formats.rotation import (
    make_rotation,
    rotate_jnp,
    rotate_rows,
    rotate_rows_np,
    unrotate_jnp,
    unrotate_rows_np,
)

DETERMINISTIC = settings(derandomize=True, max_examples=40, deadline=None)


def _dense_from_definition(rot) -> np.ndarray:
    """R = blockdiag(diag(s1) H_b/sqrt(b) diag(s2)) · P, built independently with Kronecker products."""
    Kpad = rot.Kpad
    P = np.zeros((Kpad, Kpad))
    P[np.arange(Kpad), rot.perm] = 1.0  # (P v)[j] = v[perm[j]]
    B = np.zeros((Kpad, Kpad))
    offs = block_offsets(rot.blocks)
    for lo, hi, b in zip(offs[:-1], offs[1:], rot.blocks):
        H = np.ones((1, 1))
        for _ in range(int(np.log2(b))):
            H = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), H)
        B[lo:hi, lo:hi] = np.diag(rot.s1[lo:hi]) @ (H / np.sqrt(b)) @ np.diag(rot.s2[lo:hi])
    return B @ P


def _dense(rot) -> np.ndarray:
    """R as the reference applies it: column i is R e_i."""
    return rotate_rows_np(np.eye(rot.Kpad), rot).T


@pytest.mark.parametrize("K", [16, 100, 230, 576])
def test_reference_matches_definition_and_is_orthogonal(K):
    rot = make_rotation(K, block_plan(K), seed=3)
    R = _dense(rot)
    np.testing.assert_allclose(R, _dense_from_definition(rot), atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(rot.Kpad), atol=1e-12)


def test_rotation_arrays_and_determinism():
    blocks = block_plan(230)  # (128, 64, 32, 16)
    a, b, c = make_rotation(230, blocks, 7), make_rotation(230, blocks, 7), make_rotation(230, blocks, 8)
    assert a.s1.dtype == np.int8 and a.s2.dtype == np.int8 and a.perm.dtype == np.int32
    assert a.s1.shape == a.s2.shape == a.perm.shape == (240,)
    assert set(np.unique(a.s1)) == {-1, 1} and set(np.unique(a.s2)) == {-1, 1}
    for x, y in zip(a.arrays(), b.arrays()):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.s1, c.s1) and not np.array_equal(a.perm, c.perm)
    offs = block_offsets(blocks)
    for lo, hi in zip(offs[:-1], offs[1:]):  # each block permuted within itself
        assert sorted(a.perm[lo:hi]) == list(range(lo, hi))


@DETERMINISTIC
@given(
    K=st.integers(1, 300),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    block=st.sampled_from([16, 32, 128]),
)
def test_rotating_both_sides_preserves_matmul(K, rows, seed, block):
    rng = np.random.default_rng(seed)
    w, x = rng.standard_normal((rows, K)), rng.standard_normal(K)
    rot = make_rotation(K, block_plan(K, block=block, min_block=16), seed)
    got = rotate_rows_np(w, rot) @ rotate_rows_np(x[None], rot)[0]
    np.testing.assert_allclose(got, w @ x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(unrotate_rows_np(rotate_rows_np(w, rot), rot, K), w, atol=1e-12)


@functools.partial(jax.jit, static_argnums=(2,))
def _rot_jit(x, arrays, blocks):
    return rotate_jnp(x, arrays, blocks)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _unrot_jit(y, arrays, blocks, K):
    return unrotate_jnp(y, arrays, blocks, K)


@pytest.mark.parametrize("K, lead", [(16, ()), (230, (2, 3)), (576, (4,))])
def test_jnp_matches_numpy(K, lead):
    rot = make_rotation(K, block_plan(K), seed=K)
    x = np.random.default_rng(K).standard_normal((*lead, K)).astype(np.float32)
    want = rotate_rows_np(x.reshape(-1, K), rot).reshape(*lead, rot.Kpad)
    got = _rot_jit(x, rot.arrays(), rot.blocks)
    assert got.dtype == jnp.float32 and got.shape == (*lead, rot.Kpad)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    back = _unrot_jit(got, rot.arrays(), rot.blocks, K)
    np.testing.assert_allclose(np.asarray(back), x, rtol=1e-5, atol=1e-5)
    want_back = unrotate_rows_np(want.reshape(-1, rot.Kpad), rot).reshape(*lead, rot.Kpad)
    np.testing.assert_allclose(np.asarray(_unrot_jit(got, rot.arrays(), rot.blocks, None)), want_back, atol=1e-5)


def test_jnp_rotated_matmul_equals_plain_matmul():
    K, rows = 576, 64
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((rows, K)).astype(np.float32), rng.standard_normal((5, K)).astype(np.float32)
    rot = make_rotation(K, block_plan(K), seed=1)
    y = _rot_jit(x, rot.arrays(), rot.blocks) @ rotate_rows_np(w, rot).T
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-4, atol=1e-4)


def test_jnp_low_precision_input_computes_in_float32():
    rot = make_rotation(64, (64,), seed=0)
    x = np.linspace(-1, 1, 64).astype(ml_dtypes.bfloat16)
    got = _rot_jit(x, rot.arrays(), rot.blocks)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), rotate_rows_np(x[None].astype(np.float32), rot)[0], atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="powers of two"):
        make_rotation(24, (24,), 0)
    with pytest.raises(ValueError, match="K=40"):
        make_rotation(40, (16, 16), 0)
    rot = make_rotation(32, (16, 16), 0)
    with pytest.raises(ValueError, match="rotate_rows_np"):
        rotate_rows_np(np.zeros((2, 33)), rot)
    with pytest.raises(ValueError, match="rotate_jnp"):
        rotate_jnp(np.zeros((2, 33)), rot.arrays(), rot.blocks)
    with pytest.raises(ValueError, match="rotate_rows"):
        rotate_rows(np.zeros((2, 33), np.float32), rot)
    with pytest.raises(ValueError, match="unrotate_jnp"):
        unrotate_jnp(np.zeros((2, 16)), rot.arrays(), rot.blocks)


@pytest.mark.parametrize("K", [5, 100, 384, 1000])
def test_fast_rotation_rounds_each_row_on_its_own(K):
    """The C++ rotation (weights) gives a row the same bits alone, in any batch, from float64
    input, and on threads: stored bytes cannot depend on how rows are split or scheduled."""
    from concurrent.futures import ThreadPoolExecutor

    rot = make_rotation(K, block_plan(K, 128, 16), seed=K)
    w = np.random.default_rng(K).standard_normal((37, K)).astype(np.float32)
    whole = rotate_rows(w, rot)
    assert whole.dtype == np.float32 and whole.shape == (37, rot.Kpad)
    np.testing.assert_allclose(whole, rotate_rows_np(w, rot), rtol=0, atol=1e-6 * np.abs(whole).max())
    alone = np.concatenate([rotate_rows(w[i : i + 1], rot) for i in range(37)])
    with ThreadPoolExecutor(4) as pool:
        threaded = np.concatenate(list(pool.map(lambda i: rotate_rows(w[i : i + 5], rot), range(0, 37, 5))))
    assert whole.tobytes() == alone.tobytes() == threaded.tobytes() == rotate_rows(w.astype(np.float64), rot).tobytes()
    assert rotate_rows(w[:, ::-1][:, ::-1], rot).tobytes() == whole.tobytes()  # strided input
