"""The math of tuning a quantized model's continuous parameters with its codes held fixed.

A model's state (a pytree of Flax NNX variables, quantized leaves inside) is split into the
floats that tuning may move and everything else (:class:`Tunable`). Each tuned array ``p`` is
trained through an offset ``t`` (zeros at the start) that keeps steps relative to its scale:

==========================================  =====================================================
array                                       parametrization
==========================================  =====================================================
CQ norms, RTN scales, input scales          ``p0 · (1 + t)`` (positive magnitudes, per entry)
codebook levels, RTN zeros, norm weights,   ``p0 + rms(p0) · t`` (``rms`` floored at 1e-3)
biases
==========================================  =====================================================

Losses:

* :func:`relative_mse`: a block's output against the float block's, ``‖y_t − y_f,t‖² / ‖y_f,t‖²``
  averaged over tokens.
* :func:`topk_kl`: KL of the teacher's next-token distribution coarsened to its top ``k``
  tokens plus one "rest" bucket, to the student's distribution coarsened the same way (exact
  for that partition, never more than the full KL; a ``k``-entry teacher fits any vocabulary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: Fields of quantized leaves that tuning moves, and how (see the module table).
MULTIPLICATIVE = ("norms", "scales", "in_scale")
ADDITIVE = ("codebooks", "zeros")


@dataclasses.dataclass(frozen=True, eq=False)
class Tunable:
    """A pytree split into tuned float leaves (offsets from their start values) and the rest.

    A tuned leaf is ``base · (1 + mult · t) + scale · t`` for its offset ``t`` (``mult`` 1 and
    ``scale`` 0 for a multiplicative one, ``mult`` 0 and ``scale`` its rms for an additive one).

    Attributes:
      treedef: the pytree's structure.
      frozen: its leaves, with None where a leaf is tuned.
      base: ``{key: float32 start value}`` of the tuned leaves.
      mult, scale: ``{key: float32 scalar}`` (see above).
      names: ``{key: (IR path, field or None)}``, for writing results back.
    """

    treedef: Any
    frozen: list
    base: dict[str, jax.Array]
    mult: dict[str, jax.Array]
    scale: dict[str, jax.Array]
    names: dict[str, tuple[str, str | None]]

    @classmethod
    def of(cls, tree: Any, select: Callable[[str, str | None], bool], prefix: str = "") -> Tunable:
        """Splits ``tree``: a float leaf at IR path ``p`` (field ``f`` of a quantized leaf, or
        None) is tuned when ``select(p, f)``."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        frozen, base, mult, scale, names = [], {}, {}, {}, {}
        for i, (kp, leaf) in enumerate(flat):
            path, field = leaf_name(kp, prefix)
            if jnp.issubdtype(leaf.dtype, jnp.floating) and select(path, field):
                key = str(i)
                value = jnp.asarray(leaf, jnp.float32)
                base[key], names[key] = value, (path, field)
                multiplicative = field in MULTIPLICATIVE
                mult[key] = jnp.float32(1.0 if multiplicative else 0.0)
                scale[key] = jnp.float32(0.0 if multiplicative else max(float(jnp.sqrt(jnp.mean(value ** 2))), 1e-3))
                frozen.append(None)
            else:
                frozen.append(leaf)
        return cls(treedef, frozen, base, mult, scale, names)

    @property
    def args(self) -> tuple:
        """``(frozen, base, mult, scale)``: what :func:`assemble` takes besides the offsets."""
        return self.frozen, self.base, self.mult, self.scale

    def zeros(self) -> dict[str, jax.Array]:
        """The offsets at the start (the tree as it was)."""
        return {k: jnp.zeros_like(v) for k, v in self.base.items()}

    def tree(self, t: Mapping[str, jax.Array]) -> Any:
        """The pytree with the tuned leaves at offsets ``t`` (float32)."""
        return assemble(self.treedef, *self.args, t)

    def stored(self, t: Mapping[str, jax.Array]) -> dict[tuple[str, str | None], np.ndarray]:
        """``{(IR path, field): float32 array}`` of the tuned leaves."""
        values = _values(self.base, self.mult, self.scale, t)
        return {self.names[k]: np.asarray(v, np.float32) for k, v in values.items()}


def _values(base, mult, scale, t):
    return {k: b * (1 + mult[k] * t[k]) + scale[k] * t[k] for k, b in base.items()}


def assemble(treedef, frozen, base, mult, scale, t) -> Any:
    """The pytree of a :class:`Tunable` at offsets ``t`` (differentiable in ``t``; jittable with
    ``treedef`` static)."""
    values = _values(base, mult, scale, t)
    return jax.tree_util.tree_unflatten(treedef, [values[str(i)] if leaf is None else leaf
                                                  for i, leaf in enumerate(frozen)])


def leaf_name(kp, prefix: str = "") -> tuple[str, str | None]:
    """``(IR path, field)`` of a leaf's key path in an NNX state: the module keys joined with
    '/', then the quantized leaf's field (None for a plain array)."""
    keys, attrs = [], []
    for k in kp:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            attrs.append(k.name)
    field = attrs[-1] if len(attrs) >= 2 else None  # "value" is the Variable's own
    return prefix + "/".join(keys), field


def relative_mse(y: jax.Array, target: jax.Array) -> jax.Array:
    """The mean over tokens of ``‖y_t − target_t‖² / ‖target_t‖²`` (float32; the last axis is
    the feature axis). Per token, because the next block reads each token's residual through an
    RMS norm: what matters is an error relative to that token's own scale, and a few tokens with
    massive activations must not outweigh the rest."""
    y, target = y.astype(jnp.float32), target.astype(jnp.float32)
    num = jnp.sum((y - target) ** 2, axis=-1)
    return jnp.mean(num / jnp.maximum(jnp.sum(target ** 2, axis=-1), 1e-30))


def teacher_topk(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(log-probs [.., k], ids [.., k], log of the rest's mass [..])`` of a teacher's logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, ids = jax.lax.top_k(logp, min(k, logp.shape[-1]))
    rest = jnp.log(jnp.clip(1.0 - jnp.sum(jnp.exp(top), axis=-1), 1e-12, 1.0))
    return top, ids, rest


def topk_kl(student_logits: jax.Array, top: jax.Array, ids: jax.Array, rest: jax.Array,
            valid: jax.Array | None = None) -> jax.Array:
    """Mean over valid positions of KL(teacher ‖ student), both coarsened to the teacher's top
    ``k`` tokens plus the rest (see the module docstring)."""
    logq_all = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    logq = jnp.take_along_axis(logq_all, ids, axis=-1)
    q_rest = jnp.log(jnp.clip(1.0 - jnp.sum(jnp.exp(logq), axis=-1), 1e-12, 1.0))
    kl = jnp.sum(jnp.exp(top) * (top - logq), axis=-1) + jnp.exp(rest) * (rest - q_rest)
    if valid is None:
        return jnp.mean(kl)
    w = valid.astype(jnp.float32)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """Adam with a cosine decay to 10% of ``lr`` over ``steps`` and global-norm clipping at 1."""
    schedule = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

