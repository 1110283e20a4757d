"""The CQ FFI kernels: every CPU path against the reference on odd sizes, golden vectors,
jit/vmap, shape errors, threads.

Tolerances (stated once):

================================  ==================================================
comparison                        bound
================================  ==================================================
SIMD path vs ``ref`` path         relative RMS < 1e-5 (same integers, float order)
kernel vs NumPy int8 model        relative RMS < 1e-3 and max |diff| <= 1e-2 * RMS(y)
                                  (float32 vs float64 rotation can move an int8
                                  activation by 1 at a rounding boundary)
kernel vs pure-JAX float path     relative RMS < 3e-2 (int8 activations and levels)
gather vs pure-JAX ``take_rows``  1e-5 relative + 1e-6 absolute (float decode)
================================  ==================================================

Regenerate the golden file (only when the layout or the scheme changes on purpose):
``CQJAX_REGEN_GOLDEN=1 python -m pytest tests/test_kernel.py -k golden``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import _ffi
from test_kernel_support import (
    GOLDEN_TXT,
    dot_jnp,
    float_model,
    golden_cases,
    golden_to_cq,
    int8_model,
    make_cq,
    operands,
    read_golden,
    rel_rms,
    rotate_np,
    take_jnp,
    write_golden,
)

PATHS = [p for p, ok in _ffi.kernel_paths().items() if ok]
SIMD_PATHS = [p for p in PATHS if p != "ref"]
SIZES = [  # (M, N, K): batch 1/3/7/129, ragged N, K with tails and padding; up to 16 blocks per
    # row (scales in registers on AVX-512) and more (scales through memory)
    (1, 5, 100), (3, 7, 576), (7, 129, 200), (2, 9, 17), (1, 3, 8), (129, 6, 256), (3, 33, 1000),
    (5, 4, 2048), (2, 11, 2600),
]


@pytest.fixture
def path():
    """Restores the default path after a test that forces one."""
    yield
    _ffi.set_kernel_path(None)
    _ffi.set_kernel_threads(0)


def _close_to_model(y, model):
    assert rel_rms(y, model) < 1e-3
    assert np.abs(y - model).max() <= 1e-2 * np.sqrt(np.mean(np.asarray(model, np.float64) ** 2))


def _run(q, x, path_name=None, **kw):
    if path_name:
        _ffi.set_kernel_path(path_name)
    return np.asarray(_ffi.cq_matmul(x, *operands(q), bits=q.bits, blocks=q.blocks, **kw))


def test_best_path_is_available_and_ref_always(path):
    assert "ref" in PATHS
    assert _ffi.active_kernel_path() in PATHS
    feats = _ffi.cpu_features()
    if feats["avx512vnni"] and feats["avx512bw"]:
        assert _ffi.active_kernel_path() == "avx512"
    with pytest.raises(ValueError, match="unknown CQ kernel path"):
        _ffi.set_kernel_path("sse9")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("M, N, K", SIZES)
def test_paths_match_reference(path, bits, M, N, K):
    rng = np.random.default_rng(bits * 1000 + M * 7 + N + K)
    q = make_cq(rng, N, K, bits, seed=K)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    ref = _run(q, x, "ref")
    model = int8_model(np.asarray(x), q)
    _close_to_model(ref, model)
    assert rel_rms(ref, float_model(np.asarray(x), q)) < 3e-2
    for p in SIMD_PATHS:
        got = _run(q, x, p)
        assert got.shape == (M, N)
        assert rel_rms(got, ref) < 1e-5, p


@pytest.mark.parametrize("bits", [2, 3])
def test_block_sizes_with_different_codebooks_in_one_chunk(path, bits):
    # block=32 and min_block=8 put several blocks (with different levels) into one SIMD chunk
    rng = np.random.default_rng(5)
    q = make_cq(rng, 11, 100, bits, block=32, min_block=8, seed=3)
    x = jnp.asarray(rng.standard_normal((3, 100)), jnp.float32)
    ref = _run(q, x, "ref")
    for p in SIMD_PATHS:
        assert rel_rms(_run(q, x, p), ref) < 1e-5, p


def test_unrotated_input(path):
    rng = np.random.default_rng(1)
    q = make_cq(rng, 9, 200, 2)
    x = jnp.asarray(rng.standard_normal((2, 200)), jnp.float32)
    xr = jnp.asarray(rotate_np(np.asarray(x), q), jnp.float32)
    np.testing.assert_allclose(_run(q, xr, rotate=False), _run(q, x), rtol=1e-3, atol=1e-3)


def test_golden_vectors(path):
    if os.environ.get("CQJAX_REGEN_GOLDEN"):
        write_golden(golden_cases(np.random.default_rng(20251123)))
    cases = read_golden(GOLDEN_TXT)
    assert len(cases) >= 6
    for c in cases:
        q = golden_to_cq(c)
        x = jnp.asarray(c["x"].reshape(c["M"], c["K"]))
        # the golden bytes still describe the same float weight
        np.testing.assert_allclose(np.asarray(dot_jnp(q, x)).ravel(), c["y_float"], rtol=1e-5, atol=1e-5)
        for p in PATHS:
            y = _run(q, x, p).ravel()
            _close_to_model(y, c["y_int8"])
            assert rel_rms(y, c["y_float"]) < 3e-2
        _ffi.set_kernel_path(None)
        rows = _ffi.cq_gather(jnp.asarray(c["ids"]), *operands(q), bits=q.bits, blocks=q.blocks, K=q.K)
        np.testing.assert_allclose(np.asarray(rows).ravel(), c["rows"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("V, K", [(7, 100), (33, 576), (4, 17)])
def test_gather_matches_take_rows(bits, V, K):
    rng = np.random.default_rng(bits + V + K)
    q = make_cq(rng, V, K, bits, transposed=False)
    ids = jnp.asarray(rng.integers(0, V, (2, 5)), jnp.int32)
    got = _ffi.cq_gather(ids, *operands(q), bits=bits, blocks=q.blocks, K=K)
    assert got.shape == (2, 5, K) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(take_jnp(q, ids)), rtol=1e-5, atol=1e-6)


def test_eight_bit_runs_reference_path():
    rng = np.random.default_rng(8)
    q = make_cq(rng, 5, 40, 8)
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    assert rel_rms(_run(q, x), float_model(np.asarray(x), q)) < 3e-2


def test_jit_vmap_and_leading_dims(path):
    rng = np.random.default_rng(2)
    q = make_cq(rng, 13, 200, 3)
    x = jnp.asarray(rng.standard_normal((4, 3, 200)), jnp.float32)
    f = jax.jit(lambda v: _ffi.cq_matmul(v, *operands(q), bits=3, blocks=q.blocks))
    flat = np.asarray(f(x.reshape(12, 200))).reshape(4, 3, 13)
    # each activation row is quantized on its own, so batching does not change results
    np.testing.assert_array_equal(np.asarray(f(x)), flat)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), flat)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(jax.vmap(f)))(x)), flat)
    ids = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
    g = jax.vmap(lambda i: _ffi.cq_gather(i, *operands(q), bits=3, blocks=q.blocks, K=200))(ids)
    np.testing.assert_allclose(np.asarray(g), np.asarray(take_jnp(q, ids)), rtol=1e-5, atol=1e-6)


def test_vmap_over_stacked_weights_is_rejected():
    rng = np.random.default_rng(3)
    qs = [make_cq(rng, 5, 64, 2, seed=s) for s in range(2)]
    stacked = [jnp.stack([a, b]) for a, b in zip(operands(qs[0]), operands(qs[1]))]
    x = jnp.ones((2, 64), jnp.float32)
    f = jax.vmap(lambda v, *w: _ffi.cq_matmul(v, *w, bits=2, blocks=qs[0].blocks))
    with pytest.raises(Exception, match="stacked weights"):
        np.asarray(f(x, *stacked))


def test_python_shape_checks():
    rng = np.random.default_rng(4)
    q = make_cq(rng, 5, 100, 2)
    ops = list(operands(q))
    with pytest.raises(ValueError, match="x has K=113"):
        _ffi.cq_matmul(jnp.ones((1, 113)), *ops, bits=2, blocks=q.blocks)
    with pytest.raises(ValueError, match="codes must be uint8"):
        _ffi.cq_matmul(jnp.ones((1, 100)), ops[0][:, :-1], *ops[1:], bits=2, blocks=q.blocks)
    with pytest.raises(ValueError, match="norms must be"):
        _ffi.cq_matmul(jnp.ones((1, 100)), ops[0], ops[1][:4], *ops[2:], bits=2, blocks=q.blocks)
    with pytest.raises(ValueError, match="bits=5"):
        _ffi.cq_matmul(jnp.ones((1, 100)), *ops, bits=5, blocks=q.blocks)


def _raw_call(x, ops, out_n, bits, blocks, rotate=1):
    call = jax.ffi.ffi_call("cqjax_cq_matmul", jax.ShapeDtypeStruct(x.shape[:-1] + (out_n,), jnp.float32))
    return np.asarray(call(x, *ops, bits=np.int32(bits), blocks=np.asarray(blocks, np.int64),
                           rotate=np.int32(rotate)))


def test_kernel_rejects_bad_shapes_without_reading_out_of_bounds():
    rng = np.random.default_rng(6)
    q = make_cq(rng, 5, 100, 2)
    codes, norms, cbs, s1, s2, perm = operands(q)
    x = jnp.ones((1, 100), jnp.float32)
    good = (codes, norms, cbs, s1, s2, perm)
    assert _raw_call(x, good, 5, 2, q.blocks).shape == (1, 5)
    cases = {
        "codes has shape": (codes[:, :-1], norms, cbs, s1, s2, perm),
        "norms has shape": (codes, norms[:, :-1], cbs, s1, s2, perm),
        "codebooks has shape": (codes, norms, cbs[:, :2], s1, s2, perm),
        "perm has shape": (codes, norms, cbs, s1, s2, perm[:-1]),
        "leaves its block": (codes, norms, cbs, s1, s2, perm.at[0].set(111)),
        "must be \\+1 or -1": (codes, norms, cbs, s1.at[3].set(0), s2, perm),
    }
    for msg, ops in cases.items():
        with pytest.raises(Exception, match=msg):
            _raw_call(x, ops, 5, 2, q.blocks)
    with pytest.raises(Exception, match="result has shape"):
        _raw_call(x, good, 6, 2, q.blocks)
    with pytest.raises(Exception, match="K=200 must be in"):
        _raw_call(jnp.ones((1, 200), jnp.float32), good, 5, 2, q.blocks)


def test_gather_rejects_out_of_range_ids():
    rng = np.random.default_rng(7)
    q = make_cq(rng, 5, 64, 4, transposed=False)
    for bad in (5, -1):
        with pytest.raises(Exception, match=r"outside \[0, 5\)"):
            np.asarray(_ffi.cq_gather(jnp.asarray([0, bad]), *operands(q), bits=4, blocks=q.blocks, K=64))


def test_threads_do_not_change_results_and_do_not_deadlock(path):
    rng = np.random.default_rng(9)
    qa, qb = make_cq(rng, 257, 576, 2, seed=1), make_cq(rng, 300, 576, 4, seed=2)
    x = jnp.asarray(rng.standard_normal((5, 576)), jnp.float32)

    @jax.jit
    def two(v):  # two independent kernel calls XLA may run concurrently on its pool
        a = _ffi.cq_matmul(v, *operands(qa), bits=2, blocks=qa.blocks)
        b = _ffi.cq_matmul(v, *operands(qb), bits=4, blocks=qb.blocks)
        return a, b

    _ffi.set_kernel_threads(1)
    one = [np.asarray(t) for t in two(x)]
    _ffi.set_kernel_threads(0)
    for _ in range(20):
        many = [np.asarray(t) for t in two(x)]
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)
