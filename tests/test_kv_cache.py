"""The quantized KV cache (runtime.kv_bits): its codes are the CQ reference quantizer's on the
rotated head vectors (odd head dims padded), attention through it matches the float cache
within what its width allows, decoding runs through it, and models that cannot read it say so;
a bfloat16 cache (kv_bits=16) is read by the C++ kernel, checked against the JAX attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import runtime
from cqjax.formats.rotation import make_rotation, rotate_rows_np
from cqjax.io import hf
from cqjax.kv_cache import QuantizedKVCache, cache_bytes_per_token
from cqjax.passes import codebook_core
from test_import_errors import write
from test_tune import CFG, _weights


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_codes_are_the_reference_quantizer_on_rotated_vectors(bits, head_dim):
    cache = QuantizedKVCache.empty(1, 4, 2, head_dim, bits)
    x = np.random.default_rng(head_dim).standard_normal((3, 5, 2, head_dim)).astype(np.float32)
    codes, norms = cache.encode(jnp.asarray(x))
    P = cache.padded_dim
    rot = make_rotation(P, (P,), 0)
    rows = rotate_rows_np(x.reshape(-1, head_dim).astype(np.float64), rot).astype(np.float32)
    ref_codes, ref_norms = codebook_core.quantize_rows(rows, (P,), [np.asarray(cache.levels)])
    got = np.asarray(cache.decode(codes, norms)).reshape(-1, P)
    ref = codebook_core.dequantize_rows(ref_codes, np.asarray(norms).reshape(-1, 1), (P,), [np.asarray(cache.levels)])
    assert np.mean(np.abs(got - ref) < 1e-5) > 0.999  # ties at a midpoint may round either way
    np.testing.assert_allclose(np.asarray(norms).reshape(-1), np.asarray(ref_norms, np.float32).reshape(-1), rtol=1e-3)
    # attention is invariant to the rotation: R q · R k = q · k
    q = jnp.asarray(x[:1, :1])  # [B, T, H, head_dim]; an empty cache's mean value is 0
    np.testing.assert_allclose(float(jnp.sum(cache.query(q) ** 2)), float(jnp.sum(q ** 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.output(cache.query(q))), x[:1, :1], atol=1e-5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ir = hf.import_checkpoint(write(tmp_path_factory.mktemp("kv") / "ckpt", config=CFG, weights=_weights()))
    return hf.to_model(ir)


def _kl(p_logits, q_logits) -> float:
    p, q = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_attention_through_the_cache_matches_the_float_model(model):
    tokens = np.random.default_rng(1).integers(0, 37, (2, 40)).astype(np.int32)
    ref = model(tokens)
    np.testing.assert_allclose(np.asarray(runtime.cached_logits(model, tokens)), np.asarray(ref), atol=1e-4)
    kl16 = _kl(ref, runtime.cached_logits(model, tokens, kv_bits=16))
    kl8 = _kl(ref, runtime.cached_logits(model, tokens, kv_bits=8))
    kl4 = _kl(ref, runtime.cached_logits(model, tokens, kv_bits=4))
    assert 0 < kl16 < 1e-4 and kl8 < 1e-4 and kl8 < kl4 < 2e-2, (kl16, kl8, kl4)


@pytest.mark.parametrize("s, dv, softcap", [(37, 40, None), (83, 72, None), (83, 72, 2.0)])
def test_the_bfloat16_cache_kernel_is_the_reference_attention(s, dv, softcap):
    """cqjax_attention_bf16 on every kernel path this CPU runs against the pure-JAX attention on
    the widened cache: odd sizes (slots and value widths past 64- and 16-wide column blocks),
    two new positions, grouped heads, a ragged mask with a row that attends nothing (padding)."""
    from cqjax import _ffi
    from cqjax.models import layers

    rng = np.random.default_rng(5)
    b, kv, g, t, d = 2, 3, 3, 2, 24
    qg = jnp.asarray(rng.standard_normal((b * kv, g * t, d)), jnp.float32)
    bits = lambda shape: jax.lax.bitcast_convert_type(  # noqa: E731
        jnp.asarray(rng.standard_normal(shape) * 2, jnp.bfloat16), jnp.uint16)
    k, v = bits((b * kv, d, s)), bits((b * kv, s, dv))
    mask = rng.random((b, t, s)) < 0.6
    mask[1, 0] = False
    mask = jnp.asarray(mask)
    ref = layers._attend(qg, mask, k, v, 0.2, softcap)  # widened to float32
    paths = [p for p, ok in _ffi.kernel_paths().items() if ok]
    try:
        for path in paths:
            _ffi.set_kernel_path(path)
            got = _ffi.attention_bf16(qg, k, v, mask, scale=0.2, softcap=softcap)
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5, err_msg=path)
    finally:
        _ffi.set_kernel_path(None)
    assert "ref" in paths


def test_a_bfloat16_cache_decodes_in_place(model):
    """kv_bits=16: a decode step reads every layer's keys and values in the kernel and writes
    the new entry in place (no copy or widening of a whole cache in the compiled step)."""
    import re

    from cqjax.kernels import backend

    with backend.use_kernel("ffi"):
        dec = runtime.Decoder(model, batch=1, max_len=20, kv_bits=16)
        nxt = dec.prefill(np.arange(1, 9, dtype=np.int32)[None])
        args = (dec._leaves, dec.caches, nxt[:, None], np.ones((1, 1), bool), np.full((1, 1), 8, np.int32), dec._key)
        hlo = dec._step.lower(*args).compile().as_text()
    shapes = {"u16[%s]" % ",".join(map(str, c.shape)) for cache in dec.caches for c in (cache.k, cache.v)}
    whole = [line for line in hlo.splitlines() if re.search(r"= (\S+)\{[^}]*\} (copy|convert)\(", line)
             and re.search(r"= (\S+)\{", line).group(1).replace("f32", "u16") in shapes]
    assert hlo.count('custom_call_target="cqjax_attention_bf16"') == len(dec.caches) and not whole, whole


def test_decoding_reads_the_quantized_cache(model):
    prompt = np.random.default_rng(2).integers(0, 37, (1, 12)).astype(np.int32)
    plain = runtime.generate(model, prompt, max_new_tokens=8)
    assert np.array_equal(runtime.generate(model, prompt, max_new_tokens=8, kv_bits=8), plain)
    from cqjax.kernels import backend

    for mode in ("ffi", "jax"):  # a bfloat16 cache, read by the kernel and in pure JAX
        with backend.use_kernel(mode):
            assert np.array_equal(runtime.generate(model, prompt, max_new_tokens=8, kv_bits=16), plain)
    dec = runtime.Decoder(model, batch=1, max_len=20, kv_bits=4)
    dec.prefill(prompt)
    per_token = cache_bytes_per_token(dec.caches)
    float_per_token = cache_bytes_per_token(runtime.empty_caches(model, 1, 20))
    # head_dim 32: 16 code bytes + 4 norm bytes per head vector against 128 float bytes
    assert per_token * 128 == float_per_token * 20


def test_unsupported_widths_and_attention_are_named(model):
    with pytest.raises(ValueError, match="runtime.kv_bits=3"):
        runtime.empty_caches(model, 1, 4, kv_bits=3)

    class Other:
        num_kv_heads, head_dim = 1, 8

    class Layer:
        self_attn = Other()

    class Model:
        layers = [Layer()]

    with pytest.raises(ValueError, match="reads only a float cache"):
        runtime.empty_caches(Model(), 1, 4, kv_bits=8)


def test_a_shared_offset_costs_no_code_range():
    """Keys and values that share a large offset (an attention sink's direction) are quantized
    around the prompt's mean: their error is that of the spread, not of the offset."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal((1, 8, 1, 16)).astype(np.float32) + 50 * rng.standard_normal(16).astype(np.float32)
    pos, valid = jnp.arange(8)[None], jnp.ones((1, 8), bool)
    errors = {}
    for center in (True, False):
        cache = QuantizedKVCache.empty(1, 8, 1, 16, 4, center_keys=center)
        keys, values, _, _, new = cache.update(jnp.asarray(k), jnp.asarray(k), pos, valid)
        keys, values = keys.swapaxes(1, 2)[:, :, None], values[:, :, None]  # [B·KV, P, S], [B·KV, S, P] -> [B, S, KV, P]
        exact = new.query(jnp.asarray(k)) - new.k_mean[:, None]
        errors[center] = float(jnp.linalg.norm(keys - exact) / jnp.linalg.norm(exact - exact.mean(1)))
        # values are always centered, and output() adds the mean back
        out = new.output(jnp.mean(values, axis=1, keepdims=True))
        np.testing.assert_allclose(np.asarray(out)[0, 0], k[0].mean(0), rtol=0.05, atol=0.05 * np.abs(k).max())
    assert errors[True] < 0.2 < 5 * errors[True] < errors[False], errors
