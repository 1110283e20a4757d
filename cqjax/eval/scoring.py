"""Jitted scoring kernels shared by perplexity, multiple choice and similarity.

A *forward* is ``forward(tokens: int32[B, T], mask: bool[B, T]) -> float32 logits[B, T, V]``:
pure, jittable, right-padded rows, ``mask`` True on real tokens, positions from 0 in each row.

Weights: ``jax.jit`` embeds arrays that a closure captures into the compiled program as
constants (measured: a 256 MB matrix costs 3 s and a 537 MB HLO text). Wrap a model with
:func:`bind` (or :func:`from_nnx` for a Flax NNX module) so its weights are passed to the
jitted step as arguments instead; a plain ``forward`` is fine for small test models.

Every kernel takes ``(tokens, mask, score)`` where ``score[b, t]`` marks the tokens whose
log-probability counts: token ``t`` is predicted by the logits at ``t - 1``, so ``score[:, 0]``
must be False. Reductions use ``jnp.where`` (never a multiply by the mask), so garbage or NaN
logits at padded positions cannot leak into the sums. Log-softmax, KL and argmax run inside
jit, and only per-row sums leave the device: at most one batch of ``[B, T, V]`` logits per
model exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.sharding import place_batch

Forward = Callable[[jax.Array, jax.Array], jax.Array]


class BoundForward:
    """A forward with explicit weights: ``bound(tokens, mask) == fn(params, tokens, mask)``.

    The scorers pass ``params`` (any pytree of arrays) to their jitted step as an argument,
    so the weights are not baked into the compiled program.

    Optionally split at the output head: ``hidden_fn(params, tokens, mask) -> h [B, T, D]`` and
    ``head_fn(params, h [..., D]) -> logits [..., V]`` with ``fn == head_fn ∘ hidden_fn``. Scorers
    that need only a few positions' logits (multiple choice) then apply the head to those
    positions alone: with a large vocabulary the head is most of the model's work.
    """

    def __init__(self, fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any, *,
                 hidden_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None,
                 head_fn: Callable[[Any, jax.Array], jax.Array] | None = None):
        if (hidden_fn is None) != (head_fn is None):
            raise ValueError("BoundForward: give both hidden_fn and head_fn, or neither")
        self.fn, self.params = fn, params
        self.hidden_fn, self.head_fn = hidden_fn, head_fn

    def __call__(self, tokens, mask):
        return self.fn(self.params, tokens, mask)


def bind(fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any) -> BoundForward:
    """Binds weights to ``fn(params, tokens, mask) -> logits``; see :class:`BoundForward`."""
    return BoundForward(fn, params)


def from_nnx(model: Any) -> BoundForward:
    """A bound forward for a Flax NNX module called as ``model(tokens, mask) -> logits``.

    Models with ``hidden_states(tokens, mask) -> (h, caches)`` and ``logits(h)`` (the cqjax
    causal LMs) are also split at the head (see :class:`BoundForward`).
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    if graphdef in _NNX_FORWARDS:  # same structure: same functions, so compilations are shared
        fn, hidden_fn, head_fn = _NNX_FORWARDS[graphdef]
        return BoundForward(fn, state, hidden_fn=hidden_fn, head_fn=head_fn)

    def fn(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask)

    hidden_fn = head_fn = None
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        def hidden_fn(state, tokens, mask):
            return nnx.merge(graphdef, state).hidden_states(tokens, mask)[0]

        def head_fn(state, h):
            return nnx.merge(graphdef, state).logits(h)

    _NNX_FORWARDS[graphdef] = (fn, hidden_fn, head_fn)
    return BoundForward(fn, state, hidden_fn=hidden_fn, head_fn=head_fn)


#: from_nnx's functions per model structure (GraphDef), and the scorers' jitted steps per
#: function: evaluating many models of one structure (a float model and its dequantized
#: variants) compiles each shape once.
_NNX_FORWARDS: dict[Any, tuple] = {}
_JITTED: dict[tuple, Any] = {}


def _jit_once(key: tuple, make: Callable[[], Callable]) -> Callable:
    """``jax.jit(make())``, shared by every scorer built with the same ``key`` (a tag and the
    forwards' :func:`_key`; ``_UNBOUND`` in it means a plain forward, then nothing is shared)."""
    if _UNBOUND in key:
        return jax.jit(make())
    if key not in _JITTED:
        _JITTED[key] = jax.jit(make())
    return _JITTED[key]


_UNBOUND = object()


def _batch(*arrays: jax.Array) -> tuple:
    """Batch operands split over the data axis of the active mesh (:mod:`cqjax.sharding`)."""
    return tuple(place_batch(a) for a in arrays)


def _key(forward) -> tuple:
    if isinstance(forward, BoundForward):
        return (forward.fn, forward.hidden_fn, forward.head_fn)
    return (_UNBOUND,)


def _unbind(forward: Forward | BoundForward) -> tuple[Callable, Any]:
    if isinstance(forward, BoundForward):
        return forward.fn, forward.params
    return (lambda _params, tokens, mask: forward(tokens, mask)), None


def _gathered_logits(forward: Forward | BoundForward) -> Callable:
    """``f(params, tokens, mask, positions [B, C]) -> logits [B, C, V]`` at those positions only.

    Uses the forward's head split when it has one, else slices the full logits.
    """
    if isinstance(forward, BoundForward) and forward.hidden_fn is not None:
        hidden_fn, head_fn = forward.hidden_fn, forward.head_fn

        def f(params, tokens, mask, positions):
            h = hidden_fn(params, tokens, mask)
            return head_fn(params, jnp.take_along_axis(h, positions[..., None], axis=1))

        return f
    fn, _ = _unbind(forward)

    def f(params, tokens, mask, positions):
        return jnp.take_along_axis(fn(params, tokens, mask), positions[..., None], axis=1)

    return f


