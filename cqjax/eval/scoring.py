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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.eval.streamed import StreamedLM
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


def _shifted_logprobs(logits: jax.Array, tokens: jax.Array, shifted: bool = True) -> tuple[jax.Array, jax.Array]:
    """Returns (log-softmax of logits[:, :-1] in f32, log P(tokens[:, 1:])); ``shifted=False``:
    the caller has already aligned them (logits[:, t] predicts tokens[:, t])."""
    if shifted:
        logits, tokens = logits[:, :-1], tokens[:, 1:]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logp, target


def _target_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log P(tokens[:, 1:]) without materializing a second [B, T, V] array."""
    lg = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


#: The most bytes of float32 logits one call of the output head makes: scorers with a forward
#: split at the head (:class:`BoundForward`) run it over chunks of positions.
HEAD_BYTES = 8 << 20


def _over_positions(part: Callable, vocab: int, *arrays: jax.Array) -> jax.Array:
    """``part(*chunks)`` summed over chunks of the position axis (axis 1) of ``arrays``, each
    chunk's ``[B, C, vocab]`` logits within :data:`HEAD_BYTES`; ``part`` returns per-row sums
    (and must count nothing where its score mask, padded with False, is False)."""
    b, t = arrays[0].shape[:2]
    width = int(max(1, min(t, HEAD_BYTES // (4 * b * vocab))))
    n = -(-t // width)
    if n == 1:
        return part(*arrays)
    pad = n * width - t
    padded = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]

    def body(total, i):
        return total + part(*(jax.lax.dynamic_slice_in_dim(a, i * width, width, axis=1) for a in padded)), None

    chunk = [jax.ShapeDtypeStruct((b, width, *a.shape[2:]), a.dtype) for a in arrays]
    zero = jnp.zeros(jax.eval_shape(part, *chunk).shape, jnp.float32)
    return jax.lax.scan(body, zero, jnp.arange(n))[0]


def _vocab(head_fn: Callable, params: Any, h: jax.Array) -> int:
    return jax.eval_shape(head_fn, params, h[:, :1]).shape[-1]


def _sum_target_logprobs(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """``float32[B]``: ``log softmax(logits)[targets]`` summed over positions where ``valid``
    (``logits [B, C, V]``, ``targets`` and ``valid`` ``[B, C]``)."""
    lg = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(lg, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, picked - jax.nn.logsumexp(lg, axis=-1), 0.0), axis=1)


def _ll_from_hidden(head_fn: Callable) -> Callable:
    """``f(params, h [B, T, D], tokens, score) -> float32[B]``: summed ``log P(tokens[t])`` from the
    head at ``t - 1``, where ``score[t]``."""

    def f(params, h, tokens, score):
        def part(hc, tc, sc):
            return _sum_target_logprobs(head_fn(params, hc), tc, sc)

        return _over_positions(part, _vocab(head_fn, params, h), h[:, :-1], tokens[:, 1:], score[:, 1:])

    return f


def _ll_at_from_hidden(head_fn: Callable) -> Callable:
    """``f(params, h, positions, targets, valid) -> float32[B]``: the head at ``positions`` only."""

    def f(params, h, positions, targets, valid):
        def part(hc, tc, vc):
            return _sum_target_logprobs(head_fn(params, hc), tc, vc)

        return _over_positions(part, _vocab(head_fn, params, h), jnp.take_along_axis(h, positions[..., None], axis=1),
                               targets, valid)

    return f


def _head(forward) -> tuple[Callable, Any] | None:
    """``(head_fn, params)`` of a forward split at the head (a :class:`StreamedLM` always is)."""
    if isinstance(forward, StreamedLM) or (isinstance(forward, BoundForward) and forward.hidden_fn is not None):
        return forward.head_fn, forward.params
    return None


def _hidden_states(forward, pairs: list[tuple[np.ndarray, np.ndarray]], progress: bool) -> list[jax.Array]:
    """Final-norm hidden states of each ``(tokens, mask)``: block by block for a
    :class:`StreamedLM`, else one jitted ``hidden_fn`` call per batch."""
    if isinstance(forward, StreamedLM):
        return forward.hidden_states(pairs, progress=progress)
    if _head(forward) is None:
        raise ValueError("a model scored together with a StreamedLM must be split at its output head "
                         "(a BoundForward with hidden_fn and head_fn, e.g. from_nnx of a cqjax model)")
    run = _jit_once(("hidden",) + _key(forward), lambda: forward.hidden_fn)
    return [run(forward.params, *_batch(jnp.asarray(t, jnp.int32), jnp.asarray(m, bool))) for t, m in pairs]


def _score_batches(forwards: Sequence, batches: Sequence[tuple], resident: Callable, from_hidden: Callable,
                   on_batch: Callable[[int], None] | None, progress: bool) -> list:
    """``resident(batch)`` for each batch, or, when one of ``forwards`` is a :class:`StreamedLM`,
    the batches in groups: every forward's hidden states for a group, then
    ``from_hidden(hidden_per_forward, batch)`` for each of its batches. A batch is a tuple whose
    first two entries are ``tokens, mask``; ``on_batch(j)`` is called as batch ``j`` is done."""
    out: list = [None] * len(batches)
    streamed = [f for f in forwards if isinstance(f, StreamedLM)]
    groups = (streamed[0].groups([np.shape(b[0]) for b in batches]) if streamed
              else [[j] for j in range(len(batches))])
    for group in groups:
        hidden = None
        if streamed:
            hidden = [_hidden_states(f, [tuple(batches[j][:2]) for j in group], progress) for f in forwards]
        for k, j in enumerate(group):
            out[j] = resident(batches[j]) if hidden is None else from_hidden([h[k] for h in hidden], batches[j])
            if on_batch is not None:
                on_batch(j)
    return out


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
        key = _key(forward)
        head = _head(forward)
        if isinstance(forward, StreamedLM):
            self._params = forward.params
        else:
            fn, self._params = _unbind(forward)
        if head is not None:  # the head runs over chunks of positions, or only where scored
            ll_h, ll_at_h = _ll_from_hidden(head[0]), _ll_at_from_hidden(head[0])
            self._from_hidden = _jit_once(("ll_h",) + key, lambda: ll_h)
            self._from_hidden_at = _jit_once(("ll_at_h",) + key, lambda: ll_at_h)
        if isinstance(forward, StreamedLM):
            return
        if head is not None:
            hidden_fn = forward.hidden_fn

            def step(params, tokens, mask, score):
                return ll_h(params, hidden_fn(params, tokens, mask), tokens, score)

            def step_at(params, tokens, mask, positions, targets, valid):
                return ll_at_h(params, hidden_fn(params, tokens, mask), positions, targets, valid)
        else:
            def step(params, tokens, mask, score):
                lp = _target_logprobs(fn(params, tokens, mask), tokens)
                return jnp.sum(jnp.where(score[:, 1:], lp, 0.0), axis=1)

            def step_at(params, tokens, mask, positions, targets, valid):
                logits = jnp.take_along_axis(fn(params, tokens, mask), positions[..., None], axis=1)
                return _sum_target_logprobs(logits, targets, valid)

        self._step = _jit_once(("ll",) + key, lambda: step)
        self._step_at = _jit_once(("ll_at",) + key, lambda: step_at)

    def score_batches(self, batches: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                      on_batch: Callable[[int], None] | None = None, progress: bool = False) -> list[np.ndarray]:
        """:meth:`__call__` of each ``(tokens, mask, score)`` batch (block by block for a
        :class:`StreamedLM`: all batches given at once); ``on_batch(j)`` as batch ``j`` is done."""
        def from_hidden(h, batch):
            tokens, _, score = batch
            out = self._from_hidden(self._params, h[0], *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(score, bool)))
            return np.asarray(out, np.float64)

        return _score_batches([self.forward], batches, lambda b: self(*b), from_hidden, on_batch, progress)

    def score_at_batches(self, batches: Sequence[tuple], *, on_batch: Callable[[int], None] | None = None,
                         progress: bool = False) -> list[np.ndarray]:
        """:meth:`score_at` of each ``(tokens, mask, positions, targets, valid)`` batch (block by
        block for a :class:`StreamedLM`); ``on_batch(j)`` as batch ``j`` is done."""
        def from_hidden(h, batch):
            _, _, positions, targets, valid = batch
            out = self._from_hidden_at(self._params, h[0], *_batch(
                jnp.asarray(positions, jnp.int32), jnp.asarray(targets, jnp.int32), jnp.asarray(valid, bool)))
            return np.asarray(out, np.float64)

        return _score_batches([self.forward], batches, lambda b: self.score_at(*b), from_hidden, on_batch, progress)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Returns float64[B]: the sum of log P over the scored tokens of each row."""
        if isinstance(self.forward, StreamedLM):
            return self.score_batches([(tokens, mask, score)])[0]
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
        if isinstance(self.forward, StreamedLM):
            return self.score_at_batches([(tokens, mask, positions, targets, valid)])[0]
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

    def __init__(self, forward: Forward | BoundForward | StreamedLM, ref_forward: Forward | BoundForward | StreamedLM):
        self.forward, self.ref_forward = forward, ref_forward
        heads = _head(forward), _head(ref_forward)
        key = ("sim",) + _key(forward) + _key(ref_forward)
        if None not in heads:  # each head over chunks of positions
            sim_h = _similarity_from_hidden(heads[0][0], heads[1][0])
            self._params = (heads[0][1], heads[1][1])
            self._from_hidden = _jit_once(key + ("h",), lambda: sim_h)
        elif isinstance(forward, StreamedLM) or isinstance(ref_forward, StreamedLM):
            raise ValueError("a StreamedLM is compared with a model split at its output head "
                             "(a BoundForward with hidden_fn and head_fn, or another StreamedLM)")
        if isinstance(forward, StreamedLM) or isinstance(ref_forward, StreamedLM):
            return
        if None not in heads:
            hidden, ref_hidden = forward.hidden_fn, ref_forward.hidden_fn

            def step(params, tokens, mask, score):
                return sim_h(params[0], params[1], hidden(params[0], tokens, mask), ref_hidden(params[1], tokens, mask),
                             tokens, score)
        else:
            fn, p = _unbind(forward)
            ref_fn, ref_p = _unbind(ref_forward)
            self._params = (p, ref_p)

            def step(params, tokens, mask, score):
                lr, tr = _shifted_logprobs(ref_fn(params[1], tokens, mask), tokens)
                lm, tm = _shifted_logprobs(fn(params[0], tokens, mask), tokens)
                return _similarity_sums(lm, lr, tm, tr, score[:, 1:])

        self._step = _jit_once(key, lambda: step)

    def score_batches(self, batches: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                      on_batch: Callable[[int], None] | None = None,
                      progress: bool = False) -> list[dict[str, np.ndarray]]:
        """:meth:`__call__` of each ``(tokens, mask, score)`` batch (block by block when either
        model is a :class:`StreamedLM`); ``on_batch(j)`` as batch ``j`` is done."""
        def from_hidden(h, batch):
            tokens, _, score = batch
            out = self._from_hidden(*self._params, h[0], h[1],
                                    *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(score, bool)))
            return dict(zip(SIMILARITY_FIELDS, np.asarray(out, np.float64)))

        return _score_batches([self.forward, self.ref_forward], batches, lambda b: self(*b), from_hidden,
                              on_batch, progress)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
        """Returns ``{field: float64[B]}`` for the fields in :data:`SIMILARITY_FIELDS`."""
        if not hasattr(self, "_step"):
            return self.score_batches([(tokens, mask, score)])[0]
        out = np.asarray(self._step(self._params, *_batch(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                                                          jnp.asarray(score, bool))), np.float64)
        return dict(zip(SIMILARITY_FIELDS, out))


