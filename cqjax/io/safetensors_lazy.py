"""Lazy, bounds-checked reading of safetensors files through a memory map.

The header is parsed here (8-byte little-endian length, JSON header, data) so that a truncated
or malformed file fails with an error naming the file and the tensor, before any tensor is read.
Nothing but JSON and raw bytes is ever decoded: no pickle.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from cqjax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one safetensors file, read on demand.

    Attributes:
      path: the file.
      entries: ``{name: (dtype, shape, begin, end)}`` with byte offsets into the data section.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors header "
                                      f"(header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: safetensors header is not valid JSON: {e}") from e
        self._data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                      f"{info!r} (dtype {info.get('dtype') if isinstance(info, dict) else '?'})") from e
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{self.path}: tensor {name!r} byte range {begin}..{end} does not "
                                      f"match its shape {shape} and dtype {info['dtype']}")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name!r} needs bytes up to "
                                      f"{self._data_start + end}, file has {size}")
            self.entries[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor ``name`` (no copy until used)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)
