"""Read a CTranslate2 ``model.bin`` (binary format 6) as named numpy arrays, without CTranslate2.

The file is a little-endian stream (CTranslate2's ``ModelSpec`` serializer):

=========================  =============================================================
field                      encoding
=========================  =============================================================
version                    uint32 (this reader knows 6)
spec name, revision        string, uint32
variables                  uint32 count, then per variable: name (string), rank (uint8),
                           dims (uint32 each), dtype (uint8, :data:`DTYPES`), byte count
                           (uint32), the raw bytes
aliases                    uint32 count, then (alias, target) strings
=========================  =============================================================

A string is a uint16 byte count (the terminating NUL included) and its bytes. Nothing in the
file is executed; every size is checked against the file's length before it is read, and
errors name the file and the variable.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from cqjax.errors import CheckpointError

#: CTranslate2's ``DataType`` ids.
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
VERSION = 6


class _Stream:
    def __init__(self, path: Path):
        self.path, self.data, self.at = path, memoryview(path.read_bytes()), 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated at byte {self.at} reading {what} "
                                  f"({n} bytes needed, {len(self.data) - self.at} left)")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.uint("<H", what), what))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8 ({e})") from e


def read(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """``(spec name, {variable name: array})`` of a CTranslate2 ``model.bin``; an alias maps
    to its target's array.

    Raises:
      CheckpointError: not version 6, an unknown dtype, a byte count that does not match the
        shape, a truncated file or bytes after the end, naming the file and the variable.
    """
    path = Path(path)
    s = _Stream(path)
    version = s.uint("<I", "the format version")
    if version != VERSION:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version}; this reader knows {VERSION}")
    spec = s.string("the spec name")
    s.uint("<I", "the spec revision")
    out: dict[str, np.ndarray] = {}
    for _ in range(s.uint("<I", "the variable count")):
        name = s.string("a variable name")
        dims = [s.uint("<I", f"{name}'s shape") for _ in range(s.uint("<B", f"{name}'s rank"))]
        code = s.uint("<B", f"{name}'s dtype")
        if code not in DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has dtype id {code}; known: {sorted(DTYPES)}")
        dtype = np.dtype(DTYPES[code])
        nbytes = s.uint("<I", f"{name}'s byte count")
        if nbytes != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: variable {name!r} holds {nbytes} bytes; shape {dims} of {dtype} "
                                  f"needs {int(np.prod(dims, dtype=np.int64)) * dtype.itemsize}")
        out[name] = np.frombuffer(s.take(nbytes, name), dtype).reshape(dims)
    for _ in range(s.uint("<I", "the alias count")):
        alias, target = s.string("an alias"), s.string("an alias target")
        if target not in out:
            raise CheckpointError(f"{path}: alias {alias!r} names no variable ({target!r})")
        out[alias] = out[target]
    if s.at != len(s.data):
        raise CheckpointError(f"{path}: {len(s.data) - s.at} bytes after the last alias")
    return spec, out


def write(path: str | Path, spec: str, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
          revision: int = 1) -> None:
    """Writes ``variables`` as :func:`read` reads them (tests build CTranslate2 files with it)."""
    codes = {np.dtype(v): k for k, v in DTYPES.items()}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    parts = [struct.pack("<I", VERSION), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.array(value, order="C")  # keeps a 0-d scalar 0-d
        parts += [string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                  struct.pack("<BI", codes[value.dtype], value.nbytes), value.tobytes()]
    parts.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        parts += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(parts))
