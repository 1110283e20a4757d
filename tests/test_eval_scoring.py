"""Bound forwards (weights passed to jit as arguments) score like plain closures."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cqjax.eval.scoring import LogLikelihoodScorer, SimilarityScorer, bind, from_nnx
from cqjax.eval.testing import bigram_forward, bigram_table, log_softmax_np

V = 23


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (3, 10)).astype(np.int32)
    mask = np.ones((3, 10), bool)
    mask[1, 6:] = False
    score = mask.copy()
    score[:, :2] = False
    return tokens, mask, score


def _expected(table, tokens, score):
    logp = log_softmax_np(table)
    return [sum(logp[tokens[b, t - 1], tokens[b, t]] for t in np.nonzero(score[b])[0])
            for b in range(len(tokens))]


def test_bind_equals_closure_and_hand_value():
    table = bigram_table(V)
    tokens, mask, score = _batch()
    bound = bind(lambda p, t, m: jnp.where(m[..., None], p["w"][t], jnp.nan), {"w": jnp.asarray(table)})
    a = LogLikelihoodScorer(bound)(tokens, mask, score)
    b = LogLikelihoodScorer(bigram_forward(table))(tokens, mask, score)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, _expected(table, tokens, score), rtol=1e-5)


def test_bound_params_are_jit_arguments_not_constants():
    """A closure bakes its weights into the program; a bound forward passes them as arguments."""
    big = bigram_table(300)
    tokens, mask, score = np.zeros((1, 4), np.int32), np.ones((1, 4), bool), np.ones((1, 4), bool)
    bound = LogLikelihoodScorer(bind(lambda p, t, m: p[t], jnp.asarray(big)))
    closure = LogLikelihoodScorer(bigram_forward(big))
    hlo_bound = bound._step.lower(bound._params, tokens, mask, score).as_text()
    hlo_closure = closure._step.lower(closure._params, tokens, mask, score).as_text()
    assert len(hlo_closure) > big.nbytes > 20 * len(hlo_bound)


class _Bigram(nnx.Module):
    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table))

    def __call__(self, tokens, mask):
        return self.table[...][tokens]


def test_from_nnx_and_similarity_with_itself():
    table = bigram_table(V)
    fwd = from_nnx(_Bigram(table))
    tokens, mask, score = _batch()
    got = LogLikelihoodScorer(fwd)(tokens, mask, score)
    np.testing.assert_allclose(got, _expected(table, tokens, score), rtol=1e-5)
    sim = SimilarityScorer(fwd, bigram_forward(table))(tokens, mask, score)
    assert np.abs(sim["kl"]).max() < 1e-5
    np.testing.assert_array_equal(sim["top1"], score[:, 1:].sum(1))
    np.testing.assert_allclose(sim["logp_model"], sim["logp_ref"], rtol=1e-6)
    assert sim["logp_model"] == pytest.approx(_expected(table, tokens, score), rel=1e-5)


def _positions_from_score(tokens, score):
    """(positions, targets, valid) that select the same tokens as ``score``."""
    C = int(score.sum(1).max())
    pos = np.zeros((len(tokens), C), np.int32)
    tgt = np.zeros_like(pos)
    valid = np.zeros(pos.shape, bool)
    for b in range(len(tokens)):
        t = np.nonzero(score[b])[0]
        pos[b, :len(t)], tgt[b, :len(t)], valid[b, :len(t)] = t - 1, tokens[b, t], True
    return pos, tgt, valid


def test_score_at_equals_full_scoring_for_plain_forward():
    table = bigram_table(V)
    tokens, mask, score = _batch()
    scorer = LogLikelihoodScorer(bigram_forward(table))
    got = scorer.score_at(tokens, mask, *_positions_from_score(tokens, score))
    np.testing.assert_allclose(got, scorer(tokens, mask, score), rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_score_at_with_head_split_equals_full_logits(name, tmp_path):
    """from_nnx splits a cqjax LM at its head; scoring a few positions gives the same sums."""
    pytest.importorskip("torch")
    from test_parity import CASES, write_checkpoint

    from cqjax.io import hf

    write_checkpoint(CASES[name](), tmp_path)
    model, _ = hf.load(tmp_path)
    fwd = from_nnx(model)
    assert fwd.hidden_fn is not None
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, (3, 12)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[2, 7:] = False
    score = np.zeros_like(mask)
    score[0, 9:], score[1, 3:5], score[2, 5:7] = True, True, True
    scorer = LogLikelihoodScorer(fwd)
    got = scorer.score_at(tokens, mask, *_positions_from_score(tokens, score))
    np.testing.assert_allclose(got, scorer(tokens, mask, score), rtol=1e-5, atol=1e-5)


def test_models_of_one_structure_share_compiled_steps():
    """A float model and another of the same structure (e.g. dequantized) compile once."""
    a, b = from_nnx(_Bigram(bigram_table(V))), from_nnx(_Bigram(bigram_table(V) * 2))
    sa, sb = LogLikelihoodScorer(a), LogLikelihoodScorer(b)
    assert sa._step is sb._step and SimilarityScorer(a, b)._step is SimilarityScorer(b, a)._step
    tokens, mask, score = _batch()
    assert not np.allclose(sa(tokens, mask, score), sb(tokens, mask, score))  # own weights each
    plain = bigram_forward(bigram_table(V))
    assert LogLikelihoodScorer(plain)._step is not LogLikelihoodScorer(plain)._step
