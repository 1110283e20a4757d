"""BERT sentence encoders: parity with transformers, the packaged all-MiniLM-L6-v2, quantized
runtimes, the retrieval/cosine evaluation and the CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cqjax  # noqa: E402
from cqjax import data, runtime  # noqa: E402
from cqjax.calib.sequences import from_text  # noqa: E402
from cqjax.errors import CheckpointError, ConfigError  # noqa: E402
from cqjax.eval import embeddings  # noqa: E402
from cqjax.io import hf  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.models.bert import bert_hf_name, mean_pool  # noqa: E402
from test_cli import cqjax as run_cli  # noqa: E402

# Odd sizes: 3 heads of 12, an intermediate size that is no power of two.
TINY = dict(vocab_size=211, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70,
            max_position_embeddings=40, type_vocab_size=2)


def _rows(rng, vocab, lengths, width):
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = True
    return tokens, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("bert") / "tiny"
    ref.save_pretrained(path)
    return path, ref


def _theirs(ref, tokens, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


def test_tiny_bert_matches_transformers_on_ragged_rows(tiny):
    path, ref = tiny
    tokens, mask = _rows(np.random.default_rng(0), TINY["vocab_size"], [13, 7, 1], 13)
    model, ir = hf.load(path)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    diff = np.abs(ours - _theirs(ref, tokens, mask))[mask]
    assert diff.max() < 1e-5, diff.max()
    assert ir.family == "bert" and ir.meta["layers/1/intermediate/kernel"].shape == (36, 70)
    assert ir.meta["embeddings/word_embeddings/embedding"].role == "embedding"
    assert ir.meta["embeddings/position_embeddings/embedding"].role == "other"  # added to every token: float
    assert ir.meta["layers/0/attention/query/kernel"].hf_name == "encoder.layer.0.attention.self.query.weight"
    assert "pooler" not in " ".join(ir.meta)  # the [CLS] pooler is not part of a mean-pooling encoder


def test_hf_names_cover_every_parameter_and_unknown_paths_fail():
    assert bert_hf_name("layers/3/output_norm/bias", None) == "encoder.layer.3.output.LayerNorm.bias"
    assert bert_hf_name("layers/0/attention/output/kernel", None) == "encoder.layer.0.attention.output.dense.weight"
    with pytest.raises(KeyError, match="layers/0/mlp/kernel"):
        bert_hf_name("layers/0/mlp/kernel", None)


@pytest.mark.parametrize("key, value, needle", [
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("hidden_act", "relu", "hidden_act"),
    ("is_decoder", True, "is_decoder"),
])
def test_configs_that_change_the_math_are_refused_by_key(tiny, tmp_path, key, value, needle):
    path, _ = tiny
    raw = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, key: value}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises((ConfigError, CheckpointError), match=needle):
        hf.import_checkpoint(tmp_path)


def test_mean_pool_ignores_padding_and_normalizes():
    h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 4)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = np.asarray(mean_pool(h, mask))
    want = np.asarray(h[0, :3].mean(0))
    np.testing.assert_allclose(out[0], want / np.linalg.norm(want), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["jax", "ffi"])
def test_quantized_tiny_encoder_runs_through_each_runtime(tiny, kernel):
    """The packed runtime (the C++ kernels, or pure JAX) computes what the decoded weights do (the
    kernels round activations to int8 per block: cqjax.kernels.backend)."""
    path, _ = tiny
    if kernel == "ffi" and not backend.ffi_available():
        pytest.skip("the compiled extension is not available")
    q = cqjax.quantize(path, bits=3, embed_bits=4, progress=False)
    tokens, mask = _rows(np.random.default_rng(2), TINY["vocab_size"], [11, 4], 11)
    want = np.asarray(runtime.dequantized_model(q.ir).sentence_embedding(jnp.asarray(tokens), jnp.asarray(mask)))
    with backend.use_kernel(kernel):
        got = np.asarray(runtime.prepare(q.model).sentence_embedding(jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=2e-5 if kernel == "jax" else 1e-3)
    assert q.storage["bits_per_weight"]["quantized_tensors"] < 8


def test_encoder_fisher_estimates_the_embeddings_gauss_newton_diagonal(tiny):
    """The allocator's sensitivity for an encoder (``quant.bpw``): squared gradients of the
    sentence embedding along random directions average to ``Σ_d (∂e_d/∂w)²``, computed here
    exactly from the Jacobian."""
    import jax
    from flax import nnx

    from cqjax.calib.fisher import embedding_loss, fisher_diag

    path, _ = tiny
    model = hf.to_model(hf.import_checkpoint(path))
    row = np.random.default_rng(0).integers(1, TINY["vocab_size"], (1, 9)).astype(np.int32)
    paths = ["layers/1/intermediate/kernel", "layers/0/attention/value/kernel"]
    n = 600
    directions = np.random.default_rng(1).standard_normal((n, TINY["hidden_size"])).astype(np.float32)
    ours = fisher_diag(model, (np.repeat(row, n, axis=0), directions), paths, loss=embedding_loss, progress=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    jac = jax.jacrev(lambda p: nnx.merge(graphdef, p, rest).sentence_embedding(row, np.ones(row.shape, bool))[0])(params)
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(jac)}
    for p in paths:
        exact = np.sum(np.square(np.asarray(flat[p])), axis=0)  # [D, *shape] -> the parameter's shape
        assert ours[p].shape == exact.shape
        assert abs(ours[p].sum() / exact.sum() - 1) < 0.15  # 600 single-direction probes
        assert np.corrcoef(ours[p].ravel(), exact.ravel())[0, 1] > 0.9


def test_retrieval_accuracy_and_batching():
    emb = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 3, 2]]  # questions 2 and 3 point at each other's paragraph
    assert embeddings.retrieval_accuracy(emb, 4) == 0.5
    rng = np.random.default_rng(3)
    ids = [rng.integers(1, 50, n).astype(np.int32) for n in (3, 40, 5, 70, 33, 2)]
    rd = embeddings.RetrievalData(ids=ids, n=3, protocol={})
    seen = []

    def encode(tokens, mask):  # the batch shape is padded; each row's embedding depends on its own tokens only
        seen.append(tokens.shape)
        return np.stack([[t[m].sum(), m.sum()] for t, m in zip(tokens, mask)]).astype(np.float32)

    out = embeddings.embed_texts(encode, rd, tokens_per_batch=128, progress=False)
    np.testing.assert_array_equal(out, [[i.sum(), len(i)] for i in ids])
    assert {t for _, t in seen} <= set(embeddings.BUCKETS)


def test_encoder_calibration_rows_are_framed_like_its_inputs():
    directory = _minilm()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    rows = from_text(tok, "the quick brown fox jumps over the lazy dog. " * 20, n=3, length=16)
    assert rows.shape == (3, 16)
    assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, -1] == tok.sep_token_id).all()


def _minilm():
    try:
        return data.model_dir("minilm-l6")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_packaged_minilm_matches_sentence_transformers_definition():
    """Our sentence embeddings equal transformers' BertModel + mean pooling + L2 normalisation."""
    directory = _minilm()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    pairs = embeddings.squad_pairs(3)
    enc = tok([q for q, _ in pairs] + [p for _, p in pairs], padding=True, truncation=True, max_length=256,
              return_tensors="np")
    tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
    model, _ = hf.load(directory)
    ours = np.asarray(model.sentence_embedding(jnp.asarray(tokens), jnp.asarray(mask)))
    ref = transformers.BertModel.from_pretrained(directory, dtype=torch.float32).eval()
    h = torch.tensor(_theirs(ref, tokens, mask))
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    theirs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.slow  # ~65 s on 2 cores: the packaged model converted and evaluated through the CLI
def test_cli_converts_and_evaluates_minilm(tmp_path):
    """The issue's command on the packaged model: report.json carries retrieval and cosine."""
    directory = _minilm()
    run = tmp_path / "run"
    proc = run_cli(["+model=minilm-l6", "quant.bits=4", "eval=quick", "eval.encoder.pairs=24",
                    f"model.path={directory}", f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    ev = report["evals"]
    assert set(ev) == {"retrieval", "cosine"}
    assert ev["retrieval"]["n"] == 24 and 0.5 < ev["retrieval"]["baseline"] <= 1
    assert ev["cosine"]["n"] == 48 and 0.9 < ev["cosine"]["min"] <= ev["cosine"]["quantized"] <= 1
    assert report["pipeline_name"] == "cq-ef" and report["calibration"]["source"] == "wikipedia"
    assert 4 < report["bits_per_weight"]["quantized_tensors"] < 4.5
    proc = run_cli(["mode=eval", f"artifact={run / 'artifact'}", "eval=quick", "eval.encoder.pairs=24",
                    f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "report.json").read_text())["evals"]
    assert again["retrieval"]["quantized"] == ev["retrieval"]["quantized"]
    assert abs(again["cosine"]["quantized"] - ev["cosine"]["quantized"]) < 1e-5


def test_encoder_refuses_calibration_on_its_evaluation_text(tmp_path):
    directory = _minilm()
    proc = run_cli(["+model=minilm-l6", "calib.source=squad", f"model.path={directory}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode != 0 and "calib.source='squad'" in proc.stderr


@pytest.mark.slow  # ~30 s on 2 cores: the packaged model tuned block by block
def test_tuning_an_encoder_runs_block_by_block_and_lowers_each_blocks_error():
    """cq-tune on an encoder: no end-to-end KL (no tokens are predicted), the block stage alone."""
    directory = _minilm()
    q = cqjax.quantize(directory, bits=3, method="cq-tune", calib={"source": "wikipedia", "rows": 8, "length": 32},
                       steps={"tune": {"rows": 8, "steps": 10, "max_seconds": 60}}, progress=False)
    losses = [m.info["tune"]["block_loss"] for p, m in q.ir.meta.items() if p.endswith("intermediate/kernel")]
    assert len(losses) == 6 and all(after < before for before, after in losses)
    assert all(m.info["tune"]["kl"] is None for m in q.ir.meta.values() if "tune" in m.info)


def test_sequential_error_feedback_on_an_encoder_leaves_the_table_to_the_plain_recipe():
    directory = _minilm()
    q = cqjax.quantize(directory, bits=4, method="cq-ef", calib={"source": "wikipedia", "rows": 4, "length": 32},
                       steps={"pack": None, "seq": {"_target_": "cqjax.passes.sequential.SequentialErrorFeedbackPack",
                                                    "rows": 4}}, progress=False)
    info = {p: m.info.get("error_feedback") for p, m in q.ir.meta.items() if "error_feedback" in m.info}
    assert info.pop("embeddings/word_embeddings/embedding") == "none"  # no output head reads it
    assert len(info) == 36 and set(info.values()) == {"sequential"}
