"""One validator of the stored formats: what a quantized leaf's manifest entry and arrays must be.

Every loader (the artifact reader, and through it the pure-JAX runtime, the FFI kernels, eval,
generate and export) runs both checks, so nothing that one path would reject runs on another:

=====================  ===========================================================================
check                  before / what
=====================  ===========================================================================
:func:`check_entry`    before any array is read or allocated: the static fields (``bits`` in
                       :data:`SUPPORTED_BITS`, ``blocks`` a valid plan for ``K``, bounded sizes),
                       the logical shape, and every array's leaf and stored dtype/shape, which
                       the format fixes (so no size can exceed what the file holds)
:func:`check_values`   after decoding: a permutation is a permutation within its blocks, signs are
                       ±1, norms / codebooks / scales / zeros / input scales are finite (and input
                       scales nonzero)
=====================  ===========================================================================

Errors are :class:`cqjax.errors.FormatError` naming ``where`` (the file and tensor) and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cqjax.errors import FormatError
from cqjax.formats import rtn
from cqjax.formats.cq import SUPPORTED_BITS, row_bytes

#: The largest dimension a stored tensor may have (rows, K): bounds every allocation.
MAX_DIM = 1 << 24

#: Per format: the array fields (``in_scale`` optional) and their dtypes, and the static fields.
ARRAYS: dict[str, dict[str, str]] = {
    "cq": {"codes": "uint8", "norms": "float16", "codebooks": "float16", "s1": "int8", "s2": "int8",
           "perm": "int32", "in_scale": "float16"},
    "rtn": {"codes": "uint8", "scales": "float16", "zeros": "float16", "in_scale": "float16"},
}
STATIC: dict[str, tuple[str, ...]] = {"cq": ("bits", "blocks", "K", "transposed", "seed"),
                                      "rtn": ("bits", "blocks", "K", "transposed")}
OPTIONAL = ("in_scale",)


def _fail(where: str, what: str) -> None:
    raise FormatError(f"{where}: {what}")


def _int(v: Any, where: str, name: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        _fail(where, f"{name}={v!r} must be an integer in [{lo}, {hi}]")
    return int(v)


def layout(kind: str, static: Mapping[str, Any], shape: Sequence[int], where: str) -> dict[str, tuple[str, tuple]]:
    """``{field: (dtype, shape)}`` the format prescribes for a leaf with these static fields and
    logical shape (``[K, rows]`` if transposed, else ``[rows, K]``); checks the static fields."""
    if kind not in ARRAYS:
        _fail(where, f"unknown format {kind!r}; known: {sorted(ARRAYS)}")
    missing = [k for k in STATIC[kind] if k not in static]
    extra = sorted(set(static) - set(STATIC[kind]))
    if missing or extra:
        _fail(where, f"static fields {sorted(static)}: missing {missing}, unknown {extra}")
    bits = static["bits"]
    if bits not in SUPPORTED_BITS:
        _fail(where, f"bits={bits!r} is not one of {SUPPORTED_BITS}")
    K = _int(static["K"], where, "K")
    if not isinstance(static["transposed"], bool):
        _fail(where, f"transposed={static['transposed']!r} must be true or false")
    if len(shape) != 2:
        _fail(where, f"logical shape {list(shape)} is not 2-D")
    rows = _int(shape[1] if static["transposed"] else shape[0], where, "rows")
    if (shape[0] if static["transposed"] else shape[1]) != K:
        _fail(where, f"logical shape {list(shape)} does not have K={K} along its input dim")
    blocks = static["blocks"]
    if not isinstance(blocks, (list, tuple)) or not blocks or len(blocks) > MAX_DIM:
        _fail(where, f"blocks={blocks!r} must be a non-empty list")
    blocks = [_int(b, where, "a block size") for b in blocks]
    nb = len(blocks)
    if kind == "cq":
        if any(b & (b - 1) for b in blocks):
            _fail(where, f"blocks {blocks} must be powers of two")
        kpad = sum(blocks)
        if not K <= kpad < K + min(blocks) or kpad % 8:
            _fail(where, f"blocks {blocks} (sum {kpad}) are not a block plan for K={K}")
        _int(static["seed"], where, "seed", lo=0, hi=(1 << 63) - 1)
        out = {"codes": (rows, row_bytes(kpad, bits)), "norms": (rows, nb), "codebooks": (nb, 1 << bits),
               "s1": (kpad,), "s2": (kpad,), "perm": (kpad,), "in_scale": (K,)}
    else:
        if sum(blocks) != K or any(b > blocks[0] for b in blocks) or any(b != blocks[0] for b in blocks[:-1]):
            _fail(where, f"blocks {blocks} are not an RTN block plan for K={K}")
        out = {"codes": (rows, row_bytes(rtn.kpad(K), bits)), "scales": (rows, nb), "zeros": (rows, nb),
               "in_scale": (K,)}
    return {f: (ARRAYS[kind][f], s) for f, s in out.items()}


def stored_form(field: str, encoding: str, dtype: str, shape: tuple, blocks: Sequence[int], where: str) -> tuple:
    """The ``(dtype(s), shape)`` an array of leaf ``dtype``/``shape`` has when stored with
    ``encoding`` (:mod:`cqjax.formats.encoding`)."""
    if encoding == "raw":
        return (dtype,), shape
    if encoding == "signs" and field in ("s1", "s2"):
        return ("uint8",), (-(-int(np.prod(shape)) // 8),)
    if encoding == "block_local" and field == "perm":
        return (("uint8",) if max(blocks) <= 256 else ("uint16",)), shape
    _fail(where, f"array {field!r}: encoding {encoding!r} is not allowed for it")
    raise AssertionError  # unreachable


def check_entry(kind: str, static: Mapping[str, Any], shape: Sequence[int], arrays: Mapping[str, Mapping],
                where: str) -> None:
    """Checks a quantized leaf's manifest entry before anything is read (see the module table).

    Args:
      kind: the format (``cq``, ``rtn``).
      static: its static fields.
      shape: its logical shape.
      arrays: ``{field: {"dtype", "shape", "encoding", "leaf_dtype", "leaf_shape"}}`` (stored and
        leaf forms, as the manifest lists them).
      where: the file and tensor, for messages.
    """
    want = layout(kind, static, shape, where)
    required = {f for f in want if f not in OPTIONAL}
    if not required <= set(arrays) <= set(want):
        _fail(where, f"arrays {sorted(arrays)}: expected {sorted(required)} (and optionally {list(OPTIONAL)})")
    for field, spec in arrays.items():
        dtype, leaf_shape = want[field]
        if spec.get("leaf_dtype") != dtype or tuple(spec.get("leaf_shape", ())) != tuple(leaf_shape):
            _fail(where, f"array {field!r} is {spec.get('leaf_dtype')} {spec.get('leaf_shape')}; the {kind} format "
                         f"stores {dtype} {list(leaf_shape)}")
        dtypes, stored_shape = stored_form(field, spec.get("encoding"), dtype, tuple(leaf_shape),
                                           static["blocks"], where)
        if spec.get("dtype") not in dtypes or tuple(spec.get("shape", ())) != tuple(stored_shape):
            _fail(where, f"array {field!r} is stored as {spec.get('dtype')} {spec.get('shape')}; its "
                         f"{spec.get('encoding')} encoding stores {dtypes[0]} {list(stored_shape)}")


def check_values(kind: str, static: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Checks a quantized leaf's decoded arrays (see the module table)."""
    for field in ("norms", "codebooks", "scales", "zeros", "in_scale"):
        a = arrays.get(field)
        if a is not None and not np.all(np.isfinite(np.asarray(a, np.float32))):
            _fail(where, f"array {field!r} has non-finite values")
    if arrays.get("in_scale") is not None and np.any(np.asarray(arrays["in_scale"]) == 0):
        _fail(where, "array 'in_scale' has zeros (the runtime divides by it)")
    if kind != "cq":
        return
    for field in ("s1", "s2"):
        if not np.all(np.abs(np.asarray(arrays[field], np.int64)) == 1):
            _fail(where, f"array {field!r} must hold only -1 and +1")
    perm, lo = np.asarray(arrays["perm"], np.int64), 0
    for b in static["blocks"]:
        if not np.array_equal(np.sort(perm[lo:lo + b]), np.arange(lo, lo + b)):
            _fail(where, f"array 'perm' is not a permutation within block [{lo}, {lo + b})")
        lo += b
