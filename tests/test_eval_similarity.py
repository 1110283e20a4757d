"""KL(ref || model), top-1 agreement and both perplexities in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax.eval.perplexity import perplexity
from cqjax.eval.similarity import similarity
from cqjax.eval.testing import SENTENCES, bigram_forward, bigram_table, log_softmax_np, tiny_tokenizer
from cqjax.eval.texts import TextSource
from cqjax.eval.windows import prepare_windows

TEXT = TextSource("test", "\n\n".join(SENTENCES * 2))


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tok, prepare_windows(tok, TEXT, context=16, max_tokens=100)


def test_model_against_itself(setup):
    tok, win = setup
    fwd = bigram_forward(bigram_table(len(tok)))
    res = similarity(fwd, fwd, win, batch_size=3, progress=False)
    assert abs(res.kl) < 1e-6 and res.top1 == 1.0
    assert res.perplexity == pytest.approx(res.ref_perplexity, rel=1e-7)
    assert res.perplexity == pytest.approx(perplexity(fwd, win, progress=False).perplexity, rel=1e-6)


def test_kl_top1_exact(setup):
    tok, win = setup
    ref_t, mod_t = bigram_table(len(tok), seed=0), bigram_table(len(tok), seed=0)
    rng = np.random.default_rng(7)
    mod_t = (mod_t + rng.standard_normal(mod_t.shape).astype(np.float32) * 1.5)
    res = similarity(bigram_forward(mod_t), bigram_forward(ref_t), win, batch_size=2, progress=False)
    lr, lm = log_softmax_np(ref_t), log_softmax_np(mod_t)
    kl_row = (np.exp(lr) * (lr - lm)).sum(-1)
    top1_row = lr.argmax(-1) == lm.argmax(-1)
    kl = top1 = nll_m = nll_r = 0.0
    for k in range(win.tokens.shape[0]):
        for t in np.nonzero(win.score[k])[0]:
            prev, cur = win.tokens[k, t - 1], win.tokens[k, t]
            kl += kl_row[prev]
            top1 += top1_row[prev]
            nll_m -= lm[prev, cur]
            nll_r -= lr[prev, cur]
    n = win.num_scored
    assert res.tokens == n == 100
    assert res.kl == pytest.approx(kl / n, rel=1e-4) and res.kl > 0.1
    assert res.top1 == pytest.approx(top1 / n)
    assert res.nll == pytest.approx(nll_m / n, rel=1e-5) and res.ref_nll == pytest.approx(nll_r / n, rel=1e-5)


def test_kl_ignores_impossible_reference_tokens(setup):
    tok, win = setup
    ref_t = bigram_table(len(tok))
    ref_t[:, :5] = -np.inf  # p_ref = 0 on some tokens: 0 * log 0 must count as 0, not NaN
    res = similarity(bigram_forward(ref_t), bigram_forward(ref_t), win, progress=False)
    assert np.isfinite(res.kl) and abs(res.kl) < 1e-6
