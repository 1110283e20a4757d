"""Perplexity windows and scoring against hand-computed NumPy values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cqjax.eval.perplexity import perplexity
from cqjax.eval.windows import plan_windows, prepare_windows
from cqjax.eval.scoring import LogLikelihoodScorer
from cqjax.eval.testing import (
    SENTENCES,
    bigram_forward,
    bigram_table,
    log_softmax_np,
    prefix_forward,
    prefix_logits_np,
    tiny_tokenizer,
)
from cqjax.eval.texts import TextSource

TEXT = TextSource("test", "\n\n".join(SENTENCES * 3))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("context,stride,bos,max_tokens", [
    (8, None, 1, None), (8, 3, 1, None), (8, None, None, None), (8, 2, None, None),
    (5, None, 1, 11), (9, 4, None, 20),
])
def test_every_token_scored_once_with_its_true_prefix(context, stride, bos, max_tokens):
    ids = np.arange(100, 137)
    tokens, mask, score = plan_windows(ids, context=context, stride=stride, bos_id=bos, max_tokens=max_tokens)
    assert tokens.shape[1] == context and not score[:, 0].any()
    assert not (score & ~mask).any()
    scored_positions = []
    for k in range(tokens.shape[0]):
        row = tokens[k][mask[k]]
        body = row[1:] if bos is not None else row
        if bos is not None:
            assert row[0] == bos
        begin = int(body[0]) - 100
        np.testing.assert_array_equal(body, ids[begin:begin + len(body)])  # contiguous text
        for t in np.nonzero(score[k])[0]:
            scored_positions.append(int(tokens[k, t]) - 100)
    first = 0 if bos is not None else 1
    expected = list(range(first, len(ids)))[:max_tokens]
    assert scored_positions == expected  # each scorable token exactly once, in order


def test_stride_scores_last_stride_tokens_and_context_is_full():
    tokens, mask, score = plan_windows(np.arange(30), context=8, stride=3, bos_id=None, max_tokens=None)
    for k in range(1, tokens.shape[0] - 1):
        assert mask[k].all() and score[k].sum() == 3 and score[k, -3:].all()


def test_bad_stride_raises():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(np.arange(30), context=8, stride=8, bos_id=1)


def _expected_bigram_nll(ids, table, context, bos_id):
    """Hand computation straight from the token stream: non-overlapping windows with BOS."""
    logp = log_softmax_np(table)
    n_text = context - 1
    total, n = 0.0, 0
    for p in range(len(ids)):
        prev = bos_id if p % n_text == 0 else ids[p - 1]
        total += logp[prev, ids[p]]
        n += 1
    return -total / n


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bigram_perplexity_exact(tok, batch_size):
    table = bigram_table(len(tok))
    win = prepare_windows(tok, TEXT, context=16, max_tokens=None)
    ids = tok(TEXT.text, add_special_tokens=False)["input_ids"]
    assert win.protocol["scored_tokens"] == len(ids) and win.protocol["bos"]
    res = perplexity(bigram_forward(table), win, batch_size=batch_size, progress=False)
    want = _expected_bigram_nll(ids, table, 16, tok.bos_token_id)
    assert res.nll == pytest.approx(want, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert res.tokens == len(ids)


def test_prefix_model_perplexity_exact_with_stride_and_padding(tok):
    """A causal, position-dependent fake: a misaligned window or padding leak would show."""
    rng = np.random.default_rng(1)
    V = len(tok)
    table, emb, out = bigram_table(V, seed=2), rng.standard_normal((V, 8)).astype(np.float32), \
        rng.standard_normal((8, V)).astype(np.float32)
    win = prepare_windows(tok, TEXT, context=12, stride=5, max_tokens=123)
    res = perplexity(prefix_forward(table, emb, out), win, batch_size=4, progress=False)
    total = 0.0
    for k in range(win.tokens.shape[0]):
        row = win.tokens[k][win.mask[k]]
        logp = log_softmax_np(prefix_logits_np(table, emb, out, row))
        for t in np.nonzero(win.score[k])[0]:
            total += logp[t - 1, row[t]]
    assert res.tokens == 123
    assert res.nll == pytest.approx(-total / 123, rel=1e-5)


def test_padded_row_equals_unpadded(tok):
    """The same window scored alone (exact length) and right-padded in a larger batch."""
    V = len(tok)
    fwd = bigram_forward(bigram_table(V))
    scorer = LogLikelihoodScorer(fwd)
    row = np.asarray([tok.bos_token_id] + tok.encode(SENTENCES[0]), np.int32)
    L = len(row)
    score = np.ones((1, L), bool)
    score[0, 0] = False
    alone = scorer(row[None], np.ones((1, L), bool), score)[0]
    T = L + 7
    tok_p = np.zeros((2, T), np.int32); tok_p[0, :L] = row; tok_p[1, :5] = row[:5]
    mask_p = np.zeros((2, T), bool); mask_p[0, :L] = True; mask_p[1, :5] = True
    score_p = np.zeros((2, T), bool); score_p[0, 1:L] = True
    padded = scorer(tok_p, mask_p, score_p)
    assert np.isfinite(alone) and padded[0] == pytest.approx(alone, rel=1e-6)
    assert padded[1] == 0.0


def test_protocol_is_deterministic_and_describes_the_run(tok):
    a = prepare_windows(tok, TEXT, context=16, max_tokens=50)
    b = prepare_windows(tok, TextSource("test", TEXT.text), context=16, max_tokens=50)
    assert a.protocol == b.protocol
    np.testing.assert_array_equal(a.tokens, b.tokens)
    p = a.protocol
    assert p["text"] == {"source": "test", "chars": len(TEXT.text), "sha256": TEXT.sha256}
    assert p["tokenizer"] == {"name": "tiny-bpe", "vocab_size": len(tok), "bos_token_id": tok.bos_token_id}
    got = (p["context"], p["stride"], p["bos"], p["max_tokens"], p["scored_tokens"])
    assert got == (16, 15, True, 50, 50)
    assert p["windows"] == 4
    c = prepare_windows(tok, TEXT, context=16, max_tokens=51)
    assert c.protocol["tokens_sha256"] != p["tokens_sha256"]


def test_no_bos_tokenizer():
    tok = tiny_tokenizer(bos=False)
    win = prepare_windows(tok, TEXT, context=16, max_tokens=None)
    ids = tok(TEXT.text, add_special_tokens=False)["input_ids"]
    assert not win.protocol["bos"] and win.num_scored == len(ids) - 1
    table = bigram_table(len(tok))
    res = perplexity(bigram_forward(table), win, progress=False)
    logp = log_softmax_np(table)
    want = -np.mean([logp[ids[p - 1], ids[p]] for p in range(1, len(ids))])
    assert res.nll == pytest.approx(want, rel=1e-5)