def _similarity_sums(lm: jax.Array, lr: jax.Array, tm: jax.Array, tr: jax.Array, score: jax.Array) -> jax.Array:
    """``[4, B]`` sums over scored positions of KL, top-1 agreement, ``log P_model`` and
    ``log P_ref`` (fields in :data:`SIMILARITY_FIELDS` order) from both models' log-softmax
    ``[B, T, V]`` and target log-probabilities ``[B, T]``."""
    # Guard vocab entries with p_ref == 0 (logits of -inf): 0 * (-inf - x) would be NaN.
    kl = jnp.sum(jnp.where(jnp.isneginf(lr), 0.0, jnp.exp(lr) * (lr - lm)), axis=-1)
    top1 = (jnp.argmax(lr, axis=-1) == jnp.argmax(lm, axis=-1)).astype(jnp.float32)
    red = lambda x: jnp.sum(jnp.where(score, x, 0.0), axis=1)  # noqa: E731
    return jnp.stack([red(kl), red(top1), red(tm), red(tr)], axis=0)


def _similarity_from_hidden(head_fn: Callable, ref_head_fn: Callable) -> Callable:
    """``f(params, ref_params, h, ref_h, tokens, score) -> [4, B]`` (see :func:`_similarity_sums`),
    each head over chunks of positions."""

    def f(params, ref_params, h, ref_h, tokens, score):
        def part(hc, rc, tc, sc):
            lm, tm = _shifted_logprobs(head_fn(params, hc), tc, shifted=False)
            lr, tr = _shifted_logprobs(ref_head_fn(ref_params, rc), tc, shifted=False)
            return _similarity_sums(lm, lr, tm, tr, sc)

        return _over_positions(part, _vocab(head_fn, params, h), h[:, :-1], ref_h[:, :-1], tokens[:, 1:], score[:, 1:])

    return f
