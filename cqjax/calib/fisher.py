"""Diagonal Fisher information of the float model: how much each weight matters to the output.

``F[w] = mean over calibration rows s of (∂ L_s / ∂ w)²`` with ``L_s`` the mean next-token
negative log-likelihood of row ``s``. On rows the model sampled itself (calibration source
``"self"``) the targets follow the model's own distribution, so this estimates the true Fisher,
whose quadratic form ``½ Σ F δw²`` approximates the KL between the float model and one with
weights ``w + δw``: the sensitivity proxy of :mod:`cqjax.passes.allocate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.progress import Progress
from cqjax.sharding import place_batch


def fisher_diag(model: nnx.Module, tokens: np.ndarray, paths: Sequence[str], *,
                progress: bool = True) -> dict[str, np.ndarray]:
    """Per-path float32 arrays (the parameter's shape) of mean squared per-row gradients.

    Args:
      model: the float Flax model.
      tokens: int32 ``[n, T]`` calibration rows (all positions real).
      paths: '/'-joined parameter paths to keep (others are differentiated but dropped).
      progress: a progress line on stderr.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(params)}
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"fisher_diag: not parameters of the model: {missing[:5]}")

    def loss(params, tok):
        logits = nnx.merge(graphdef, params, rest)(tok, jnp.ones(tok.shape, bool))
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, tok[:, 1:, None], axis=-1))

    def step(params, acc, tok):
        g = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(jax.grad(loss)(params, tok))}
        return {p: acc[p] + jnp.square(g[p].astype(jnp.float32)) for p in acc}

    jstep = jax.jit(step, donate_argnums=1)
    acc = {p: jnp.zeros(flat[p].get_value().shape, jnp.float32) for p in paths}
    tokens = np.asarray(tokens, np.int32)
    bar = Progress("fisher", total=len(tokens), unit="rows", enabled=progress, tag="cqjax.calib")
    for i in range(len(tokens)):
        acc = jstep(params, acc, place_batch(jnp.asarray(tokens[i:i + 1])))
        if progress:  # count a row when it is computed, not when it is dispatched
            jax.block_until_ready(acc)
        bar.update(1)
    bar.close()
    return {p: np.asarray(a) / len(tokens) for p, a in acc.items()}
