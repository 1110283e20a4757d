"""Diagonal Fisher information of the float model: how much each weight matters to the output.

``F[w] = mean over calibration rows s of (∂ L_s / ∂ w)²`` with ``L_s`` the mean next-token
negative log-likelihood of row ``s`` (a speech recognizer's: of its transcript,
:func:`transcript_loss`; a sentence encoder's: its embedding along a random direction,
:func:`embedding_loss`). On rows the model sampled itself (calibration source
``"self"``) the targets follow the model's own distribution, so this estimates the true Fisher,
whose quadratic form ``½ Σ F δw²`` approximates the KL between the float model and one with
weights ``w + δw``: the sensitivity proxy of :mod:`cqjax.passes.allocate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.progress import Progress
from cqjax.sharding import place_batch


def next_token_loss(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """A causal LM's mean next-token negative log-likelihood over ``tokens [B, T]`` (all real)."""
    logits = model(tokens, jnp.ones(tokens.shape, bool))
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))


def transcript_loss(model: nnx.Module, features: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """A speech recognizer's (:class:`cqjax.models.whisper.SpeechToText`) mean negative
    log-likelihood of its teacher-forced transcripts ``tokens [B, T]`` given log-mel ``features``;
    only next tokens where ``mask`` holds count (the empirical Fisher: the transcript, not a
    sample of the model, is the target)."""
    logits = model(features, tokens)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    counted = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def embedding_loss(model: nnx.Module, tokens: jax.Array, direction: jax.Array) -> jax.Array:
    """A sentence encoder's (``model.sentence_embedding``, e.g.
    :class:`cqjax.models.bert.SentenceEncoder`) embedding ``e`` of ``tokens [B, T]`` (all real)
    along ``direction [B, D]`` drawn from N(0, I). Its squared gradient has expectation
    ``Σ_d (∂e_d / ∂w)²`` over the directions: the Gauss-Newton diagonal of the embedding, whose
    quadratic form ``½ Σ F δw²`` approximates ``½ ‖δe‖² = 1 − cos(e, e + δe)`` for unit
    embeddings — the cosine the encoder's evaluation reads."""
    return jnp.sum(model.sentence_embedding(tokens, jnp.ones(tokens.shape, bool)) * direction)


def fisher_diag(model: nnx.Module, rows: np.ndarray | tuple[np.ndarray, ...], paths: Sequence[str], *,
                loss: Callable[..., jax.Array] = next_token_loss, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-path float32 arrays (the parameter's shape) of mean squared per-row gradients.

    Args:
      model: the float Flax model.
      rows: what ``loss`` reads after the model, one calibration row per index of the leading
        axis: int32 tokens ``[n, T]`` for :func:`next_token_loss` (the default), or a tuple of
        arrays (a ``tuple``), e.g. ``(features, tokens, mask)`` for :func:`transcript_loss`.
      paths: '/'-joined parameter paths to keep (others are differentiated but dropped).
      loss: ``loss(model, *row_batch) -> scalar``, the mean loss of a batch of one row.
      progress: a progress line on stderr.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(params)}
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"fisher_diag: not parameters of the model: {missing[:5]}")
    arrays = tuple(map(np.asarray, rows)) if isinstance(rows, tuple) else (np.asarray(rows, np.int32),)

    def step(params, acc, *row):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), *row))(params)
        g = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(grads)}
        return {p: acc[p] + jnp.square(g[p].astype(jnp.float32)) for p in acc}

    jstep = jax.jit(step, donate_argnums=1)
    acc = {p: jnp.zeros(flat[p].get_value().shape, jnp.float32) for p in paths}
    n = len(arrays[0])
    bar = Progress("fisher", total=n, unit="rows", enabled=progress, tag="cqjax.calib")
    for i in range(n):
        acc = jstep(params, acc, *(place_batch(jnp.asarray(a[i:i + 1])) for a in arrays))
        if progress:  # count a row when it is computed, not when it is dispatched
            jax.block_until_ready(acc)
        bar.update(1)
    bar.close()
    return {p: np.asarray(a) / n for p, a in acc.items()}
