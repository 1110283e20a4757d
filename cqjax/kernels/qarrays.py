"""Quantized leaves: packed weights that the model's matmuls and lookups dispatch on.

A quantized leaf stands where a float array stood in the model (a linear ``kernel [K, N]``, an
embedding ``table [V, D]``) and answers the three questions the model asks
(:func:`cqjax.models.layers.matmul` / ``embed_lookup`` / ``Embed.attend``):

=================  ===========================================  ==============================
method             computes                                     how (pure JAX, any backend)
=================  ===========================================  ==============================
``matmul(x)``      ``x @ W`` for a kernel ``W [K, N]``          rotate ``x``, decode, matmul
``take_rows(ids)`` ``T[ids]`` for a table ``T [V, D]``          decode only the gathered rows
``attend(x)``      ``x @ T.T`` (tied output head)               rotate ``x``, decode, matmul
=================  ===========================================  ==============================

CQ leaves at 1-4 bits run these through the C++ FFI kernels on CPU (int8 activations, see
:mod:`cqjax.kernels.backend` for the switch ``CQJAX_KERNEL=auto|ffi|jax``); the methods
``_dot_rows_jnp`` / ``_take_rows_jnp`` are the pure-JAX reference on any backend.

Both formats store **rows**: for a kernel the rows are its output columns (``W.T``), for a
table its rows. ``transposed`` says which, so ``logical_shape`` is the float leaf's shape.
The rotation is applied to the activation (``(R x)·(R w) = x·w``); no float copy of the weight
is stored, only a transient decode inside jit. Stored sizes are counted in one place,
:mod:`cqjax.quant_stats` (what the artifact actually holds).

**Input scale.** Either leaf may carry ``in_scale``: float16 ``[K]`` per-input-channel scales
``s`` (:class:`cqjax.passes.awq.ActivationScale` sets them; default None, absent). The codes
then encode ``diag(s)·W`` and the leaf stands for ``Ŵ = diag(1/s)·decode(codes)``: every
method divides the activation (``matmul``/``attend``: ``x / s`` before the rotation, on the
pure-JAX and the FFI kernel path alike) or the decoded rows (``dequantize``, ``take_rows``)
by ``s``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cqjax.formats import cq as fmt
from cqjax.formats import rotation, rtn
from cqjax.kernels import backend


def expand_blocks(per_block: jax.Array, blocks: tuple[int, ...], axis: int = -1) -> jax.Array:
    """``nblocks`` → ``Kpad`` along ``axis`` by repeating each block's value over its width.

    Built from broadcasts of runs of equal blocks (index arithmetic XLA fuses into the consumer,
    where ``jnp.repeat`` is a gather per element)."""
    axis = axis % per_block.ndim
    pieces, start = [], 0
    for size, run in _runs(blocks):
        part = jax.lax.slice_in_dim(per_block, start, start + run, axis=axis)
        wide = part.shape[: axis + 1] + (size,) + part.shape[axis + 1 :]
        part = jnp.broadcast_to(jnp.expand_dims(part, axis + 1), wide)
        pieces.append(part.reshape(part.shape[:axis] + (run * size,) + part.shape[axis + 2 :]))
        start += run
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def _runs(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[(size, count), ...]`` of consecutive equal blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def select_levels(codes: jax.Array, levels: jax.Array) -> jax.Array:
    """``levels[k, codes[k, n]]``: float32 ``[Kpad, N]`` from uint8 codes ``[Kpad, N]`` and
    per-position levels ``[Kpad, L]``.

    Up to 16 levels, a tree of selects on the code's bits (dense, vectorized by XLA on CPU,
    where a gather of the same values runs element by element); a gather beyond.
    """
    n_levels = levels.shape[-1]
    if n_levels > 16:
        return jnp.take_along_axis(levels, codes.astype(jnp.int32), axis=1)
    picks = [levels[:, i : i + 1] for i in range(n_levels)]
    bit = 0
    while len(picks) > 1:
        on = ((codes >> jnp.uint8(bit)) & jnp.uint8(1)).astype(bool)
        picks = [jnp.where(on, picks[2 * i + 1], picks[2 * i]) for i in range(len(picks) // 2)]
        bit += 1
    return jnp.broadcast_to(picks[0], codes.shape)


def tied_to(a: jax.Array, x: jax.Array) -> jax.Array:
    """``a`` unchanged, but computed from ``x``: a weight decoded from it cannot be scheduled
    before the activation it multiplies. Without this XLA decodes every weight of a model up
    front (they do not depend on the activations) and holds all the float decodes at once
    (a whole float model of temporaries, streamed through memory on every call); an
    ``optimization_barrier`` does not survive XLA's CPU pipeline."""
    never = jnp.abs(x.reshape(-1)[0]) > jnp.inf  # false for every value, NaN included
    return a + never.astype(a.dtype)


