"""Generation with a KV cache agrees with full recomputation and with transformers."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import runtime
from cqjax.io import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_parity import CASES, QK_GAIN, write_checkpoint  # noqa: E402


# mistral-sliding and gemma2: decoding runs past the sliding window; qwen3_moe: routed experts.
@pytest.mark.parametrize("name", ["llama", "gemma3", "mistral-sliding", "gemma2", "qwen3_moe"])
def test_greedy_matches_recompute_and_transformers(name, tmp_path):
    ref = write_checkpoint(CASES[name](), tmp_path, qk_gain=QK_GAIN.get(name, 1.0))
    model, _ = hf.load(tmp_path)
    prompt = np.array([[5, 17, 3, 42, 8, 9, 60]], np.int32)
    out = runtime.generate(model, prompt, max_new_tokens=8)
    # Recompute every step without a cache.
    forward = runtime.forward_fn(model)
    ids = prompt
    for _ in range(8):
        logits = np.asarray(forward(ids, np.ones_like(ids, bool)))
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(out, ids)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)
    np.testing.assert_array_equal(out, theirs.numpy())


def test_sampling_is_seeded(tmp_path):
    write_checkpoint(CASES["qwen3"](), tmp_path)
    model, _ = hf.load(tmp_path)
    a = runtime.generate(model, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_k=5, seed=3)
    b = runtime.generate(model, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 9)


@pytest.mark.parametrize("name", ["kv-shared", "k-eq-v", "ple-sliding-full"])
def test_gemma4_cached_generation_matches_recompute(name, tmp_path):
    from test_gemma4 import CASES as GEMMA4, write_gemma4

    write_gemma4(GEMMA4[name](), tmp_path)
    model, _ = hf.load(tmp_path)
    prompt = np.array([[5, 17, 3, 42, 8, 9]], np.int32)
    out = runtime.generate(model, prompt, max_new_tokens=5)
    forward, ids = runtime.forward_fn(model), prompt
    for _ in range(5):
        logits = np.asarray(forward(ids, np.ones_like(ids, bool)))
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(out, ids)


def test_pure_jax_runtime_layout_generates_the_same_tokens(tmp_path):
    """runtime.prepare puts CQ leaves that run in pure JAX in the column layout; greedy tokens
    and logits stay those of the row layout."""
    from cqjax import api
    from cqjax.kernels import backend
    from cqjax.kernels.columns import CQColumns

    write_checkpoint(CASES["llama"](), tmp_path)
    q = api.quantize(tmp_path, bits=3, embed_bits=4, progress=False)
    prompt = np.array([[5, 17, 3, 42]], np.int32)
    with backend.use_kernel("jax"):
        prepared = runtime.prepare(q.model)
        kernel = prepared.layers[0].mlp.down_proj.kernel.get_value()
        assert isinstance(kernel, CQColumns)
        a = runtime.forward_fn(q.model)(prompt, np.ones_like(prompt, bool))
        b = runtime.forward_fn(prepared)(prompt, np.ones_like(prompt, bool))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        out = runtime.generate(q.model, prompt, max_new_tokens=6)
    with backend.use_kernel("ffi"):  # the kernel reads rows: nothing is converted
        assert runtime.prepare(q.model) is q.model
    with backend.use_kernel("jax"):
        dec = runtime.Decoder(q.model, batch=1, max_len=10)
        nxt = dec.prefill(prompt)
        steps = [nxt]
        for _ in range(5):
            nxt = dec.step(nxt)
            steps.append(nxt)
        np.testing.assert_array_equal(np.concatenate(steps), out[0, 4:])
        dec.step(nxt)  # the 10th position: the cache is full
        with pytest.raises(ValueError, match="max_len=10"):
            dec.step(nxt)


def test_set_threads_checks_its_value():
    import os

    with pytest.raises(ValueError, match="runtime.threads=0"):
        runtime.set_threads(0)
    with pytest.raises(ValueError, match="runtime.threads"):
        runtime.set_threads(len(os.sched_getaffinity(0)) + 1)
    runtime.set_threads(None)  # all cores: nothing changes
