"""A JSON cache of evaluation results keyed by (model id, protocol), for float baselines.

Entries live in ``$CQJAX_CACHE/eval/`` (default ``~/.cache/cqjax/eval/``), one file per key:
``<model-id>-<kind>-<hash16>.json`` holding ``{"key": key_dict, "result": result}``. The hash is
over the canonical JSON of the whole key dict, so any protocol change (text, tokenizer, window
layout, task documents) is a miss. Writes are atomic (temp file + ``os.replace``). A file that
does not parse or whose stored key differs is treated as a miss and rewritten.

Example:
  >>> key = {"model": "smollm2-135m", "kind": "perplexity", "protocol": win.protocol}  # doctest: +SKIP
  >>> res = cached(key, lambda: perplexity(fwd, win).to_dict())                        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cqjax.io.atomic import write_json


def cache_dir() -> Path:
    """``$CQJAX_CACHE/eval``, default ``~/.cache/cqjax/eval``."""
    root = os.environ.get("CQJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cqjax")
    return Path(root) / "eval"


def _canonical(key: dict[str, Any]) -> str:
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cache key must be JSON-serializable: {e}") from e


def key_path(key: dict[str, Any], directory: str | os.PathLike | None = None) -> Path:
    """The cache file for ``key``."""
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
    stem = "-".join(str(key.get(k, "")) for k in ("model", "kind") if key.get(k))
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", stem)[:80] or "entry"
    return Path(directory if directory is not None else cache_dir()) / f"{stem}-{digest}.json"


def load(key: dict[str, Any], directory: str | os.PathLike | None = None) -> Any | None:
    """The cached result for ``key``, or None on a miss."""
    path = key_path(key, directory)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        print(f"[cqjax.eval] ignoring unreadable cache file {path}: {e}", file=sys.stderr)
        return None
    if not isinstance(entry, dict) or _canonical(entry.get("key", {})) != _canonical(key):
        print(f"[cqjax.eval] ignoring cache file {path}: stored key differs", file=sys.stderr)
        return None
    return entry.get("result")


def store(key: dict[str, Any], result: Any, directory: str | os.PathLike | None = None) -> Path:
    """Writes ``result`` for ``key`` atomically and returns the file path."""
    path = key_path(key, directory)
    return write_json(path, {"key": key, "result": result}, indent=1, sort_keys=True)


def cached(key: dict[str, Any], compute: Callable[[], Any], *,
           directory: str | os.PathLike | None = None, refresh: bool = False) -> Any:
    """Returns the cached result for ``key``, or computes, stores and returns it.

    Args:
      key: a JSON-serializable dict; ``key["model"]`` and ``key["kind"]`` name the file.
      compute: a zero-argument function returning a JSON-serializable result.
      directory: cache directory; default :func:`cache_dir`.
      refresh: ignore any cached entry and recompute.
    """
    if not refresh:
        hit = load(key, directory)
        if hit is not None:
            return hit
    result = compute()
    # Round-trip through JSON so a miss returns exactly what a later hit will.
    result = json.loads(json.dumps(result, allow_nan=False))
    store(key, result, directory)
    return result