def decode_rows(codes: jax.Array, norms: jax.Array, codebooks: jax.Array, bits: int,
                blocks: tuple[int, ...]) -> jax.Array:
    """Rotated CQ rows as float32 ``[..., Kpad]`` from packed rows ``[..., row_bytes]`` and their
    norms ``[..., nblocks]`` (the plain reference decode)."""
    idx = fmt.unpack_codes_jnp(codes, bits, sum(blocks)).astype(jnp.int32)
    block_id = np.repeat(np.arange(len(blocks)), blocks)
    levels = codebooks.astype(jnp.float32).reshape(-1)[jnp.asarray(block_id * (1 << bits)) + idx]
    return levels * expand_blocks(norms.astype(jnp.float32), blocks)


def decode_columns(codes_t: jax.Array, norms_t: jax.Array, codebooks: jax.Array, bits: int,
                   blocks: tuple[int, ...]) -> jax.Array:
    """Rotated CQ weights as float32 ``[Kpad, n]`` from codes in the transposed layout
    ``[row_bytes, n]`` and norms ``[nblocks, n]``.

    Unpacked along the byte axis, the levels picked by :func:`select_levels`: XLA's CPU dot
    reads ``[K, N]`` ~19x faster than ``[N, K]`` at batch 1, and no transpose of the
    decoded weight is ever needed.
    """
    codes = fmt.unpack_codes_jnp(codes_t, bits, sum(blocks), axis=0)
    levels = select_levels(codes, expand_blocks(codebooks.astype(jnp.float32), blocks, axis=0))
    return levels * expand_blocks(norms_t.astype(jnp.float32), blocks, axis=0)


class InputScaleMixin:
    """The optional ``in_scale`` of a quantized leaf (see the module docstring)."""

    def scale_input(self, x):
        """``x / in_scale`` along the last (input) dim, float32; ``x`` itself without a scale."""
        if self.in_scale is None:
            return x
        return x.astype(jnp.float32) / self.in_scale.astype(jnp.float32)

    def unscale_rows(self, rows):
        """Decoded rows ``[..., K]`` divided by ``in_scale`` (the rows the leaf stands for)."""
        if self.in_scale is None:
            return rows
        return rows / self.in_scale.astype(jnp.float32)


