"""The CLI end to end on a tiny checkpoint: convert, eval, generate, a multirun sweep, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cqjax.eval.testing import tiny_tokenizer
from cqjax.report import check_schema
from test_import_errors import write
from test_quant_passes import ODD, tensors

CFG = {**ODD, "vocab_size": 300}
# A tiny protocol: 2 perplexity windows of 64 tokens, 8 ARC-Easy documents.
TINY_EVAL = ["eval.perplexity.max_tokens=126", "eval.perplexity.context=64", "eval.limit=8",
             "eval.tasks=[arc_easy]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("ckpt") / "tiny", config=CFG, weights=tensors(CFG))
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path, text


def cqjax(args, cwd, env_cache, timeout=600, env=None):
    env = {**os.environ, "CQJAX_CACHE": str(env_cache), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cqjax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """One cq conversion (2-bit) shared by the report, eval and generate tests."""
    path, text = checkpoint
    tmp = tmp_path_factory.mktemp("conv")
    run_dir = tmp / "run"
    proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq", "quant.bits=2", f"eval.perplexity.path={text}",
                  *TINY_EVAL, f"hydra.run.dir={run_dir}"], tmp, tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_convert_writes_artifact_report_and_plots(converted):
    run_dir, proc = converted
    report = json.loads((run_dir / "report.json").read_text())
    check_schema(report)
    assert report["model"] == "hf" and report["pipeline"] == ["rotate", "codebook", "pack"]
    assert report["pipeline_name"] == "cq" and report["mode"] == "convert"
    bpw = report["bits_per_weight"]
    assert 2 < bpw["quantized_tensors"] < 16 and 2 < bpw["model"] < 16
    assert report["bytes"]["quantized"] < report["bytes"]["float"]
    ppl = report["evals"]["perplexity"]
    assert ppl["baseline"] > 1 and ppl["quantized"] > 1 and ppl["kl"] >= 0 and 0 <= ppl["top1"] <= 1
    assert ppl["protocol"]["max_tokens"] == 126 and ppl["protocol"]["context"] == 64
    assert ppl["protocol"]["text"]["source"].startswith("path:") or "text.txt" in json.dumps(ppl["protocol"])
    arc = report["evals"]["arc_easy"]
    assert arc["n"] == 8 and 0 <= arc["quantized"] <= 1 and 0 <= arc["baseline"] <= 1 and arc["stderr"] > 0
    kernels = [t for t in report["tensors"] if t["role"] == "linear"]
    assert kernels and all(t["bits"] == 2 and t["rel_error"] > 0 for t in kernels)
    assert [p["name"] for p in report["passes"]] == report["pipeline"]
    assert all(p["seconds"] >= 0 for p in report["passes"])
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# cqjax report: hf") and "| perplexity (lower is better) |" in md
    assert (run_dir / "artifact" / "manifest.json").is_file()
    assert sorted(report["plots"]) == ["metrics.png", "tensor_errors.png"]
    for png in report["plots"]:
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "quantizing tensor by tensor" in proc.stderr and " tensors (100%)" in proc.stderr  # progress


def test_float_only_with_no_pipeline(checkpoint, tmp_path):
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "~pipeline", f"eval.perplexity.path={text}",
                  "eval.perplexity.max_tokens=126", "eval.perplexity.context=64", "eval.tasks=[]",
                  f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check_schema(report)
    assert report["pipeline"] is None and report["evals"]["perplexity"]["quantized"] is None
    assert report["bits_per_weight"] == {"quantized_tensors": None, "model": None}
    assert not (tmp_path / "r" / "artifact").exists()


def test_eval_none_converts_without_building_a_model(checkpoint, tmp_path):
    path, _ = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq", "eval=none", f"hydra.run.dir={tmp_path / 'r'}"],
                 tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check_schema(report)
    assert report["evals"] == {} and "eval float" not in report["timings"]
    assert report["bits_per_weight"]["quantized_tensors"] > 3 and (tmp_path / "r" / "artifact" / "manifest.json").is_file()


def test_evaluation_that_cannot_fit_fails_before_any_work(monkeypatch):
    from cqjax.cli import convert
    from cqjax.errors import ConfigError
    from cqjax.io import hf
    from cqjax.ir import IR, TensorMeta

    meta = {"w": TensorMeta(role="linear", tower="text", hf_name="w", shape=(1000, 1000), dtype="bfloat16")}
    ir = IR(family="llama", config=None, params={"w": None}, meta=meta)
    monkeypatch.setattr(convert, "_available_memory", lambda: 5_000_000)
    convert.check_eval_memory(ir, float_dtype=None, quantized=False, packed=False)  # 2 MB fits
    with pytest.raises(ConfigError, match=r"needs at least 0.0 GB .*eval=none"):
        convert.check_eval_memory(ir, float_dtype=None, quantized=True, packed=False)  # 2 + 4 MB does not
    # Streamed, only what is outside the blocks and the largest block is held at once.
    blocks = {f"layers/{i}/w": TensorMeta(role="linear", tower="text", hf_name=f"w{i}", shape=(1000, 1000),
                                          dtype="bfloat16") for i in range(4)}
    ir = IR(family="llama", config=None, params=dict.fromkeys(blocks), meta=blocks)
    convert.check_eval_memory(ir, float_dtype=None, quantized=False, packed=False, streamed=True)  # 2 of 8 MB
    with pytest.raises(ConfigError, match="outside the blocks and the largest block"):
        convert.check_eval_memory(ir, float_dtype=None, quantized=True, packed=False, streamed=True)  # 2 + 4 MB


def converted_text(run_dir):
    return json.loads((run_dir / "report.json").read_text())["config"]["eval"]["perplexity"]["path"]


def test_eval_mode_against_recorded_float_model(converted, tmp_path):
    run_dir, _ = converted
    conv = json.loads((run_dir / "report.json").read_text())
    proc = cqjax(["mode=eval", f"artifact={run_dir / 'artifact'}", f"eval.perplexity.path={conv['config']['eval']['perplexity']['path']}",
                  *TINY_EVAL[:2], "eval.tasks=[]", f"hydra.run.dir={tmp_path / 'e'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    check_schema(report)
    assert report["mode"] == "eval" and report["model"] == "hf"
    assert report["bits_per_weight"] == conv["bits_per_weight"] and report["bytes"] == conv["bytes"]
    for key in ("baseline", "quantized", "kl", "top1"):
        assert report["evals"]["perplexity"][key] == pytest.approx(conv["evals"]["perplexity"][key], rel=1e-4)
    assert list(report["evals"]) == ["perplexity"]
    errs = {t["path"]: t["rel_error"] for t in report["tensors"] if t["rel_error"] is not None}
    assert errs == pytest.approx({t["path"]: t["rel_error"] for t in conv["tensors"] if t["rel_error"] is not None})


def test_eval_mode_standalone_when_float_model_is_gone(converted, tmp_path):
    run_dir, _ = converted
    art = tmp_path / "art"
    art.mkdir()
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    manifest["extra"]["recipe"]["source"] = str(tmp_path / "gone")
    for f in (run_dir / "artifact").iterdir():
        if f.is_file() and f.name != "manifest.json":
            os.symlink(f, art / f.name)
    os.symlink(run_dir / "artifact" / "tokenizer", art / "tokenizer")
    (art / "manifest.json").write_text(json.dumps(manifest))
    proc = cqjax(["mode=eval", f"artifact={art}", f"eval.perplexity.path={converted_text(run_dir)}",
                  "eval.perplexity.max_tokens=63", "eval.perplexity.context=64", "eval.tasks=[]",
                  f"hydra.run.dir={tmp_path / 'e'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standalone" in proc.stderr
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    check_schema(report)
    ppl = report["evals"]["perplexity"]
    assert ppl["baseline"] is None and ppl["kl"] is None and ppl["quantized"] > 1
    assert all(t["rel_error"] is None for t in report["tensors"])


def test_generate_mode(converted, tmp_path):
    run_dir, _ = converted
    proc = cqjax(["mode=generate", f"artifact={run_dir / 'artifact'}", "prompt=the quick brown",
                  "generate.max_new_tokens=5", f"hydra.run.dir={tmp_path / 'g'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert out["prompt"] == "the quick brown" and isinstance(out["completion"], str)
    assert proc.stdout.startswith("the quick brown" + out["completion"])  # no log lines on stdout
    from cqjax import api

    q = api.load(run_dir / "artifact")
    assert out["completion"] == api.generate(q, None, "the quick brown", max_new_tokens=5)


@pytest.mark.slow  # a CLI process; the batch and the stop strings are also tested through the API (test_generation)
def test_generate_a_batch_with_stop_strings(converted, tmp_path):
    run_dir, _ = converted
    proc = cqjax(["mode=generate", f"artifact={run_dir / 'artifact'}", "prompt=[the quick brown,a]",
                  "generate.max_new_tokens=6", "generate.stop=[o]", f"hydra.run.dir={tmp_path / 'g'}"], tmp_path,
                 tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "g" / "generation.json").read_text())
    from cqjax import api

    q = api.load(run_dir / "artifact")
    alone = [api.generate(q, None, p, max_new_tokens=6, stop=["o"]) for p in ("the quick brown", "a")]
    assert out["completion"] == alone and not any("o" in c for c in alone)
    assert proc.stdout.splitlines() == ["the quick brown" + alone[0], "a" + alone[1]]


def test_chat_needs_a_chat_template(converted, tmp_path):
    run_dir, _ = converted
    proc = cqjax(["mode=chat", f"artifact={run_dir / 'artifact'}", f"hydra.run.dir={tmp_path / 'c'}"], tmp_path,
                 tmp_path / "cache")
    assert proc.returncode != 0 and "no chat template" in proc.stderr and "Traceback" not in proc.stderr


def test_export_hf_mode(converted, tmp_path):
    """The exported checkpoint loads in transformers and computes cqjax's logits (pure-JAX runtime)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from cqjax import api
    from cqjax.kernels import backend
    from cqjax.runtime import forward_fn

    run_dir, _ = converted
    proc = cqjax(["mode=export", f"artifact={run_dir / 'artifact'}", f"export.out={tmp_path / 'hf'}",
                  f"hydra.run.dir={tmp_path / 'e'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "e" / "export.json").read_text())
    assert record["format"] == "hf" and record["dtype"] == "float32"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    tokens = np.arange(3, 40, dtype=np.int32)[None]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    with backend.use_kernel("jax"):
        ours = np.asarray(forward_fn(api.load(run_dir / "artifact").model)(tokens, np.ones(tokens.shape, bool)))
    assert np.abs(ours - theirs).max() <= 1e-3
    bad = cqjax(["mode=export", f"artifact={run_dir / 'artifact'}", "export.dtype=Q8_0",
                 f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, tmp_path / "cache")
    assert bad.returncode != 0 and "export.dtype" in bad.stderr and "float32" in bad.stderr


def test_multirun_sweep_writes_summary_and_pareto(checkpoint, tmp_path):
    path, text = checkpoint
    sweep = tmp_path / "sweep"
    proc = cqjax(["-m", "+model=hf", f"model.path={path}", "quant.bits=2,4", "pipeline=cq,rtn",
                  f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63", "eval.perplexity.context=64",
                  "eval.tasks=[]", "report.plots=false", f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 4
    summary = (sweep / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "job" not in line]
    assert len(rows) == 4
    assert {r.split(" | ")[2] for r in rows} == {"cq", "rtn"} and {r.split(" | ")[3] for r in rows} == {"2", "4"}
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for r in map(json.loads, (p.read_text() for p in reports)):
        bits = r["config"]["quant"]["bits"]
        assert r["pipeline"] == (["rtn"] if r["pipeline_name"] == "rtn" else ["rotate", "codebook", "pack"])
        assert {t["bits"] for t in r["tensors"] if t["role"] == "linear"} == {bits}


@pytest.mark.slow  # ~25 s on 2 cores: a sweep of CLI jobs in parallel processes
def test_sweep_runs_jobs_in_parallel_processes_with_the_joblib_launcher(checkpoint, tmp_path):
    """``hydra/launcher=joblib``: each job in a worker process of its own (each holds its own
    models: the memory of n_jobs runs at once), the same reports and summary as in sequence."""
    path, text = checkpoint
    sweep = tmp_path / "sweep"
    proc = cqjax(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+model=hf", f"model.path={path}",
                  "quant.bits=2,4", "pipeline=cq", f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63",
                  "eval.perplexity.context=64", "eval.tasks=[]", "report.plots=false", f"hydra.sweep.dir={sweep}"],
                 tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    reports = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/report.json"))]
    assert sorted(r["config"]["quant"]["bits"] for r in reports) == [2, 4]
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
def test_sweep_on_a_local_ray_cluster(checkpoint, tmp_path):
    """``hydra/launcher=ray`` against a Ray cluster this test starts (``ray start --head``): the
    jobs run as Ray tasks and leave the same reports and summary (extra ``cqjax[ray]``)."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="needs the extra cqjax[ray]")
    import shutil
    import socket

    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        path, text = checkpoint
        sweep = tmp_path / "sweep"
        proc = cqjax(["-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
                      "+hydra.launcher.ray.init.object_store_memory=null",  # set by the cluster, not the client
                      "+model=hf", f"model.path={path}", "quant.bits=2,4", "pipeline=cq",
                      f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63", "eval.perplexity.context=64",
                      "eval.tasks=[]", "report.plots=false", f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_run_job pid=" in proc.stdout + proc.stderr  # the jobs ran as Ray tasks
    reports = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/report.json"))]
    assert sorted(r["config"]["quant"]["bits"] for r in reports) == [2, 4]
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
def test_tuned_recipe_end_to_end(checkpoint, tmp_path):
    """pipeline=cq-tune: calibration draws pipeline.tune.rows rows, the tune step shows its
    progress, and the tuned artifact evaluates like the in-run model."""
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq-tune", "quant.bits=2", "calib.rows=2",
                  "calib.length=24", "pipeline.tune.rows=3", "pipeline.tune.steps=3", "pipeline.tune.e2e_steps=2",
                  "pipeline.tune.max_seconds=120", f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63",
                  "eval.perplexity.context=64", "eval.tasks=[]", "report.plots=false",
                  f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["pipeline"] == ["rotate", "codebook", "pack", "tune"] and report["pipeline_name"] == "cq-tune"
    assert report["calibration"]["rows"] == 3 and report["passes"][-1]["name"] == "tune"
    assert "tune block 1/" in proc.stderr and "min of the budget left" in proc.stderr and "tune end to end" in proc.stderr
    from cqjax import api

    q = api.load(tmp_path / "r" / "artifact")
    assert "tune" in q.ir.meta["layers/0/mlp/up_proj/kernel"].info


def test_a_failing_sweep_job_is_recorded_and_the_others_run(checkpoint, tmp_path):
    path, text = checkpoint
    sweep = tmp_path / "sweep"
    proc = cqjax(["-m", "+model=hf", f"model.path={path}", "pipeline=cq", "quant.bpw=0.5,null",
                  f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63", "eval.perplexity.context=64",
                  "eval.tasks=[]", "report.plots=false", f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (sweep / "1" / "report.json").is_file() and (sweep / "0" / "error.json").is_file()
    summary = (sweep / "summary.md").read_text()
    assert "## Failed jobs" in summary and "quant.bpw=0.5" in summary and "out of reach" in summary
    assert "1 sweep job(s) failed" in proc.stderr


def test_convert_with_allocator_and_error_feedback(checkpoint, tmp_path):
    """quant.bpw turns the allocator on (its statistics taken block by block on self-generated
    rows), pipeline=cq-ef adds error feedback: one override each; the report says what
    calibration ran. (This tiny model
    stores 4.87 bits/weight at uniform 2 bits and 5.32 at 3, its 4-bit embeddings included.)"""
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq-ef", "quant.bpw=5.1", "quant.choices=[2,3]",
                  "calib.rows=2", "calib.length=24", f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63",
                  "eval.perplexity.context=64", "eval.tasks=[]", "report.plots=false",
                  f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    check_schema(report)
    assert report["pipeline"] == ["allocate", "rotate", "codebook", "pack"]
    calib = report["calibration"]
    assert calib["source"] == "self" and calib["tokens"] == 2 * 24 and calib["rows"] == 2
    assert report["passes"][0]["name"] == "allocate" and report["passes"][0]["seconds"] > 0
    linear_bits = [t["bits"] for t in report["tensors"] if t["role"] == "linear"]
    assert set(linear_bits) <= {2, 3}
    assert {t["bits"] for t in report["tensors"] if t["role"] in ("embedding", "lm_head")} == {4}
    assert 4.87 < report["bits_per_weight"]["quantized_tensors"] <= 5.1
    assert "allocate (fisher):" in proc.stderr and "allocate: block by block" in proc.stderr


def test_error_feedback_converts_block_by_block(checkpoint, tmp_path):
    """pipeline=cq-ef (no allocator) draws its rows, then converts block by block (calib.carry);
    calib.carry=whole keeps the in-memory path; both say so, and the report records the rows."""
    path, text = checkpoint
    common = ["+model=hf", f"model.path={path}", "pipeline=cq-ef", "quant.bits=3", "calib.rows=3", "calib.length=16",
              f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63", "eval.perplexity.context=64",
              "eval.tasks=[]", "report.plots=false"]
    reports = {}
    for carry in ("quantized", "whole"):
        proc = cqjax([*common, f"calib.carry={carry}", f"hydra.run.dir={tmp_path / carry}"], tmp_path, tmp_path / "c")
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[carry] = report = json.loads((tmp_path / carry / "report.json").read_text())
        check_schema(report)
        assert report["calibration"]["rows"] == 3 and report["calibration"]["tokens"] == 3 * 16
        assert report["pipeline"] == ["rotate", "codebook", "pack"]
        said = "quantizing block by block (calibration carried through the quantized prefix)"
        assert (said in proc.stderr) == (carry == "quantized"), proc.stderr[-2000:]
        assert ("calibrating (hessian)" in proc.stderr) == (carry == "whole")
    fed = sum(t["role"] in ("linear", "lm_head") for t in reports["quantized"]["tensors"])
    assert reports["quantized"]["calibration"]["tensors"] == fed  # every kernel had its Hessian
    ppl = {k: r["evals"]["perplexity"]["quantized"] for k, r in reports.items()}
    assert abs(ppl["quantized"] / ppl["whole"] - 1) < 0.1, ppl
    proc = cqjax([*common, "calib.carry=sideways"], tmp_path, tmp_path / "c")
    assert proc.returncode != 0 and "calib.carry='sideways' is not allowed" in proc.stderr


def test_allocator_measures_the_configured_recipe(checkpoint, tmp_path):
    """quant.bpw with a fitted codebook and least-squares gains: the report records the steps the
    allocator measured, and every quantized tensor's predicted error equals its measured one."""
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq", "quant.bpw=5.1", "quant.choices=[2,3]",
                  "quant.proxy=weight", "pipeline.codebook.mode=fitted", "pipeline.pack.gain=ls",
                  f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63", "eval.perplexity.context=64",
                  "eval.tasks=[]", "report.plots=false", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    steps = report["allocation"]["measured_steps"]
    assert [(s["name"], s["pass"]) for s in steps] == [("rotate", "cqjax.passes.cq.Rotate"),
                                                       ("codebook", "cqjax.passes.cq.FitCodebook"),
                                                       ("pack", "cqjax.passes.cq.Pack")]
    assert steps[1]["options"]["mode"] == "fitted" and steps[2]["options"]["gain"] == "ls"
    quantized = [t for t in report["tensors"] if t["rel_error"] is not None]
    assert quantized and all("predicted_rel_error" in t for t in quantized)
    for t in quantized:
        assert t["predicted_rel_error"] == pytest.approx(t["rel_error"], rel=1e-6), t["path"]


def test_overrides_and_bundles_are_checked_against_the_model(checkpoint, tmp_path):
    """A user's override that matches nothing stops the run before any work, naming the pattern
    and the nearest paths; the README's override example works; a bundle's rules that match
    nothing on this model are skipped and listed."""
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "+quant.overrides.no_such_tensor=8",
                  f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "quant.overrides: 'no_such_tensor' matches none of the" in proc.stderr
    assert "nearest paths:" in proc.stderr and "Traceback" not in proc.stderr
    assert "eval float" not in proc.stderr and "quantizing" not in proc.stderr
    proc = cqjax(["+model=hf", f"model.path={path}", r"+quant.overrides={role\:embedding:8,layers/0/.*:4}",
                  "bundle=mobile", "quant.bits=2", f"eval.perplexity.path={text}", "eval.perplexity.max_tokens=63",
                  "eval.perplexity.context=64", "eval.tasks=[]", "report.plots=false",
                  f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    bits = {t["path"]: t["bits"] for t in report["tensors"]}
    assert bits["embed_tokens/embedding"] == 8 and bits["layers/0/mlp/up_proj/kernel"] == 4
    assert bits["lm_head/kernel"] == 4  # the bundle's role:lm_head rule
    skipped = {(r["rule"], r["from"]) for r in report["skipped_rules"]}
    assert skipped == {("tower:vision", "quant.roles"), ("tower:audio", "quant.roles"),
                       ("role:per_layer_embedding", "quant.roles"), ("role:per_layer_embedding", "quant.embed_bits")}


def test_missing_model_is_explained(tmp_path):
    proc = cqjax([f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode != 0 and "+model=<name>" in proc.stderr


def test_missing_local_path_is_named(tmp_path):
    proc = cqjax(["+model=hf", f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}"],
                 tmp_path, tmp_path / "cache")
    assert proc.returncode != 0 and "nope" in proc.stderr and "not found" in proc.stderr


def test_hub_id_offline_says_how_to_set_model_path(tmp_path):
    proc = cqjax(["+model=qwen3-0.6b", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Qwen/Qwen3-0.6B" in proc.stderr and "not available offline" in proc.stderr
    assert "model.path=" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needles", [
    (["mode=foo"], ["mode", "convert, eval, generate"]),
    (["+model=smollm2-135m", "quant.foo=1"], ["quant.foo", "QuantConfig"]),
    (["+model=nosuch"], ["model/nosuch", "smollm2-135m", "gemma4"]),
])
def test_hydra_rejects_bad_keys_and_values(tmp_path, args, needles):
    proc = cqjax([*args, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode != 0
    for n in needles:
        assert n in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("report*"))


def test_help_and_cfg_job(tmp_path):
    proc = cqjax(["--help"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0
    for n in ("mode=eval artifact=DIR", "model:", "smollm2-135m", "experiment:", "production", "quant:"):
        assert n in proc.stdout, proc.stdout[-3000:]
    proc = cqjax(["--cfg", "job", "+model=gemma4", "experiment=production"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "name: gemma4-e2b" in proc.stdout and "source: google/gemma-4-E2B" in proc.stdout
    assert "bits: 4" in proc.stdout and "_target_: cqjax.passes.tune.Tune" in proc.stdout
    assert not (tmp_path / "outputs").exists()
