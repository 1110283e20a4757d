"""Block-by-block evaluation (StreamedLM) scores what the resident model scores."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cqjax.eval import scoring
from cqjax.eval.scoring import LogLikelihoodScorer, SimilarityScorer, from_nnx
from cqjax.eval.streamed import StreamedLM
from cqjax.io import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_gemma4 import CASES as GEMMA4, write_gemma4  # noqa: E402
from test_parity import CASES, write_checkpoint  # noqa: E402


def batches(vocab, seed=0):
    """Three batches of two shapes with padding rows and ragged masks."""
    rng = np.random.default_rng(seed)
    out = []
    for rows, t in ((2, 16), (3, 9), (2, 16)):
        tokens = rng.integers(0, vocab, size=(rows, t)).astype(np.int32)
        mask = np.ones((rows, t), bool)
        mask[-1, t // 2:] = False
        score = mask.copy()
        score[:, 0] = False
        out.append((tokens, mask, score))
    return out


def at_batches(plain):
    """score_at batches from the plain ones: two predicting positions per row."""
    out = []
    for tokens, mask, _ in plain:
        pos = np.tile(np.array([[2, 5]], np.int32), (tokens.shape[0], 1))
        out.append((tokens, mask, pos, np.take_along_axis(tokens, pos + 1, axis=1), np.ones(pos.shape, bool)))
    return out


def checkpoint(name, tmp_path):
    if name.startswith("gemma4:"):
        write_gemma4(GEMMA4[name.split(":")[1]](), tmp_path)
    else:
        write_checkpoint(CASES[name](), tmp_path)
    return hf.import_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["llama", "gemma3-softcap", "gemma4:ple-sliding-full", "gemma4:kv-shared"])
def test_float_streamed_matches_resident(name, tmp_path):
    ir = checkpoint(name, tmp_path)
    data = batches(ir.config.vocab_size)
    resident = LogLikelihoodScorer(from_nnx(hf.to_model(ir)))
    streamed = LogLikelihoodScorer(StreamedLM(ir, dtype=None))
    done = []
    got = streamed.score_batches(data, on_batch=done.append)
    assert sorted(done) == [0, 1, 2]
    for a, b in zip(got, resident.score_batches(data)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(streamed.score_at_batches(at_batches(data)), resident.score_at_batches(at_batches(data))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed(*data[1]), resident(*data[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_quantized_streamed_similarity_matches_resident(packed, tmp_path):
    from cqjax import api
    from cqjax.cli.common import quantized_forward

    ir = checkpoint("llama", tmp_path)
    q = api.quantize(tmp_path, bits=3, embed_bits=4, progress=False)
    data = batches(ir.config.vocab_size, seed=1)
    resident = SimilarityScorer(quantized_forward(q.ir, packed=packed, streamed=False), from_nnx(hf.to_model(ir)))
    # A tiny activation budget: every batch is a group of its own, and each group re-reads the blocks.
    model = StreamedLM(q.ir, packed=packed, activation_bytes=1)
    assert model.groups([(2, 16), (3, 9)]) == [[0], [1]]
    streamed = SimilarityScorer(model, StreamedLM(ir))
    mixed = SimilarityScorer(model, from_nnx(hf.to_model(ir)))  # a streamed model against a resident one
    for a, b, c in zip(streamed.score_batches(data), resident.score_batches(data), mixed.score_batches(data)):
        assert a.keys() == b.keys() == set(scoring.SIMILARITY_FIELDS)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
            np.testing.assert_allclose(c[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert float(sum(b["kl"].sum() for b in resident.score_batches(data))) > 0


def test_groups_hold_their_activation_budget(tmp_path):
    ir = checkpoint("llama", tmp_path)
    per_batch = 4 * 16 * ir.config.hidden_size * 4  # x of one [4, 16] batch in float32, side inputs on top
    model = StreamedLM(ir, activation_bytes=3 * per_batch)
    groups = model.groups([(4, 16)] * 7)
    assert [j for g in groups for j in g] == list(range(7)) and all(1 <= len(g) <= 3 for g in groups)
    assert len(StreamedLM(ir, activation_bytes=1 << 30).groups([(4, 16)] * 7)) == 1


def test_blocks_are_dropped_after_use(tmp_path):
    """Only the leaves outside the blocks stay loaded: the shell's blocks stay abstract."""
    import jax

    ir = checkpoint("llama", tmp_path)
    model = StreamedLM(ir)
    model.hidden_states([b[:2] for b in batches(ir.config.vocab_size)])
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model.shell.layers))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_chunked_head_sums_like_one_call(tmp_path, monkeypatch):
    """The head over chunks of positions (a ragged last chunk included) gives the one-call sums."""
    ir = checkpoint("llama-tied-llama3rope-bias", tmp_path)
    fwd = from_nnx(hf.to_model(ir))
    data = batches(ir.config.vocab_size, seed=2)
    whole = [LogLikelihoodScorer(fwd).score_batches(data), LogLikelihoodScorer(fwd).score_at_batches(at_batches(data))]
    scoring._JITTED.clear()
    monkeypatch.setattr(scoring, "HEAD_BYTES", 3 * 4 * ir.config.vocab_size * 2)  # 2 rows x 3 positions
    chunked = [LogLikelihoodScorer(fwd).score_batches(data), LogLikelihoodScorer(fwd).score_at_batches(at_batches(data))]
    scoring._JITTED.clear()
    for a, b in zip(sum(whole, []), sum(chunked, [])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_streamed_needs_a_split_partner(tmp_path):
    ir = checkpoint("llama", tmp_path)
    plain = lambda tokens, mask: np.zeros(tokens.shape + (ir.config.vocab_size,), np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="split at its output head"):
        SimilarityScorer(StreamedLM(ir), plain)


def test_command_line_process_runs_without_torch():
    """python -m cqjax hides torch, so transformers loads tokenizers without importing it."""
    code = ("import sys, cqjax.__main__ as m; m._without_torch(); import transformers; "
            "from cqjax.eval.testing import tiny_tokenizer; tiny_tokenizer(); "
            "assert sys.modules['torch'] is None; print('ok')")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "PyTorch was not found" not in proc.stderr