class _RowsMixin(InputScaleMixin):
    """matmul / take_rows / attend from ``decode_rows`` (+ optional rotation hooks)."""

    def tied(self, x):
        """This leaf with its codes :func:`tied_to` ``x``."""
        return self.replace(codes=tied_to(self.codes, x))

    def rotate_activation(self, x):
        return x

    def unrotate_rows(self, rows):
        return rows

    @classmethod
    def concat_rows(cls, parts: Sequence[_RowsMixin]) -> _RowsMixin:
        """The leaf whose rows are those of ``parts`` in order (each quantized alone, sharing the
        rotation, levels and static fields); an error if the shared fields differ."""
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            for f in dataclasses.fields(first):
                a, b = getattr(first, f.name), getattr(p, f.name)
                if f.name not in cls.ROW_FIELDS and not (a is b or (a is not None and b is not None and
                                                         np.array_equal(np.asarray(a), np.asarray(b)))):
                    raise ValueError(f"{cls.__name__}.concat_rows: part {i} differs from part 0 in {f.name!r}")
        return first.replace(**{f: jnp.concatenate([getattr(p, f) for p in parts]) for f in cls.ROW_FIELDS})

    @property
    def logical_shape(self) -> tuple[int, int]:
        rows = self.codes.shape[0]
        return (self.K, rows) if self.transposed else (rows, self.K)

    @property
    def shape(self) -> tuple[int, int]:
        return self.logical_shape

    @property
    def ndim(self) -> int:
        return 2

    def dequantize(self) -> jax.Array:
        """The float leaf this stands for (``[K, N]`` or ``[V, D]``), for references and tests."""
        rows = self.unrotate_rows(self.decode_rows(self.codes, self.norms_or_scales()))[..., : self.K]
        rows = self.unscale_rows(rows)
        return rows.T if self.transposed else rows

    def _dot_rows(self, x):
        return self._dot_rows_jnp(x)

    def _dot_rows_jnp(self, x):
        """The pure-JAX path: scale and rotate ``x``, decode the weight as ``[Kpad, rows]``
        (:meth:`decode_kn`), one dot (float32)."""
        xr = self.rotate_activation(self.scale_input(x.astype(jnp.float32)))
        return backend.dot(xr, self.tied(xr).decode_kn())

    def reference_dot(self, x):
        """``x @ dequantize()`` or ``x @ dequantize().T`` (float32): the plain reference every
        fast path (pure JAX, C++ kernel) is checked against."""
        w = self.dequantize()
        return jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w if self.transposed else w.T)

    def matmul(self, x):
        assert self.transposed, "matmul is for kernels [K, N]; use attend for tables"
        return self._dot_rows(x).astype(x.dtype)

    def attend(self, x):
        return self._dot_rows(x).astype(x.dtype)

    def take_rows(self, ids):
        return self._take_rows_jnp(ids)

    def _take_rows_jnp(self, ids):
        rows = self.decode_rows(jnp.take(self.codes, ids, axis=0), jnp.take(self.norms_or_scales(), ids, axis=0))
        return self.unscale_rows(self.unrotate_rows(rows)[..., : self.K])


@struct.dataclass
class CQArray(_RowsMixin):
    """Rotation + per-(row, block) fp16 norm + Lloyd–Max codebook, bit-packed (layout v1).

    Attributes:
      codes: uint8 ``[rows, row_bytes]`` packed as :mod:`cqjax.formats.cq` documents.
      norms: float16 ``[rows, nblocks]``.
      codebooks: float16 ``[nblocks, 2**bits]`` (one per block; blocks of one size share values).
      s1, s2, perm: the rotation (:class:`cqjax.formats.rotation.Rotation`) arrays ``[Kpad]``.
      in_scale: optional float16 ``[K]`` input scales (see the module docstring); None: absent.
    """

    ROW_FIELDS: ClassVar[tuple[str, ...]] = ("codes", "norms")

    codes: jax.Array
    norms: jax.Array
    codebooks: jax.Array
    s1: jax.Array
    s2: jax.Array
    perm: jax.Array
    bits: int = struct.field(pytree_node=False)
    blocks: tuple[int, ...] = struct.field(pytree_node=False)
    K: int = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False)
    seed: int = struct.field(pytree_node=False, default=0)
    format: str = struct.field(pytree_node=False, default="cq")
    in_scale: jax.Array | None = None

    @classmethod
    def pack(cls, codes: np.ndarray, norms: np.ndarray, codebooks: dict[int, np.ndarray],
             rot: rotation.Rotation, *, bits: int, K: int, transposed: bool) -> CQArray:
        """The leaf of unpacked ``codes`` uint8 ``[rows, Kpad]``, fp16 ``norms [rows, nblocks]``,
        levels per block size ``{b: [2**bits]}`` (stored as fp16, one row per block) and ``rot``."""
        s1, s2, perm = rot.arrays()
        books = np.stack([np.asarray(codebooks[b], np.float32) for b in rot.blocks]).astype(np.float16)
        return cls(codes=jnp.asarray(fmt.pack_codes(codes, bits)), norms=jnp.asarray(norms),
                   codebooks=jnp.asarray(books), s1=jnp.asarray(s1), s2=jnp.asarray(s2), perm=jnp.asarray(perm),
                   bits=bits, blocks=tuple(rot.blocks), K=K, transposed=transposed, seed=rot.seed)

    def norms_or_scales(self):
        return self.norms

    def decode_rows(self, codes, norms):
        return decode_rows(codes, norms, self.codebooks, self.bits, self.blocks)

    def decode_kn(self):
        """The rotated weight as float32 ``[Kpad, rows]`` (``decode_rows`` of every row,
        transposed): :func:`decode_columns` of the transposed codes."""
        return decode_columns(self.codes.T, self.norms.T, self.codebooks, self.bits, self.blocks)

    def rotate_activation(self, x):
        return rotation.rotate_jnp(x, (self.s1, self.s2, self.perm), self.blocks)

    def _dot_rows(self, x):
        # C++ kernel on CPU (see cqjax.kernels.backend), pure JAX elsewhere or when forced.
        return backend.dot_rows(self, x, self._dot_rows_jnp)

    def take_rows(self, ids):
        return backend.take_rows(self, ids, self._take_rows_jnp)

    def unrotate_rows(self, rows):
        return rotation.unrotate_jnp(rows, (self.s1, self.s2, self.perm), self.blocks)


