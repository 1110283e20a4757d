"""What block-by-block passes (tuning, sequential error feedback) share: calibration rows run a
few at a time through the model's ``embed`` (see :class:`cqjax.models.transformer.OutputHead`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: Rows per jitted call (bounds the activations held at once).
CHUNK = 4


def chunks(n: int) -> list[slice]:
    """Slices of at most :data:`CHUNK` rows covering ``range(n)``."""
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


def take_rows(tree, idx):
    """Rows ``idx`` of every array of a pytree (side inputs of a block)."""
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def embed(model, tokens: np.ndarray):
    """``(x, side)``: the first block's input and side inputs for all rows, a few at a time."""
    g, state = nnx.split(model)
    run = jax.jit(lambda state, tok: nnx.merge(g, state).embed(tok))
    parts = [run(state, jnp.asarray(tokens[c])) for c in chunks(len(tokens))]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)
