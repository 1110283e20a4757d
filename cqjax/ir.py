"""The IR: a model as a flat, path-addressed mapping of leaves plus per-path metadata.

Every parameter of an imported model is addressed by the '/'-joined path of its Flax NNX
state (``layers/3/attn/q_proj/kernel``). The IR is plain data: passes rewrite it out of place
and the Flax model is rebuilt from it with :func:`to_model`.

==========  ===============================================================================
field       meaning
==========  ===============================================================================
family      the model family name (``llama``, ``qwen2``, ``qwen3``, ``gemma3``, ``gemma4``)
config      the family's frozen config dataclass (parsed from the checkpoint's config.json)
params      ``{path: leaf}``; a leaf is a NumPy/JAX array, a :class:`LazyTensor`, or (later) a
            quantized leaf
meta        ``{path: TensorMeta}``; same keys as ``params``
==========  ===============================================================================

Invariants (checked by :func:`verify`): ``params`` and ``meta`` have the same keys; each
leaf's shape equals ``meta[path].shape``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

Role = Literal[
    "linear", "embedding", "per_layer_embedding", "lm_head", "norm", "bias", "conv", "router", "other"
]
Tower = Literal["text", "vision", "audio"]
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]
TOWERS: tuple[str, ...] = Tower.__args__  # type: ignore[attr-defined]
#: Roles of the tensors that recipes quantize (2-D ones: :data:`cqjax.quant_stats.ELIGIBLE`). A
#: convolution's kernel is the linear of its unfolded input, ``[width x in, out]``, so it is
#: rotated and quantized over that input dimension like any linear.
ELIGIBLE_ROLES: tuple[str, ...] = ("linear", "embedding", "per_layer_embedding", "lm_head", "conv")
#: Roles stored as ``[in, out]`` kernels (a quantized kernel's rows are its columns).
KERNEL_ROLES: tuple[str, ...] = ("linear", "lm_head", "conv")
#: Gathered tables and the output head (``quant.embed_bits`` covers these).
EMBED_ROLES: tuple[str, ...] = ("embedding", "per_layer_embedding", "lm_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorMeta:
    """What the IR knows about one parameter.

    Attributes:
      role: what the tensor does (one of :data:`ROLES`).
      tower: which tower it belongs to (one of :data:`TOWERS`).
      hf_name: the tensor's name in the source checkpoint ('' if it has none).
      shape: the shape of the leaf as stored in the IR (linear kernels are ``[in, out]``).
      dtype: the dtype of the source tensor, as a NumPy dtype name (``float32``, ``bfloat16``).
      info: free-form records that passes add (bits, seed, codebook, ...).
    """

    role: str
    tower: str = "text"
    hf_name: str = ""
    shape: tuple[int, ...]
    dtype: str
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} for {self.hf_name!r}; expected one of {ROLES}")
        if self.tower not in TOWERS:
            raise ValueError(f"unknown tower {self.tower!r} for {self.hf_name!r}; expected one of {TOWERS}")

    def replace(self, **changes) -> TensorMeta:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor that is read only when :meth:`load` is called.

    Attributes:
      shape: shape after ``transform``.
      dtype: NumPy dtype name of the source tensor.
      source: human-readable origin (``file.safetensors:tensor.name``) used in error messages.
      reader: returns the source array (e.g. a safetensors memory-mapped slice).
      transform: applied to the source array (e.g. a transpose to ``[in, out]``).
    """

    shape: tuple[int, ...]
    dtype: str
    source: str
    reader: Callable[[], np.ndarray]
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        array = self.reader()
        if self.transform is not None:
            array = self.transform(array)
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{self.source}: loaded shape {tuple(array.shape)} != expected {self.shape}")
        return array


def materialize(leaf: Any) -> Any:
    """Returns the array behind ``leaf`` (loads a :class:`LazyTensor`, passes others through)."""
    return leaf.load() if isinstance(leaf, LazyTensor) else leaf


@dataclasses.dataclass(frozen=True, eq=False)
class IR:
    """A model as data. See the module docstring for the fields and invariants."""

    family: str
    config: Any
    params: Mapping[str, Any]
    meta: Mapping[str, TensorMeta]

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.params)

    def replace(self, **changes) -> IR:
        """Returns a new IR with ``params``/``meta`` entries updated (mapping merge)."""
        params = dict(self.params)
        params.update(changes.pop("params", {}))
        meta = dict(self.meta)
        meta.update(changes.pop("meta", {}))
        return dataclasses.replace(self, params=params, meta=meta, **changes)

    def num_params(self, where: Callable[[str, TensorMeta], bool] | None = None) -> int:
        return sum(
            int(np.prod(m.shape)) for p, m in self.meta.items() if where is None or where(p, m)
        )


def verify(ir: IR) -> None:
    """Raises ``ValueError`` naming the path when an IR invariant does not hold."""
    missing = set(ir.params) ^ set(ir.meta)
    if missing:
        raise ValueError(f"params and meta disagree on paths: {sorted(missing)[:5]}")
    for path, leaf in ir.params.items():
        shape = tuple(getattr(leaf, "shape", ()))
        if hasattr(leaf, "logical_shape"):
            shape = tuple(leaf.logical_shape)
        if shape != tuple(ir.meta[path].shape):
            raise ValueError(f"{path}: leaf shape {shape} != meta shape {ir.meta[path].shape}")
