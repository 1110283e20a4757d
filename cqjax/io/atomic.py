"""Atomic writes: a file (temp file beside it, then ``os.replace``) and a directory (built beside
it, synced, then exchanged with the old one in one step: :func:`replace_dir`).

A reader never sees a half-written file or directory, and an interrupted write leaves the old
one in place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
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
            f.flush()
            os.fsync(f.fileno())
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


# ------------------------------------------------------------------------- directories

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file below ``path`` and every directory, ``path``'s parent last: the tree is
    on disk before anything points to it."""
    path = Path(path)
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(p)
    _fsync(path)
    _fsync(path.parent)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2():
    """glibc's ``renameat2`` (Linux), or None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swaps two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot (then nothing was changed)."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """``new`` (a complete directory beside ``target``) takes ``target``'s place atomically.

    ``target`` absent: one ``rename``. Present: the two are exchanged in one step, then the old
    one (now at ``new``'s name) is deleted; a kill at any point leaves either the old or the new
    directory at ``target``, and at worst the other one under its hidden temporary name (which
    :func:`leftovers` finds). Where exchange is impossible: the old directory is renamed aside
    first (a kill between the two renames leaves no ``target``, only the hidden copy).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)
    else:
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
        aside.rmdir()
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync(target.parent)


def temp_dir(target: str | os.PathLike) -> Path:
    """A new hidden directory beside ``target`` to build its replacement in
    (``.<name>.tmp-<pid>-<random>``: :func:`leftovers` knows whose it is)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))


def leftovers(target: str | os.PathLike) -> list[Path]:
    """Hidden directories that interrupted writes of ``target`` left beside it
    (``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` of processes no longer running)."""
    target = Path(target)
    out = []
    for p in target.parent.glob(f".{target.name}.*"):
        kind, _, rest = p.name[len(target.name) + 2:].partition("-")
        if not p.is_dir() or kind not in ("tmp", "old"):
            continue
        pid = rest.split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            out.append(p)
    return sorted(out)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier, interrupted attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
