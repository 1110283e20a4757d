"""Models on a :class:`jax.sharding.Mesh`: weights split along their output dimension, batches
along a data axis.

=====================================  ================================  =========================
leaf                                   stored as                         split along ``model``
=====================================  ================================  =========================
float kernel (role linear, ...)        ``[K, N]``                        ``N`` (output features)
float table (role embedding, ...)      ``[V, D]``                        ``V`` (rows)
quantized leaf (CQ, RTN)               row fields ``[rows, ...]``        ``rows`` (a kernel's
                                       (``ROW_FIELDS``)                  output features)
anything else (norms, biases, ...)     —                                 replicated
=====================================  ================================  =========================

A dimension that the axis size does not divide stays whole (replicated): every shape works,
and :func:`placement` says which leaves were split. A batch of token rows goes along ``data``
(:func:`shard_batch`). XLA partitions a jitted forward over these placements (GSPMD), so the
same code runs on one device or many; the logits equal the single-device ones up to the order
of the float reductions XLA splits.

Conversion is host code (NumPy and C++, row by row), so a sharded conversion places each
converted tensor straight onto the mesh (:func:`shard_ir`); its bytes are those of a
single-device run, since every row is converted on its own.

Inside :func:`use_mesh`, the batches that cqjax's own loops feed a jitted model (calibration
statistics, evaluation, generation) go along ``data`` (:func:`place_batch`).

>>> mesh = make_mesh((1, 8), ("data", "model"))          # doctest: +SKIP
>>> ir = shard_ir(ir, mesh)                               # doctest: +SKIP
>>> with use_mesh(mesh):                                  # doctest: +SKIP
...     logits = runtime.forward_fn(hf.to_model(ir))(tokens, mask)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cqjax.errors import ConfigError
from cqjax.ir import EMBED_ROLES, IR, KERNEL_ROLES, TensorMeta, materialize
from cqjax.kernels.qarrays import is_quantized

#: The default axis names: token rows split along the first, weights along the second.
AXES = ("data", "model")


def make_mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of ``devices`` (default: all of JAX's) with ``shape`` along ``axes``.

    Args:
      shape: devices per axis; None puts every device on the last axis (weights split, one data
        replica). The product may be less than the number of devices (the first ones are used).
      axes: one name per entry of ``shape``; must contain ``"data"`` and ``"model"`` only if
        those are the axes later used (:func:`shard_ir` / :func:`shard_batch` take the names).
      devices: the devices to use.

    Raises:
      ConfigError: naming ``mesh.shape`` / ``mesh.axes`` when they disagree or ask for more
        devices than there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(str(a) for a in axes)
    if shape is None:
        shape = (1,) * (len(axes) - 1) + (len(devices),)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes) or len(set(axes)) != len(axes):
        raise ConfigError(f"mesh.shape={list(shape)} and mesh.axes={list(axes)} must have the same length and "
                          "distinct axis names")
    if any(s < 1 for s in shape):
        raise ConfigError(f"mesh.shape={list(shape)}: every entry must be >= 1")
    n = math.prod(shape)
    if n > len(devices):
        raise ConfigError(f"mesh.shape={list(shape)} needs {n} devices; JAX has {len(devices)} "
                          f"({devices[0].platform}). On CPU, simulate more with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} set before JAX starts")
    return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), axes)


def _split(dim: int, size: int) -> bool:
    return size > 1 and dim % size == 0


def leaf_spec(leaf: Any, meta: TensorMeta | None, size: int, axis: str = "model") -> Any:
    """The :class:`PartitionSpec` of a leaf (a pytree of them for a quantized leaf), for an axis
    of ``size`` devices named ``axis`` (see the module table)."""
    if is_quantized(leaf):
        rows = np.shape(getattr(leaf, leaf.ROW_FIELDS[0]))[0]
        spec = PartitionSpec(axis) if _split(rows, size) else PartitionSpec()
        return jax.tree.map(lambda _: PartitionSpec(), leaf).replace(
            **{f: spec for f in leaf.ROW_FIELDS})
    shape = np.shape(leaf)
    role = None if meta is None else meta.role
    if len(shape) == 2 and role in KERNEL_ROLES and _split(shape[1], size):
        return PartitionSpec(None, axis)
    if len(shape) == 2 and role in EMBED_ROLES and _split(shape[0], size):
        return PartitionSpec(axis)
    return PartitionSpec()


def shard_leaf(leaf: Any, meta: TensorMeta | None, mesh: Mesh, axis: str = "model") -> Any:
    """``leaf`` (loaded if lazy) placed on ``mesh`` by :func:`leaf_spec`."""
    leaf = materialize(leaf)
    spec = leaf_spec(leaf, meta, mesh.shape.get(axis, 1), axis)
    return jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)), leaf, spec)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` with ``sharding``; on a mesh across processes each process puts its own shards from
    its copy of ``x`` (every process must hold the same value)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_ir(ir: IR, mesh: Mesh, axis: str = "model") -> IR:
    """``ir`` with every leaf on ``mesh``: weights split along ``axis``, the rest replicated."""
    return IR(family=ir.family, config=ir.config, meta=ir.meta,
              params={p: shard_leaf(leaf, ir.meta.get(p), mesh, axis) for p, leaf in ir.params.items()})


def placement(ir: IR) -> dict[str, str]:
    """``{path: spec}`` of every leaf that is split (its row field for a quantized leaf), as text:
    what a sharded run reports."""
    out = {}
    for path, leaf in ir.params.items():
        arr = getattr(leaf, leaf.ROW_FIELDS[0]) if is_quantized(leaf) else leaf
        sharding = getattr(arr, "sharding", None)
        if isinstance(sharding, NamedSharding) and any(s is not None for s in sharding.spec):
            out[path] = str(sharding.spec)
    return out


def shard_batch(x: Any, mesh: Mesh, axis: str = "data") -> jax.Array:
    """Token rows ``[B, ...]`` split along ``axis`` (replicated when ``B`` is not a multiple)."""
    spec = PartitionSpec(axis) if _split(x.shape[0], mesh.shape[axis]) else PartitionSpec()
    return _place(x, NamedSharding(mesh, spec))


_ACTIVE: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Makes ``mesh`` the one :func:`place_batch` splits batches over (None: no mesh)."""
    _ACTIVE.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def active_mesh() -> Mesh | None:
    """The innermost :func:`use_mesh` mesh, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def place_batch(x: Any, axis: str = "data") -> Any:
    """``x`` split along ``axis`` of the active mesh (:func:`shard_batch`); ``x`` itself when
    there is none."""
    mesh = active_mesh()
    return x if mesh is None or axis not in mesh.shape else shard_batch(x, mesh, axis)


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded) array as one NumPy array on this host; on a mesh across processes
    (:func:`jax.distributed.initialize`) every process must call it (it gathers the shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_ir(ir: IR) -> IR:
    """``ir`` with every leaf on this host (:func:`to_host`), e.g. to save it."""
    return IR(family=ir.family, config=ir.config, meta=ir.meta,
              params={p: jax.tree.map(to_host, materialize(leaf)) for p, leaf in ir.params.items()})
