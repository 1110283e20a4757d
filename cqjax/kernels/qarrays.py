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

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cqjax.formats import cq as fmt
from cqjax.formats import rotation, rtn
from cqjax.kernels import backend


def _expand(per_block: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
    """``[..., nblocks]`` → ``[..., Kpad]`` by repeating each block's value over its width."""
    return jnp.repeat(per_block, np.asarray(blocks), axis=-1, total_repeat_length=sum(blocks))


class _RowsMixin:
    """matmul / take_rows / attend from ``decode_rows`` (+ optional rotation hooks)."""

    def rotate_activation(self, x):
        return x

    def unrotate_rows(self, rows):
        return rows

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
        """The pure-JAX reference: scale and rotate ``x``, decode every row, einsum (float32)."""
        xr = self.rotate_activation(self.scale_input(x.astype(jnp.float32)))
        w = self.decode_rows(self.codes, self.norms_or_scales())
        return jnp.einsum("...k,nk->...n", xr, w)

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
        kpad = sum(self.blocks)
        idx = fmt.unpack_codes_jnp(codes, self.bits, kpad).astype(jnp.int32)
        block_id = np.repeat(np.arange(len(self.blocks)), self.blocks)
        flat = self.codebooks.astype(jnp.float32).reshape(-1)
        levels = flat[jnp.asarray(block_id * (1 << self.bits)) + idx]
        return levels * _expand(norms.astype(jnp.float32), self.blocks)

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
        return q * _expand(sz[..., 0], self.blocks) + _expand(sz[..., 1], self.blocks)


QARRAY_TYPES = (CQArray, RTNArray)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QARRAY_TYPES)