@struct.dataclass
class RTNArray(_RowsMixin):
    """Round-to-nearest uniform codes with an fp16 scale and zero per (row, block).

    Attributes:
      codes: uint8 ``[rows, row_bytes]`` packed like CQ codes over ``Kpad = ceil8(K)``.
      scales, zeros: float16 ``[rows, nblocks]``; ``w = code * scale + zero``.
      in_scale: optional float16 ``[K]`` input scales (see the module docstring); None: absent.
    """

    ROW_FIELDS: ClassVar[tuple[str, ...]] = ("codes", "scales", "zeros")

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int = struct.field(pytree_node=False)
    blocks: tuple[int, ...] = struct.field(pytree_node=False)
    K: int = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False)
    format: str = struct.field(pytree_node=False, default="rtn")
    in_scale: jax.Array | None = None

    @classmethod
    def pack(cls, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, *, bits: int, block: int,
             K: int, transposed: bool) -> RTNArray:
        """The leaf of unpacked ``codes`` uint8 ``[rows, K]`` and fp16 ``scales``/``zeros``
        ``[rows, nblocks]`` (:mod:`cqjax.formats.rtn`)."""
        padded = np.zeros((codes.shape[0], rtn.kpad(K)), np.uint8)
        padded[:, :K] = codes
        return cls(codes=jnp.asarray(fmt.pack_codes(padded, bits)), scales=jnp.asarray(scales),
                   zeros=jnp.asarray(zeros), bits=bits, blocks=rtn.blocks(K, block), K=K, transposed=transposed)

    def norms_or_scales(self):
        return jnp.stack([self.scales, self.zeros], axis=-1)

    def decode_rows(self, codes, scale_zero):
        kpad = rtn.kpad(self.K)
        q = fmt.unpack_codes_jnp(codes, self.bits, kpad)[..., : self.K].astype(jnp.float32)
        sz = scale_zero.astype(jnp.float32)
        return q * expand_blocks(sz[..., 0], self.blocks) + expand_blocks(sz[..., 1], self.blocks)

    def decode_kn(self):
        """The weight as float32 ``[K, rows]`` (see :meth:`CQArray.decode_kn`)."""
        q = fmt.unpack_codes_jnp(self.codes.T, self.bits, rtn.kpad(self.K), axis=0)[: self.K].astype(jnp.float32)
        scale = expand_blocks(self.scales.T.astype(jnp.float32), self.blocks, axis=0)
        return q * scale + expand_blocks(self.zeros.T.astype(jnp.float32), self.blocks, axis=0)


QARRAY_TYPES = (CQArray, RTNArray)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QARRAY_TYPES)
