"""Generation with a KV cache agrees with full recomputation and with transformers."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import runtime
from cqjax.io import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_parity import CASES, write_checkpoint  # noqa: E402


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_matches_recompute_and_transformers(name, tmp_path):
    ref = write_checkpoint(CASES[name](), tmp_path)
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