def _shifted_logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (log-softmax of logits[:, :-1] in f32, log P(tokens[:, 1:]))."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return logp, target


def _target_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log P(tokens[:, 1:]) without materializing a second [B, T, V] array."""
    lg = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


class LogLikelihoodScorer:
    """Sums of token log-likelihoods per row, jitted once per input shape.

    Build one per model and reuse it across perplexity and multiple-choice calls so each
    shape bucket compiles once.

    Example:
      >>> import jax.numpy as jnp
      >>> fwd = lambda t, m: jnp.zeros(t.shape + (5,))
      >>> s = LogLikelihoodScorer(fwd)
      >>> tok = np.array([[1, 2, 3, 0]], np.int32); m = np.array([[1, 1, 1, 0]], bool)
      >>> sc = np.array([[0, 1, 1, 0]], bool)
      >>> float(s(tok, m, sc)[0])  # two tokens at log(1/5) each
      -3.218875...
    """

    def __init__(self, forward: Forward | BoundForward):
        self.forward = forward
        fn, self._params = _unbind(forward)

        def step(params, tokens, mask, score):
            lp = _target_logprobs(fn(params, tokens, mask), tokens)
            return jnp.sum(jnp.where(score[:, 1:], lp, 0.0), axis=1)

        gathered = _gathered_logits(forward)

        def step_at(params, tokens, mask, positions, targets, valid):
            lg = gathered(params, tokens, mask, positions).astype(jnp.float32)
            picked = jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0]
            lp = picked - jax.nn.logsumexp(lg, axis=-1)
            return jnp.sum(jnp.where(valid, lp, 0.0), axis=1)

        key = _key(forward)
        self._step = _jit_once(("ll",) + key, lambda: step)
        self._step_at = _jit_once(("ll_at",) + key, lambda: step_at)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Returns float64[B]: the sum of log P over the scored tokens of each row."""
        out = self._step(self._params, *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                                               jnp.asarray(score, bool)))
        return np.asarray(out, np.float64)

    def score_at(self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                 targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Sums of ``log P(targets[b, c] | logits at positions[b, c])`` where ``valid``.

        The same sums as :meth:`__call__` with ``score[b, positions + 1] = True`` and
        ``targets = tokens[b, positions + 1]``, but the output head runs only at
        ``positions`` when the forward is split at the head (:class:`BoundForward`).

        Args:
          tokens, mask: ``[B, T]`` as for :meth:`__call__`.
          positions: int32 ``[B, C]`` indices into T of the predicting positions.
          targets: int32 ``[B, C]`` the token each position predicts.
          valid: bool ``[B, C]``; False entries (padding) add nothing.

        Returns:
          float64[B].
        """
        out = self._step_at(self._params, *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                                                  jnp.asarray(positions, jnp.int32), jnp.asarray(targets, jnp.int32),
                                                  jnp.asarray(valid, bool)))
        return np.asarray(out, np.float64)


def as_scorer(forward_or_scorer: Forward | BoundForward | LogLikelihoodScorer) -> LogLikelihoodScorer:
    """Wraps a forward in a :class:`LogLikelihoodScorer` unless it already is one."""
    if isinstance(forward_or_scorer, LogLikelihoodScorer):
        return forward_or_scorer
    return LogLikelihoodScorer(forward_or_scorer)


SIMILARITY_FIELDS = ("kl", "top1", "logp_model", "logp_ref")


class SimilarityScorer:
    """Per-row sums comparing a model to a reference on the same tokens, in one jitted step.

    Returns, summed over the scored positions of each row (the distribution at ``t - 1`` that
    predicts token ``t``):

    ==============  ==========================================================
    ``kl``          KL(ref || model) = sum_v p_ref (log p_ref - log p_model), nats
    ``top1``        count of positions where argmax(ref) == argmax(model)
    ``logp_model``  log P_model(token)
    ``logp_ref``    log P_ref(token)
    ==============  ==========================================================
    """

    def __init__(self, forward: Forward | BoundForward, ref_forward: Forward | BoundForward):
        self.forward, self.ref_forward = forward, ref_forward
        fn, p = _unbind(forward)
        ref_fn, ref_p = _unbind(ref_forward)
        self._params = (p, ref_p)

        def step(params, tokens, mask, score):
            lr, tr = _shifted_logprobs(ref_fn(params[1], tokens, mask), tokens)
            lm, tm = _shifted_logprobs(fn(params[0], tokens, mask), tokens)
            # Guard vocab entries with p_ref == 0 (logits of -inf): 0 * (-inf - x) would be NaN.
            kl_terms = jnp.where(jnp.isneginf(lr), 0.0, jnp.exp(lr) * (lr - lm))
            kl = jnp.sum(kl_terms, axis=-1)
            top1 = (jnp.argmax(lr, axis=-1) == jnp.argmax(lm, axis=-1)).astype(jnp.float32)
            sc = score[:, 1:]
            red = lambda x: jnp.sum(jnp.where(sc, x, 0.0), axis=1)  # noqa: E731
            return jnp.stack([red(kl), red(top1), red(tm), red(tr)], axis=0)

        self._step = _jit_once(("sim",) + _key(forward) + _key(ref_forward), lambda: step)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
        """Returns ``{field: float64[B]}`` for the fields in :data:`SIMILARITY_FIELDS`."""
        out = np.asarray(self._step(self._params, *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                                                          jnp.asarray(score, bool))), np.float64)
        return dict(zip(SIMILARITY_FIELDS, out))
