"""Atomic file writes: write a temp file beside the target, then ``os.replace`` it.

A reader never sees a half-written file, and an interrupted write leaves the old file (or
none) in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Writes ``obj`` as JSON (NaN/inf refused: they are not JSON)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")
