"""The lm-eval model ``cqjax`` (:mod:`cqjax.lm_eval`).

On a tiny random checkpoint: ``loglikelihood`` equals log-softmax sums of ``forward_fn``'s
logits (BOS, whitespace, truncation, padding across buckets), ``loglikelihood_rolling`` the sum
over every token, and ``generate_until`` the greedy tokens of :func:`cqjax.runtime.generate`,
cut at a stop string; an artifact scores like its packed runtime. Slow: lm-eval's CLI runs the
registered model; on the packaged SmolLM2, lm-eval's ARC-Easy and PIQA accuracy on packaged
documents, through local task YAMLs, equals :mod:`cqjax.eval.multiple_choice`'s.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from cqjax import runtime  # noqa: E402
from cqjax import lm_eval as cq_lm_eval  # noqa: E402
from cqjax.eval.multiple_choice import MCDoc  # noqa: E402
from cqjax.eval.testing import log_softmax_np, tiny_tokenizer  # noqa: E402
from test_parity import TINY, write_checkpoint  # noqa: E402

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "tiny"
    write_checkpoint(transformers.LlamaConfig(**{**TINY, "vocab_size": 300}, tie_word_embeddings=False), path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(checkpoint):
    return cq_lm_eval.register()(model=str(checkpoint), max_length=MAX_LENGTH, tokens_per_batch=96)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@functools.cache
def forward(model):
    return runtime.forward_fn(model)


def direct_score(lm, ctx_ids, cont_ids):
    """(sum log P(cont | ctx), greedy) from one unpadded forward_fn call, float64 log-softmax."""
    full = (list(ctx_ids) + list(cont_ids))[-(MAX_LENGTH + 1):]
    L = len(full) - 1
    tokens = np.zeros((1, MAX_LENGTH), np.int32)  # one shape: one compilation (causal: padding is inert)
    tokens[0, :L] = full[:-1]
    logits = np.asarray(forward(lm.model)(tokens, np.arange(MAX_LENGTH)[None] < L))[0, :L]
    lp = log_softmax_np(logits)[L - len(cont_ids):]
    targets = np.asarray(cont_ids)
    return float(lp[np.arange(len(targets)), targets].sum()), bool((lp.argmax(-1) == targets).all())


def test_register_and_importable_without_lm_eval():
    from lm_eval.api.registry import get_model

    cls = cq_lm_eval.register()
    assert get_model("cqjax") is cls is cq_lm_eval.CQJaxLM and cq_lm_eval.register() is cls
    assert get_model("dummy").__name__ == "DummyLM"  # the built-in models are still there ('hf' needs accelerate)
    code = ("import sys; sys.modules['lm_eval'] = None; import cqjax, cqjax.lm_eval as m\n"
            "try:\n    m.CQJaxLM\nexcept ImportError as e:\n    print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs lm-eval" in out


def test_model_args_are_checked(checkpoint):
    cls = cq_lm_eval.CQJaxLM
    with pytest.raises(ValueError, match="exactly one of artifact=DIR"):
        cls()
    with pytest.raises(TypeError, match=r"unknown model_args \['pretrained'\]"):
        cls(model=str(checkpoint), pretrained="gpt2")


def test_loglikelihood_equals_forward_log_softmax(lm):
    tok = lm.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = tok.bos_token_id
    long_ctx = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    cases = [  # (context, continuation, context ids, continuation ids) built independently of the model
        ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
        ("Goal: How do I ready a guinea pig cage?\nAnswer: ", "Provide bedding made of paper strips."),
        ("A man is sitting on a roof.", " He starts pulling up roofing on a roof."),
        ("", "The quick brown fox"),
        (long_ctx, " jumps over the lazy dog."),  # longer than max_length: cut from the left
    ]
    expected_ids = []
    for ctx, cont in cases:
        stripped = ctx.rstrip()
        cont = ctx[len(stripped):] + cont
        ids = ([bos] + enc(stripped)) if stripped else [bos]
        assert enc(stripped + cont) == enc(stripped) + enc(cont)  # so lm-eval's split is this one
        expected_ids.append((ids, enc(cont)))
    assert len(expected_ids[-1][0]) > MAX_LENGTH
    got = lm.loglikelihood([request("loglikelihood", c, k) for c, k in cases], disable_tqdm=True)
    for (ctx_ids, cont_ids), (ll, greedy), case in zip(expected_ids, got, cases):
        ref, ref_greedy = direct_score(lm, ctx_ids, cont_ids)
        assert ll == pytest.approx(ref, abs=1e-4), case
        assert greedy == ref_greedy, case
    # greedy continuations are recognised as such
    ctx = [bos] + enc("The quick brown fox")
    greedy_ids = runtime.generate(lm.model, np.asarray(ctx), max_new_tokens=3)[0, len(ctx):].tolist()
    (ll, greedy), = lm.score_tokens([(ctx, greedy_ids)])
    assert greedy and ll == pytest.approx(direct_score(lm, ctx, greedy_ids)[0], abs=1e-4)


def test_loglikelihood_rolling_sums_every_token(lm):
    text = "The quick brown fox jumps over the lazy dog."
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < MAX_LENGTH
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert total == pytest.approx(direct_score(lm, [lm.tokenizer.bos_token_id], ids)[0], abs=1e-4)
    long_text = " ".join([text] * 4)  # several windows, each scored token once
    (long_total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", long_text)], disable_tqdm=True)
    assert np.isfinite(long_total) and long_total < total


def test_generate_until_is_greedy_and_stops_at_stop_strings(lm):
    ctx = "The quick brown fox"
    prompt = lm.tok_encode(ctx)
    ids = runtime.generate(lm.model, np.asarray(prompt), max_new_tokens=12)[0, len(prompt):].tolist()
    if lm.eot_token_id in ids:
        ids = ids[:ids.index(lm.eot_token_id)]
    full = lm.tok_decode(ids)
    assert len(full) >= 4, f"the tiny model's greedy text is too short to test stops: {full!r}"
    stop = full[2:4]
    got = lm.generate_until([request("generate_until", ctx, {"until": [], "max_gen_toks": 12}),
                             request("generate_until", ctx, {"until": [stop], "max_gen_toks": 12}),
                             request("generate_until", ctx, {"until": "\u2603", "max_gen_toks": 3})],
                            disable_tqdm=True)
    assert got[0] == full
    assert got[1] == full.split(stop)[0] and len(got[1]) < len(full)
    assert got[2] == lm.tok_decode(ids[:3])


def test_artifact_scores_like_its_packed_runtime(checkpoint, tmp_path):
    import cqjax

    q = cqjax.quantize(checkpoint, bits=4, method="rtn", block=32, progress=False)
    path = cqjax.save(q, tmp_path / "art")
    lm = cq_lm_eval.CQJaxLM(artifact=str(path), max_length=MAX_LENGTH)  # tokenizer from the artifact
    ctx, cont = "The quick brown fox", " jumps over the lazy dog."
    (ll, _), = lm.loglikelihood([request("loglikelihood", ctx, cont)], disable_tqdm=True)
    ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
    packed = cq_lm_eval.CQJaxLM(artifact=str(path), max_length=MAX_LENGTH, packed=True)
    assert ll == pytest.approx(direct_score(packed, ctx_ids, cont_ids)[0], abs=1e-3)


@pytest.mark.slow  # lm-eval's CLI indexes its thousands of built-in task configs first (~7 s)
def test_lm_eval_cli_runs_the_registered_model(checkpoint, tmp_path, monkeypatch, capsys):
    docs = [MCDoc(0, "Question: Which technology was developed most recently?\nAnswer:",
                           (" cellular telephone", " the lazy dog"), 0),
            MCDoc(0, "The quick brown fox", (" jumps", " sits"), 1)]
    task = write_task(tmp_path, "tiny", docs)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    cq_lm_eval.main(["run", "--model", "cqjax", "--model_args", f"model={checkpoint},max_length={MAX_LENGTH}",
                     "--tasks", task, "--include_path", str(tmp_path), "--batch_size", "auto"])
    out = capsys.readouterr().out
    assert f"cqjax ({{'model': '{checkpoint}', 'max_length': {MAX_LENGTH}}})" in out
    assert task in out and "acc_norm" in out


def write_task(tmp_path, name: str, docs) -> str:
    """A local lm-eval task over cqjax's documents: each request is cqjax's ``(context,
    continuation)`` as is (``target_delimiter`` empty: the choices keep their leading space)."""
    import yaml

    rows = tmp_path / f"{name}.jsonl"
    rows.write_text("".join(json.dumps({"context": d.context, "choices": list(d.continuations), "label": d.label})
                            + "\n" for d in docs))
    task = f"cqjax_{name}"
    config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
              "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in ("acc", "acc_norm")]}
    (tmp_path / f"{task}.yaml").write_text(yaml.safe_dump(config))
    return task


@pytest.mark.slow
def test_accuracy_equals_cqjax_multiple_choice(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from cqjax import data
    from cqjax.eval import multiple_choice as mc
    from cqjax.eval.scoring import from_nnx

    try:
        directory = data.model_dir("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    lm = cq_lm_eval.register()(model=str(directory), tokens_per_batch=512)
    ours, tasks = {}, {}
    for name in ("arc_easy", "piqa"):
        prepared = mc.prepare_task(lm.tokenizer, name, limit=20, tokens_per_batch=512)
        ours[name] = mc.evaluate_task(from_nnx(runtime.prepare(lm.model)), prepared, progress=False)
        tasks[name] = (write_task(tmp_path, name, prepared.docs), prepared.docs)
    out = lm_eval.simple_evaluate(model=lm, tasks=[t for t, _ in tasks.values()], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    for name, (task, docs) in tasks.items():
        res, mine = out["results"][task], ours[name]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(docs) == mine.n == 20
        for s, d, lls in zip(samples, docs, mine.loglikelihoods):
            assert [tuple(a) for a in s["arguments"]] == [(d.context, c) for c in d.continuations]
            np.testing.assert_allclose([r[0][0] for r in s["resps"]], lls, atol=2e-3, err_msg=f"{name} {d.doc_id}")
        print(f"{name}: lm-eval acc {res['acc,none']:.3f} acc_norm {res['acc_norm,none']:.3f}; "
              f"cqjax acc {mine.acc:.3f} acc_per_char {mine.acc_per_char:.3f}")
        assert res["acc,none"] == pytest.approx(mine.acc, abs=1e-12)
        assert res["acc_norm,none"] == pytest.approx(mine.acc_per_char, abs=1e-12)
