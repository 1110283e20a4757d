"""Multiple-choice scoring against hand-computed NumPy values, and the real task files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cqjax.eval import multiple_choice as mc
from cqjax.eval.scoring import LogLikelihoodScorer
from cqjax.eval.testing import bigram_forward, bigram_table, log_softmax_np, tiny_tokenizer

DOCS = [
    mc.MCDoc(0, "Question: Which technology was developed most recently?\nAnswer:",
             (" cellular telephone", " television", " the lazy dog"), 0),
    mc.MCDoc(1, "A man is sitting on a roof. He", (" starts pulling up roofing on a roof.", " jumps."), 1),
    mc.MCDoc(2, "Goal: How do I ready a guinea pig cage? ", ("Answer: paper", "Answer: Provide bedding"), 1),
]


def _task(tok, docs, buckets=(16, 32, 64), tokens_per_batch=64, bos=None):
    requests = [(d.context, c) for d in docs for c in d.continuations]
    packed = mc.pack_requests(tok, requests, max_len=max(buckets), bos=bos)
    protocol = {"buckets": list(buckets), "tokens_per_batch": tokens_per_batch}
    return mc.MCTaskData("toy", docs, packed, protocol)


def _expected_ll(tok, table, context, continuation, bos=True, max_len=None):
    """Hand computation: BOS + tokenize(context) + tokenize(continuation), bigram log-probs."""
    logp = log_softmax_np(table)
    ctx, cont = context.rstrip(), context[len(context.rstrip()):] + continuation
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id] if bos else []
    if max_len is not None and len(head) + len(ctx_ids) + len(cont_ids) > max_len:
        ctx_ids = ctx_ids[len(ctx_ids) - (max_len - len(head) - len(cont_ids)):]
    seq = head + ctx_ids + cont_ids
    n = len(cont_ids)
    return sum(logp[seq[i - 1], seq[i]] for i in range(len(seq) - n, len(seq)))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("tokens_per_batch", [16, 64, 1000])
def test_loglikelihoods_and_accuracy_exact(tok, tokens_per_batch):
    table = bigram_table(len(tok), seed=3)
    data = _task(tok, DOCS, tokens_per_batch=tokens_per_batch)
    res = mc.evaluate_task(bigram_forward(table), data, progress=False)
    correct = correct_pc = 0
    for d, got in zip(DOCS, res.loglikelihoods):
        want = [_expected_ll(tok, table, d.context, c) for c in d.continuations]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        correct += int(np.argmax(want) == d.label)
        correct_pc += int(np.argmax(np.asarray(want) / [len(c) for c in d.continuations]) == d.label)
    assert res.n == 3
    assert res.acc == pytest.approx(correct / 3) and res.acc_per_char == pytest.approx(correct_pc / 3)
    assert res.stderr == pytest.approx(math.sqrt(res.acc * (1 - res.acc) / 3))


def test_trailing_space_moves_to_continuation(tok):
    assert mc.split_whitespace("Cage? ", "Answer") == ("Cage?", " Answer")
    packed = mc.pack_requests(tok, [("Cage? ", "Answer"), ("Cage?", " Answer")], max_len=64)
    np.testing.assert_array_equal(packed.rows[0], packed.rows[1])
    assert packed.rows[0][0] == tok.bos_token_id and packed.bos


def test_left_truncation_keeps_bos_and_continuation(tok):
    table = bigram_table(len(tok), seed=4)
    long_context = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    doc = mc.MCDoc(0, long_context, (" cellular telephone",), 0)
    data = _task(tok, [doc], buckets=(16,))
    assert data.packed.truncated == 1 and len(data.packed.rows[0]) == 16
    assert data.packed.rows[0][0] == tok.bos_token_id
    res = mc.evaluate_task(bigram_forward(table), data, progress=False)
    want = _expected_ll(tok, table, doc.context, doc.continuations[0], max_len=16)
    assert res.loglikelihoods[0][0] == pytest.approx(want, rel=1e-5)


def test_fixed_shapes_one_compile_per_bucket(tok):
    calls = []
    table = bigram_table(len(tok))
    fwd = bigram_forward(table)

    def counting(tokens, mask):  # runs once per trace, i.e. per compiled shape
        calls.append(tokens.shape)
        return fwd(tokens, mask)

    data = _task(tok, DOCS * 5, buckets=(16, 32, 64), tokens_per_batch=64)
    mc.evaluate_task(LogLikelihoodScorer(counting), data, progress=False)
    assert len(calls) == len(set(calls)) and set(calls) <= {(4, 16), (2, 32), (1, 64)}


def test_no_bos_tokenizer_scores_without_bos():
    tok = tiny_tokenizer(bos=False)
    table = bigram_table(len(tok), seed=5)
    data = _task(tok, DOCS[:2])
    assert not data.packed.bos
    res = mc.evaluate_task(bigram_forward(table), data, progress=False)
    want = _expected_ll(tok, table, DOCS[0].context, DOCS[0].continuations[1], bos=False)
    assert res.loglikelihoods[0][1] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name,k", [("arc_easy", 4), ("piqa", 2), ("hellaswag", 4)])
def test_real_task_files(name, k):
    docs = mc.load_docs(name, limit=30)
    assert len(docs) == 30 and len({d.doc_id for d in docs}) == 30
    assert all(len(d.continuations) >= 2 and 0 <= d.label < len(d.continuations) for d in docs)
    assert sum(len(d.continuations) == k for d in docs) >= 25
    assert all(c.startswith(" ") for d in docs for c in d.continuations)
    assert not any(d.context.endswith(" ") for d in docs)


def test_default_sizes_reach_1000_docs():
    for name in ("arc_easy", "piqa", "hellaswag"):
        assert len(mc.load_docs(name, limit=1000)) == 1000


def test_zero_shot_from_doc_matches_rc_0shot_file(monkeypatch):
    file_docs = mc.load_docs("arc_easy_val", limit=None)
    spec = mc.TaskSpec("arc_easy", "rc_0shot", True, "validation")
    monkeypatch.setitem(mc.TASKS, "arc_easy_val_rebuilt", spec)
    rebuilt = mc.load_docs("arc_easy_val_rebuilt", limit=None)
    assert len(file_docs) == 570 and file_docs == rebuilt


def test_prepare_task_protocol_deterministic(tok):
    a = mc.prepare_task(tok, "piqa", limit=20, buckets=(64, 128, 256))
    b = mc.prepare_task(tok, "piqa", limit=20, buckets=(64, 128, 256))
    assert a.protocol == b.protocol
    assert a.protocol["docs"] == 20 and a.protocol["requests_n"] == 40
    assert a.protocol["source"] == "piqa/rc_0shot"
    c = mc.prepare_task(tok, "piqa", limit=21, buckets=(64, 128, 256))
    assert c.protocol["tokens_sha256"] != a.protocol["tokens_sha256"]


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="nonexistent"):
        mc.load_docs("nonexistent")
