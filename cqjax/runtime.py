"""Run a model: a jitted forward for evaluation, and generation with a KV cache.

>>> forward = forward_fn(model)                          # doctest: +SKIP
>>> logits = forward(tokens, mask)                       # [B, T, V], compiled once per shape
>>> ids = generate(model, prompt_ids, max_new_tokens=32) # doctest: +SKIP  (greedy)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cqjax.eval.scoring import from_nnx
from cqjax.sharding import place_batch


def set_threads(n: int | None) -> None:
    """Runs this process's JAX computations and CQ kernel calls on ``n`` CPU cores (None: all).

    XLA's CPU backend sizes its thread pool from the cores the process may run on when it
    starts, so this must come before the first JAX computation: it restricts the process's CPU
    affinity to the first ``n`` cores it has and caps the C++ kernel's threads at ``n``.

    Raises:
      ValueError: ``n < 1`` or more cores than the process has.
      RuntimeError: JAX's backend has already started (its pool size is fixed).
    """
    if n is None:
        return
    import os

    from jax._src import xla_bridge

    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(cores):
        raise ValueError(f"runtime.threads={n}: expected 1..{len(cores)} (the cores this process may use)")
    if len(cores) != n:
        if xla_bridge.backends_are_initialized():
            raise RuntimeError(f"runtime.threads={n} must be set before the first JAX computation "
                               "(XLA's CPU thread pool is sized when its backend starts)")
        os.sched_setaffinity(0, cores[:n])
    from cqjax.kernels import backend

    if backend.ffi_available():
        from cqjax import _ffi

        _ffi.set_kernel_threads(n)


def prepare(model: nnx.Module) -> nnx.Module:
    """``model`` with every CQ leaf that runs in pure JAX under the current kernel mode
    (:func:`cqjax.kernels.backend.runs_in_jax`) in the column-tiled runtime layout
    (:mod:`cqjax.kernels.columns`); other leaves, and ``model`` itself, are left as they are."""
    from cqjax.kernels.qarrays import CQArray

    graphdef, state = nnx.split(model)
    changed = []

    def convert(leaf):
        new = evaluation_leaf(leaf, packed=True)
        if new is not leaf:
            changed.append(new)
        return new

    state = jax.tree.map(convert, state, is_leaf=lambda x: isinstance(x, CQArray))
    return nnx.merge(graphdef, state) if changed else model


def evaluation_leaf(leaf, *, packed: bool):
    """How a model leaf is evaluated: a CQ leaf in its fastest runtime layout (``packed``, see
    :func:`prepare`) or decoded once to float32 (see :func:`dequantized_model`); other leaves as
    they are."""
    from cqjax.kernels import backend
    from cqjax.kernels.columns import to_columns
    from cqjax.kernels.qarrays import CQArray, is_quantized
    from cqjax.quant_stats import dequantizer

    if packed:
        return to_columns(leaf) if isinstance(leaf, CQArray) and backend.runs_in_jax(leaf) else leaf
    return jnp.asarray(dequantizer()(leaf), jnp.float32) if is_quantized(leaf) else leaf


def forward_fn(model: nnx.Module) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A jitted ``forward(tokens int32[B, T], mask bool[B, T]) -> float32 logits[B, T, V]``
    (quantized leaves in the layout their kernel mode runs fastest, :func:`prepare`; token rows
    split over the data axis of the active mesh, :func:`cqjax.sharding.use_mesh`)."""
    bound = from_nnx(prepare(model))
    run = jax.jit(bound.fn)
    return lambda tokens, mask: run(bound.params, place_batch(jnp.asarray(tokens, jnp.int32)),
                                    place_batch(jnp.asarray(mask, bool)))


def dequantized_model(qir) -> nnx.Module:
    """The float32 model of a quantized IR's weights, each decoded once.

    The same function as the packed runtime (``hf.to_model(qir)``) up to float rounding, and
    several times faster to evaluate on CPU where the packed runtime decodes every weight on
    every call; it holds a float copy of every weight, so it is for evaluation, not deployment.
    """
    from cqjax.io import hf
    from cqjax.kernels.qarrays import is_quantized

    params = {p: evaluation_leaf(leaf, packed=False) for p, leaf in qir.params.items() if is_quantized(leaf)}
    return hf.to_model(qir.replace(params=params))


