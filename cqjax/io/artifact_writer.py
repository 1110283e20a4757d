"""Writes an artifact tensor by tensor, so that a conversion never holds the whole model, and
resumes one that was killed.

:func:`cqjax.io.artifact.save` is this writer fed a whole IR, so an artifact written leaf by
leaf (and one resumed after a kill) is byte-identical to one saved at once.

Each finished tensor becomes a *part* in ``.<name>.partial/`` beside the artifact directory:

================  ================================================================================
file              content
================  ================================================================================
``run.json``      the key of the conversion (source, recipe, ...): a resume with another key
                  starts over
``NNNNNN.bin``    the tensor's stored arrays, concatenated (written first)
``NNNNNN.json``   its manifest entry and each array's byte range in the ``.bin`` (written last,
                  atomically: a part without its ``.json`` is unfinished and is redone)
================  ================================================================================

:meth:`ArtifactWriter.finish` assembles ``weights.safetensors`` (arrays ordered by alignment,
then name; copied from the parts in chunks, never all in memory) and ``manifest.json`` in a
temporary directory that then replaces the artifact atomically, and deletes the parts.

>>> w = ArtifactWriter("out/artifact", key={"source": "..."}, resume=True)  # doctest: +SKIP
>>> for path, leaf in leaves:                                               # doctest: +SKIP
...     if not w.done(path): w.add(*artifact.stored(path, leaf, meta))
>>> w.finish(artifact.header_of(family, config), metadata=artifact.WEIGHTS_METADATA)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cqjax.io import atomic
from cqjax.io.safetensors_lazy import DTYPES

log = logging.getLogger(__name__)

#: safetensors' name of each numpy dtype the artifact stores.
ST_NAMES = {dtype: name for name, dtype in DTYPES.items()} | {np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32"}
_COPY_CHUNK = 64 << 20


def raw_bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes in C order as a flat uint8 array (a view when ``a`` is contiguous; works
    for dtypes the buffer protocol lacks, e.g. bfloat16)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def partial_dir(directory: str | os.PathLike) -> Path:
    """Where the parts of ``directory``'s unfinished conversion live."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.partial"


def safetensors_header(specs: list[tuple[str, np.dtype, tuple[int, ...], int]], metadata: dict[str, str]) -> tuple[bytes, list]:
    """The header bytes (length prefix included, padded to 8 bytes) for ``(name, dtype, shape,
    nbytes)`` arrays, and those arrays in file order (larger item sizes first, then by name, so
    every array is aligned to its item size)."""
    order = sorted(specs, key=lambda s: (-s[1].itemsize, s[0]))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in order:
        if dtype not in ST_NAMES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


class ArtifactWriter:
    """Collects an artifact's tensors one at a time (see the module doc).

    Args:
      directory: the artifact directory to write.
      key: JSON-able identity of the conversion; parts left by a conversion with another key
        are never reused.
      resume: reuse the finished parts of an interrupted conversion with the same key (else
        any parts are deleted first).
    """

    def __init__(self, directory: str | os.PathLike, *, key: Any = None, resume: bool = False):
        self.directory = Path(directory)
        self.parts = partial_dir(self.directory)
        self.key = json.loads(json.dumps(key, sort_keys=True))
        self.entries: dict[str, dict] = {}  # path -> manifest entry, in the order added
        self.notes: dict[str, Any] = {}  # path -> what the caller noted with it (kept across a resume)
        self._files: dict[str, tuple[Path, dict]] = {}  # path -> (.bin, {array name: (begin, end)})
        self.resumed = 0
        run = self.parts / "run.json"
        if resume and run.is_file() and json.loads(run.read_text()).get("key") == self.key:
            self._load_parts()
        elif self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        atomic.write_json(run, {"key": self.key}, sort_keys=True)

    def _load_parts(self) -> None:
        """Takes the finished parts in order, up to the first unfinished one (parts are written
        one after another, so only the last can be unfinished)."""
        for i in itertools.count():
            meta_file = self.parts / f"{i:06d}.json"
            data = meta_file.with_suffix(".bin")
            try:
                record = json.loads(meta_file.read_text())
                complete = data.stat().st_size == record["size"]
            except (OSError, ValueError, KeyError):
                complete = False
            if not complete:
                for stale in self.parts.glob("[0-9]*.*"):  # what a later attempt may have left
                    if int(stale.name.split(".")[0]) >= i:
                        stale.unlink()
                break
            path = record["entry"]["path"]
            self.entries[path] = record["entry"]
            self.notes[path] = record.get("note")
            self._files[path] = (data, {n: tuple(r) for n, r in record["ranges"].items()})
        self.resumed = len(self.entries)

    def done(self, path: str) -> bool:
        """Whether ``path`` is already written (by this writer or the conversion it resumes)."""
        return path in self.entries

    def add(self, entry: dict, arrays: dict[str, np.ndarray], note: Any = None) -> None:
        """Writes one tensor: its manifest ``entry``, its stored ``{safetensors name: array}`` and
        a JSON-able ``note`` of the caller's (found in :attr:`notes` after a resume too)."""
        path = entry["path"]
        if path in self.entries:
            raise ValueError(f"{path}: written twice")
        stem = self.parts / f"{len(self._files):06d}"
        ranges, offset = {}, 0
        with open(stem.with_suffix(".bin"), "wb") as f:
            for name, a in arrays.items():
                a = raw_bytes(a)
                f.write(a)
                ranges[name] = (offset, offset + a.nbytes)
                offset += a.nbytes
            f.flush()
            os.fsync(f.fileno())
        record = {"entry": entry, "size": offset, "ranges": ranges, "note": note}
        atomic.write_json(stem.with_suffix(".json"), record, sort_keys=True)
        self.entries[path] = entry
        self.notes[path] = note
        self._files[path] = (stem.with_suffix(".bin"), ranges)

    def finish(self, manifest: dict, *, metadata: dict[str, str], tokenizer=None) -> Path:
        """Writes ``weights.safetensors`` and ``manifest.json`` (``manifest`` plus ``"tensors"``,
        in the order the tensors were added) and replaces the artifact directory.

        ``tokenizer(artifact_dir) -> str | None`` copies tokenizer files into the artifact being
        written and returns the manifest's ``"tokenizer"`` (their folder, None if none)."""
        specs, where = [], {}
        for path, entry in self.entries.items():
            data, ranges = self._files[path]
            for spec in entry["arrays"].values():
                begin, end = ranges[spec["name"]]
                specs.append((spec["name"], np.dtype(spec["dtype"]), tuple(spec["shape"]), end - begin))
                where[spec["name"]] = (data, begin, end)
        head, order = safetensors_header(specs, metadata)
        tmp = atomic.temp_dir(self.directory)
        try:
            with open(tmp / "weights.safetensors", "wb") as out:
                out.write(head)
                for name, *_ in order:
                    data, begin, end = where[name]
                    with open(data, "rb") as f:
                        f.seek(begin)
                        for lo in range(begin, end, _COPY_CHUNK):
                            out.write(f.read(min(_COPY_CHUNK, end - lo)))
            manifest = {**manifest, "tensors": list(self.entries.values())}
            manifest["tokenizer"] = None if tokenizer is None else tokenizer(tmp)
            atomic.write_json(tmp / "manifest.json", manifest, sort_keys=True)
            atomic.fsync_tree(tmp)
            atomic.replace_dir(tmp, self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.directory
