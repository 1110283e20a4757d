"""The quantized runtime's kernel switch: ``auto`` uses the C++ kernel on CPU for real-sized
layers, ``jax`` is the exact pure-JAX path, ``ffi`` forces the kernel; the choice is made at
trace time and the embedding lookup is exact either way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import _ffi
from cqjax.kernels import backend
from test_kernel_support import float_model, make_cq, operands, rel_rms


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(0)
    q = make_cq(rng, 300, 576, 3)  # 172,800 weights >= AUTO_MIN_WEIGHTS
    x = jnp.asarray(rng.standard_normal((2, 576)), jnp.float32)
    return q, x


def _matmul(q, x):
    return jax.jit(lambda q, x: q.matmul(x))(q, x)


def test_modes_pick_the_implementation(big):
    q, x = big
    kernel = np.asarray(_ffi.cq_matmul(x, *operands(q), bits=3, blocks=q.blocks))
    exact = np.asarray(jax.jit(lambda q, x: q._dot_rows_jnp(x))(q, x))
    assert not np.array_equal(kernel, exact)  # int8 activations: close, not equal
    assert rel_rms(kernel, exact) < 3e-2
    with backend.use_kernel("jax"):
        np.testing.assert_array_equal(np.asarray(_matmul(q, x)), exact)
    with backend.use_kernel("ffi"):
        np.testing.assert_array_equal(np.asarray(_matmul(q, x)), kernel)
    with backend.use_kernel("auto"):  # CPU: the kernel
        np.testing.assert_array_equal(np.asarray(_matmul(q, x)), kernel)
    assert backend.kernel_mode() in backend.MODES


def test_auto_keeps_tiny_layers_on_the_exact_path():
    rng = np.random.default_rng(1)
    q = make_cq(rng, 7, 40, 2)
    x = jnp.asarray(rng.standard_normal((1, 40)), jnp.float32)
    exact = np.asarray(jax.jit(lambda q, x: q._dot_rows_jnp(x))(q, x))
    with backend.use_kernel("auto"):
        np.testing.assert_array_equal(np.asarray(_matmul(q, x)), exact)
    with backend.use_kernel("ffi"):
        assert rel_rms(np.asarray(_matmul(q, x)), float_model(np.asarray(x), q)) < 3e-2


def test_embedding_lookup_and_attend(big):
    q, _ = big
    table = q.replace(transposed=False)
    ids = jnp.asarray([[0, 299, 5]], jnp.int32)
    with backend.use_kernel("jax"):
        ref = np.asarray(jax.jit(lambda t, i: t.take_rows(i))(table, ids))
    with backend.use_kernel("ffi"):
        got = np.asarray(jax.jit(lambda t, i: t.take_rows(i))(table, ids))
        h = jnp.ones((1, 2, 576), jnp.bfloat16)
        logits = jax.jit(lambda t, h: t.attend(h))(table, h)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert logits.shape == (1, 2, 300) and logits.dtype == jnp.bfloat16


def test_set_kernel_and_bad_modes(monkeypatch):
    backend.set_kernel("jax")
    try:
        assert backend.kernel_mode() == "jax"
        with backend.use_kernel("ffi"):
            assert backend.kernel_mode() == "ffi"
    finally:
        backend.set_kernel(None)
    monkeypatch.setenv("CQJAX_KERNEL", "gpu")
    with pytest.raises(ValueError, match="CQJAX_KERNEL='gpu'"):
        backend.kernel_mode()
    with pytest.raises(ValueError, match="use_kernel"):
        with backend.use_kernel("fast"):
            pass


@pytest.mark.parametrize("mode", ["jax", "ffi"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_come_out_non_finite(big, mode, bad):
    """NaN in, NaN out on both runtime paths: the kernel's int8 activation quantizer must not
    turn a NaN or an infinity into finite numbers; other rows are untouched."""
    q, x = big
    x = x.at[1, 100].set(bad)
    with backend.use_kernel(mode):
        y = np.asarray(_matmul(q, x))
    assert not np.isfinite(y[1]).any() and np.isfinite(y[0]).all()


def test_dot_operands_follow_the_dot_dtype_and_accumulate_in_float32():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal((40, 7)).astype(np.float32)
    assert backend.dot_dtype() == "float32"
    np.testing.assert_array_equal(np.asarray(backend.dot(x, w)), np.asarray(jnp.einsum("mk,kn->mn", x, w)))
    with backend.use_dot_dtype("bfloat16"):
        assert backend.dot_dtype() == "bfloat16"
        got = backend.dot(x, w)
    assert got.dtype == jnp.float32 and backend.dot_dtype() == "float32"
    rounded = jnp.asarray(x, jnp.bfloat16).astype(jnp.float32) @ jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(rounded), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), x @ w, rtol=1e-6, atol=1e-6)  # the operands were rounded
    with pytest.raises(ValueError, match="dot dtype 'float16'"):
        with backend.use_dot_dtype("float16"):
            pass