@struct.dataclass
class KVCache:
    """One attention layer's keys ``[B·KV, D, size]`` and values ``[B·KV, size, D]``, the
    layout :func:`cqjax.models.layers.dot_product_attention` reads (so a decode step reads the
    cache where it lies and XLA updates it in place).

    ``pos`` holds each slot's token position and ``valid`` whether the slot holds a real
    token; the attention mask is built from them, so empty slots are never attended.

    A bfloat16 cache (``kv_bits=16``) holds its entries' bits as ``uint16``, and
    :func:`cqjax.models.layers.dot_product_attention` reads them so: XLA's CPU backend updates
    a ``uint16`` buffer in place, where it widened a ``bfloat16`` cache's update (and the dots
    reading it) to a float32 pass over the whole cache on every step (measured: decode 18%
    slower than a float32 cache).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of ``float32`` or ``bfloat16`` entries (held as ``uint16`` bits)."""
        held = jnp.uint16 if dtype == jnp.bfloat16 else dtype
        return cls(k=jnp.zeros((batch * kv_heads, head_dim, size), held),
                   v=jnp.zeros((batch * kv_heads, size, head_dim), held),
                   pos=jnp.zeros((batch, size), jnp.int32), valid=jnp.zeros((batch, size), bool),
                   index=jnp.zeros((), jnp.int32))

    def query(self, q):
        """The query as the cached keys are stored (here: as is; see :mod:`cqjax.kv_cache`)."""
        return q

    def output(self, out):
        """The attention output back in the model's basis (here: as is)."""
        return out

    def update(self, k, v, positions, valid):
        """Writes ``T`` new entries ``k/v [B, T, KV, D]`` at ``index``; returns all keys and
        values (in the cache's layout), positions, validity and the new cache."""
        from cqjax.models.layers import kv_layout

        i = self.index
        upd = lambda buf, new, axis=1: jax.lax.dynamic_update_slice_in_dim(buf, _held(new, buf.dtype), i, axis)  # noqa: E731
        k, v = kv_layout(k, v)
        new = KVCache(k=upd(self.k, k, 2), v=upd(self.v, v), pos=upd(self.pos, positions),
                      valid=upd(self.valid, valid), index=i + k.shape[2])
        return new.k, new.v, new.pos, new.valid, new

    def nbytes_per_token(self) -> int:
        """Stored bytes of one position of this layer (keys and values, all heads)."""
        heads = self.k.shape[0] // self.pos.shape[0]
        return 2 * heads * self.k.shape[1] * self.k.dtype.itemsize


def _held(x: jax.Array, dtype) -> jax.Array:
    """``x`` as a cache buffer of ``dtype`` holds it (``uint16``: bfloat16 bits)."""
    if dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(dtype)


def empty_caches(model: nnx.Module, batch: int, size: int, kv_bits: int | None = None) -> list:
    """One empty cache per layer, sized from each layer's attention module: float32
    (``kv_bits=None``), bfloat16 (16), or quantized to ``kv_bits`` 8 or 4
    (:class:`cqjax.kv_cache.QuantizedKVCache`).

    Raises:
      ValueError: ``kv_bits`` unsupported, or the model's attention cannot read a quantized cache.
    """
    from cqjax.kv_cache import QuantizedKVCache

    caches = []
    for layer in model.layers:
        attn = layer.self_attn
        if kv_bits in (None, 16):
            dtype = jnp.float32 if kv_bits is None else jnp.bfloat16
            caches.append(KVCache.empty(batch, size, attn.num_kv_heads, attn.head_dim, dtype))
            continue
        if not getattr(attn, "rotated_cache", False):
            raise ValueError(f"runtime.kv_bits={kv_bits}: {type(model).__name__}'s attention "
                             f"({type(attn).__module__}) reads only a float cache; use runtime.kv_bits=null")
        caches.append(QuantizedKVCache.empty(batch, size, attn.num_kv_heads, attn.head_dim, kv_bits,
                                             center_keys=getattr(attn, "softcap", None) is None))
    return caches


def cached_logits(model: nnx.Module, tokens: np.ndarray, kv_bits: int | None = None) -> jax.Array:
    """float32 logits ``[B, T, V]`` of ``tokens [B, T]`` read through a fresh KV cache of
    ``kv_bits`` (every key and value attended to comes from the cache, as in decoding): the
    perplexity cost of a quantized cache."""
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    graphdef, state = nnx.split(prepare(model))
    caches = empty_caches(model, tokens.shape[0], tokens.shape[1], kv_bits)
    return _cached_forward(graphdef)(state, caches, jnp.asarray(tokens))


