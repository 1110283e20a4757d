"""The JSON result cache: hit, miss, key changes, corrupt files, atomic writes."""

from __future__ import annotations

import json

import pytest

from cqjax.eval import cache


def test_miss_then_hit(tmp_path):
    calls = []
    key = {"model": "smollm2/135m", "kind": "perplexity", "protocol": {"context": 512, "sha": "ab"}}

    def compute():
        calls.append(1)
        return {"value": 19.83, "n": 3}

    assert cache.cached(key, compute, directory=tmp_path) == {"value": 19.83, "n": 3}
    reordered = dict(reversed(list(key.items())))
    assert cache.cached(reordered, compute, directory=tmp_path) == {"value": 19.83, "n": 3}
    assert len(calls) == 1
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("smollm2_135m-perplexity-")
    assert json.loads(files[0].read_text())["key"] == key
    cache.cached({**key, "protocol": {"context": 256, "sha": "ab"}}, compute, directory=tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    cache.cached(key, compute, directory=tmp_path, refresh=True)
    assert len(calls) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_env_var_sets_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CQJAX_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "eval"
    cache.cached({"model": "m", "kind": "k"}, lambda: [1, 2], directory=None)
    assert len(list((tmp_path / "eval").glob("m-k-*.json"))) == 1


def test_corrupt_or_foreign_file_is_a_miss(tmp_path):
    key = {"model": "m", "kind": "k"}
    path = cache.key_path(key, tmp_path)
    path.write_text("{not json")
    assert cache.load(key, tmp_path) is None
    assert cache.cached(key, lambda: 5, directory=tmp_path) == 5
    path.write_text(json.dumps({"key": {"model": "other"}, "result": 6}))
    assert cache.load(key, tmp_path) is None


def test_unserializable_key_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        cache.cached({"model": object()}, lambda: 1, directory=tmp_path)
