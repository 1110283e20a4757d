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
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        return cls(k=jnp.zeros((batch * kv_heads, head_dim, size), dtype),
                   v=jnp.zeros((batch * kv_heads, size, head_dim), dtype),
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
        upd = lambda buf, new, axis=1: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis)  # noqa: E731
        k, v = kv_layout(k, v)
        new = KVCache(k=upd(self.k, k, 2), v=upd(self.v, v), pos=upd(self.pos, positions),
                      valid=upd(self.valid, valid), index=i + k.shape[2])
        return new.k, new.v, new.pos, new.valid, new

    def nbytes_per_token(self) -> int:
        """Stored bytes of one position of this layer (keys and values, all heads)."""
        heads = self.k.shape[0] // self.pos.shape[0]
        return 2 * heads * self.k.shape[1] * self.k.dtype.itemsize


def empty_caches(model: nnx.Module, batch: int, size: int, kv_bits: int | None = None) -> list:
    """One empty cache per layer, sized from each layer's attention module: float32, or
    quantized to ``kv_bits`` (:class:`cqjax.kv_cache.QuantizedKVCache`).

    Raises:
      ValueError: ``kv_bits`` unsupported, or the model's attention cannot read a quantized cache.
    """
    from cqjax.kv_cache import QuantizedKVCache

    caches = []
    for layer in model.layers:
        attn = layer.self_attn
        if kv_bits is None:
            caches.append(KVCache.empty(batch, size, attn.num_kv_heads, attn.head_dim))
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


@functools.lru_cache(maxsize=16)
def _decode_step(graphdef, treedef, temperature: float, top_k: int | None):
    """One jitted decode step per (model structure, sampling settings): compiled once, reused.

    It takes the model state as its flat list of leaves (``treedef`` rebuilds it inside the
    trace: flattening an NNX state in Python on every token costs more than the step's smaller
    fusions), the first position as a scalar, and the sampling key, which it splits itself; so
    a token costs one dispatch. The caches are donated: XLA updates them in place instead of
    copying every layer's keys and values on every token."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(leaves, caches, tokens, start, key):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        h, caches = m.hidden_states(tokens, jnp.ones(tokens.shape, bool), positions, caches)
        logits = m.logits(h[:, -1])
        key, sub = jax.random.split(key)
        if temperature <= 0:
            return jnp.argmax(logits, -1).astype(jnp.int32), caches, key
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(sub, logits).astype(jnp.int32), caches, key

    return step


class Decoder:
    """Decoding of one model with its KV cache: :meth:`prefill` the prompt once, then one jitted,
    cache-donating :meth:`step` per token (what :func:`generate` loops over; benchmarks time the
    two apart). Quantized leaves run in the layout of the kernel mode current at construction
    (:func:`prepare`).

    >>> dec = Decoder(model, batch=1, max_len=48)   # doctest: +SKIP
    >>> nxt = dec.prefill(prompt_ids)                # [B] next token ids
    >>> nxt = dec.step(nxt)                          # one more token per row
    """

    def __init__(self, model: nnx.Module, *, batch: int, max_len: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, kv_bits: int | None = None):
        self.graphdef, state = nnx.split(prepare(model))
        self._leaves, treedef = jax.tree_util.tree_flatten(state)
        self.caches = empty_caches(model, batch, max_len, kv_bits)
        self.batch, self.max_len = batch, max_len
        self._step = _decode_step(self.graphdef, treedef, float(temperature), top_k)
        self._key = jax.random.PRNGKey(seed)
        self.length = 0

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        b, t = tokens.shape
        if b != self.batch or self.length + t > self.max_len:
            raise ValueError(f"Decoder: {b} rows of {t} tokens after {self.length} do not fit batch={self.batch}, "
                             f"max_len={self.max_len}")
        nxt, self.caches, self._key = self._step(self._leaves, self.caches, tokens.astype(np.int32),
                                                 np.int32(self.length), self._key)
        self.length += t
        return np.asarray(nxt)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Reads ``prompt [B, T]`` into the cache; returns the next token of every row ``[B]``."""
        return self._run(np.atleast_2d(np.asarray(prompt, np.int32)))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds one token per row ``[B]``; returns the next ``[B]``."""
        return self._run(np.asarray(tokens, np.int32).reshape(self.batch, 1))


def generate(model: nnx.Module, prompt: Sequence[int] | np.ndarray, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             on_step: Callable[[int], None] | None = None, kv_bits: int | None = None) -> np.ndarray:
    """Generates continuations of ``prompt`` (``[T]`` or ``[B, T]`` token ids, equal lengths).

    Args:
      temperature: 0 for greedy decoding, else sampling from ``softmax(logits / temperature)``.
      top_k: sample only among the ``top_k`` most likely tokens.
      eos_token_id: stop when every row has produced one of these.
      on_step: called with the batch size after each decoding step (for progress reports).
      kv_bits: None for a float32 KV cache, 8 or 4 for a quantized one (:mod:`cqjax.kv_cache`).

    Returns:
      ``[B, T + n]`` token ids (``n <= max_new_tokens``), prompt included.
    """
    ids = np.atleast_2d(np.asarray(prompt, np.int32))
    b, t = ids.shape
    dec = Decoder(model, batch=b, max_len=t + max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  kv_bits=kv_bits)
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    out = [ids]
    nxt = None
    for n in range(max_new_tokens):
        nxt = dec.prefill(ids) if n == 0 else dec.step(nxt)
        out.append(nxt[:, None])
        if on_step is not None:
            on_step(b)
        if eos and all(int(x) in eos for x in nxt):
            break
    return np.concatenate(out, axis=1)