@functools.lru_cache(maxsize=16)
def _cached_forward(graphdef):
    """The jitted forward of :func:`cached_logits`, one per model structure."""

    @jax.jit
    def run(state, caches, tokens):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden_states(tokens, jnp.ones(tokens.shape, bool), None, caches)
        return m.logits(h)

    return run


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next token ids ``[B]`` from ``logits [B, V]``: the argmax when ``temperature <= 0``, else a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    and to the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the mass before a token is short of top_p
        cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _next_token(graphdef, treedef, temperature: float, top_k: int | None, top_p: float | None):
    """``(leaves, caches, tokens, mask, positions, key, inputs) -> (next ids [B], caches, key)``:
    the tokens read through the caches, ``inputs`` (a dict of arrays) going to the model's
    ``embed``, and the next token sampled from the last position."""

    def step(leaves, caches, tokens, mask, positions, key, inputs):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        h, caches = m.hidden_states(tokens, mask, positions, caches, **inputs)
        key, sub = jax.random.split(key)
        return sample(m.logits(h[:, -1]), sub, temperature, top_k, top_p), caches, key

    return step


@functools.lru_cache(maxsize=16)
def _decode_step(graphdef, treedef, temperature: float, top_k: int | None, top_p: float | None = None):
    """One jitted decode step per (model structure, sampling settings): compiled once, reused.

    It takes the model state as its flat list of leaves (``treedef`` rebuilds it inside the
    trace: flattening an NNX state in Python on every token costs more than the step's smaller
    fusions), the tokens' mask and positions, and the sampling key, which it splits itself; so
    a token costs one dispatch. The caches are donated: XLA updates them in place instead of
    copying every layer's keys and values on every token."""
    step = _next_token(graphdef, treedef, temperature, top_k, top_p)
    return jax.jit(lambda leaves, caches, tokens, mask, positions, key: step(
        leaves, caches, tokens, mask, positions, key, {}), donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _prefill_step(graphdef, treedef, temperature: float, top_k: int | None, top_p: float | None = None):
    """:func:`_decode_step` that also takes a prompt's multimodal ``inputs`` (a dict of arrays
    for the model's ``embed``): compiled apart, so the decode step keeps its text-only
    arguments."""
    return jax.jit(_next_token(graphdef, treedef, temperature, top_k, top_p), donate_argnums=(1,))


class Decoder:
    """Decoding of one model with its KV cache: :meth:`prefill` the prompt once, then one jitted,
    cache-donating :meth:`step` per token (what :func:`generate` loops over; benchmarks time the
    two apart). Quantized leaves run in the layout of the kernel mode current at construction
    (:func:`prepare`).

    Prompts of different lengths share a batch left-padded: ``prefill(tokens, mask)`` with
    ``mask`` False on each row's leading pad slots; every row's positions start at 0 on its
    first real token and pad slots are never attended, so a row decodes the tokens it would
    decode alone. A multimodal model's prompt brings its images or audio to :meth:`prefill`
    (``prefill(tokens, pixel_values=..., image_position_ids=...)``), read by a prefill compiled
    apart from the text-only :meth:`step`.

    >>> dec = Decoder(model, batch=1, max_len=48)   # doctest: +SKIP
    >>> nxt = dec.prefill(prompt_ids)                # [B] next token ids
    >>> nxt = dec.step(nxt)                          # one more token per row
    """

    def __init__(self, model: nnx.Module, *, batch: int, max_len: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, kv_bits: int | None = None, top_p: float | None = None):
        prepared = prepare(model)
        self.graphdef, state = nnx.split(prepared)
        self._leaves, self._treedef = jax.tree_util.tree_flatten(state)
        self.caches = empty_caches(model, batch, max_len, kv_bits)
        self.batch, self.max_len = batch, max_len
        self._sampling = (float(temperature), top_k, None if top_p is None else float(top_p))
        self._step = _decode_step(self.graphdef, self._treedef, *self._sampling)
        self._prompt_inputs = getattr(prepared, "prompt_inputs", None)  # holds the leaves above, no copy
        self._model_name = type(model).__name__
        self._key = jax.random.PRNGKey(seed)
        self._pads = np.zeros(batch, np.int32)
        self.length = 0

    def _run(self, tokens: np.ndarray, mask: np.ndarray, inputs: dict | None = None) -> np.ndarray:
        b, t = tokens.shape
        if b != self.batch or self.length + t > self.max_len:
            raise ValueError(f"Decoder: {b} rows of {t} tokens after {self.length} do not fit batch={self.batch}, "
                             f"max_len={self.max_len}")
        positions = np.maximum(self.length + np.arange(t, dtype=np.int32)[None, :] - self._pads[:, None], 0)
        args = (self._leaves, self.caches, tokens.astype(np.int32), mask, positions.astype(np.int32), self._key)
        if inputs:
            nxt, self.caches, self._key = _prefill_step(self.graphdef, self._treedef, *self._sampling)(*args, inputs)
        else:
            nxt, self.caches, self._key = self._step(*args)
        self.length += t
        return np.asarray(nxt)

    def prefill(self, prompt: np.ndarray, mask: np.ndarray | None = None, **inputs) -> np.ndarray:
        """Reads ``prompt [B, T]`` into the cache (``mask [B, T]``: False on left padding);
        returns the next token of every row ``[B]``.

        ``inputs``: a multimodal model's arrays for the prompt (a Gemma 4's ``pixel_values``,
        ``image_position_ids``, ``input_features``, ``input_features_mask``: the model's
        ``prompt_inputs`` checks them against the prompt's placeholders); None values are left out.

        Raises:
          ValueError: a mask that is not left padding, a prompt that does not fit, or inputs the
            model does not read or that do not match the prompt.
        """
        prompt = np.atleast_2d(np.asarray(prompt, np.int32))
        mask = np.ones(prompt.shape, bool) if mask is None else np.atleast_2d(np.asarray(mask, bool))
        if mask.shape != prompt.shape or not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise ValueError(f"Decoder.prefill: mask {mask.shape} must match the prompt {prompt.shape} and be False "
                             "only on each row's leading (left) padding")
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if inputs:
            if self._prompt_inputs is None:
                raise ValueError(f"Decoder.prefill: {self._model_name} reads tokens only; got inputs {sorted(inputs)}")
            inputs = self._prompt_inputs(prompt, **inputs)
        if self.length == 0:
            self._pads = (~mask).sum(1).astype(np.int32)
        elif not mask.all():
            raise ValueError("Decoder.prefill: padding is allowed only in the first call")
        return self._run(prompt, mask, inputs)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds one token per row ``[B]``; returns the next ``[B]``."""
        return self._run(np.asarray(tokens, np.int32).reshape(self.batch, 1), np.ones((self.batch, 1), bool))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [B, T], mask [B, T])`` of prompts of different lengths, right-aligned (each
    row's padding, ``pad_id`` and mask False, comes first)."""
    rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("left_pad: expected one or more non-empty prompts")
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return tokens, mask


def generate(model: nnx.Module, prompt: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             on_step: Callable[[int], None] | None = None,
             on_tokens: Callable[[np.ndarray], bool | None] | None = None,
             kv_bits: int | None = None, **inputs) -> np.ndarray | list[np.ndarray]:
    """Generates continuations of ``prompt``: token ids ``[T]`` or ``[B, T]``, or a list of
    prompts of different lengths (decoded as one left-padded batch, :class:`Decoder`).

    Args:
      temperature, top_k, top_p: sampling (:func:`sample`); temperature 0 is greedy.
      eos_token_id: stop once every row has produced one of these (rows that finish early go
        on to the last row's end; their ids after the EOS are not meaningful).
      on_step: called with the batch size after each decoding step (for progress reports).
      on_tokens: called with each step's new tokens ``[B]``; returning True stops (a stop
        string was seen, say).
      kv_bits: None for a float32 KV cache, 16 for bfloat16, 8 or 4 for a quantized one (:mod:`cqjax.kv_cache`).
      **inputs: a multimodal model's arrays for the prompt (its images, audio), read with it in
        the prefill step (:meth:`Decoder.prefill`).

    Returns:
      ``[B, T + n]`` token ids (``n <= max_new_tokens``), prompt included; for a list of
      prompts of different lengths, one such row per prompt without its padding.
    """
    ragged = not isinstance(prompt, np.ndarray) and len(prompt) > 0 and not np.isscalar(prompt[0]) \
        and len({len(p) for p in prompt}) > 1
    if ragged:
        ids, mask = left_pad(prompt)
    else:
        ids = np.atleast_2d(np.asarray(prompt, np.int32))
        mask = np.ones(ids.shape, bool)
    b, t = ids.shape
    dec = Decoder(model, batch=b, max_len=t + max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  kv_bits=kv_bits, top_p=top_p)
    eos = np.atleast_1d(eos_token_id if eos_token_id is not None else []).astype(np.int64)
    finished = np.zeros(b, bool)
    out = [ids]
    nxt = None
    for n in range(max_new_tokens):
        nxt = dec.prefill(ids, mask, **inputs) if n == 0 else dec.step(nxt)
        out.append(nxt[:, None])
        if on_step is not None:
            on_step(b)
        if on_tokens is not None and on_tokens(nxt):
            break
        finished |= np.isin(nxt, eos)
        if eos.size and finished.all():
            break
    out = np.concatenate(out, axis=1)
    return [row[~pad] for row, pad in zip(out, np.pad(~mask, ((0, 0), (0, out.shape[1] - t))))] if ragged else out
