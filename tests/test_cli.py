"""The main job end to end on a tiny checkpoint: python -m cqjax +model=hf model.path=DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cqjax.eval.testing import tiny_tokenizer
from test_import_errors import write
from test_quant_passes import ODD, tensors

CFG = {**ODD, "vocab_size": 300}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("ckpt") / "tiny", config=CFG, weights=tensors(CFG))
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path, text


def cqjax(args, cwd, env_cache):
    env = {**os.environ, "CQJAX_CACHE": str(env_cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cqjax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("pipeline", ["cq", "rtn"])
def test_convert_writes_artifact_and_reports(checkpoint, tmp_path, pipeline):
    path, text = checkpoint
    run_dir = tmp_path / "run"
    proc = cqjax(["+model=hf", f"model.path={path}", f"pipeline={pipeline}", "quant.bits=2",
                  f"eval.text_path={text}", "eval.max_tokens=256", "eval.context=64", "eval.limit=8",
                  "eval.tasks=[arc_easy]", f"hydra.run.dir={run_dir}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"] == "hf" and report["pipeline"] == ([pipeline] if pipeline == "rtn" else ["rotate", "codebook", "pack"])
    bpw = report["bits_per_weight"]
    assert 2 < bpw["quantized_tensors"] < 16 and 2 < bpw["model"] < 16
    assert report["bytes"]["quantized"] < report["bytes"]["float"]
    ppl = report["evals"]["perplexity"]
    assert ppl["baseline"] > 1 and ppl["quantized"] > 1 and ppl["kl"] >= 0 and 0 <= ppl["top1"] <= 1
    assert ppl["protocol"]["max_tokens"] == 256
    arc = report["evals"]["arc_easy"]
    assert arc["n"] == 8 and 0 <= arc["quantized"] <= 1
    kernels = [t for t in report["tensors"] if t["role"] == "linear"]
    assert kernels and all(t["bits"] == 2 and t["rel_error"] > 0 for t in kernels)
    assert [p["name"] for p in report["passes"]] == report["pipeline"]
    assert (run_dir / "report.md").read_text().startswith("# cqjax report: hf")
    assert (run_dir / "artifact" / "manifest.json").is_file()


def test_float_only_with_no_pipeline(checkpoint, tmp_path):
    path, text = checkpoint
    proc = cqjax(["+model=hf", f"model.path={path}", "~pipeline", f"eval.text_path={text}",
                  "eval.max_tokens=128", "eval.context=64", "eval.tasks=[]", f"hydra.run.dir={tmp_path / 'r'}"],
                 tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["pipeline"] is None and report["evals"]["perplexity"]["quantized"] is None
    assert not (tmp_path / "r" / "artifact").exists()


def test_missing_model_is_explained(tmp_path):
    proc = cqjax([f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode != 0 and "+model=<name>" in proc.stderr


def test_missing_local_path_is_named(tmp_path):
    proc = cqjax(["+model=hf", f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}"],
                 tmp_path, tmp_path / "cache")
    assert proc.returncode != 0 and "nope" in proc.stderr and "not found" in proc.stderr
