"""Activation statistics of a float model on calibration tokens, for passes to read.

:func:`collect` runs the float model over calibration rows with every eligible weight wrapped in
a probe leaf that records its input, and returns :class:`Calibration` (a mapping IR path → stats,
what :class:`cqjax.pipeline.Context` carries as ``calibration``):

=============================  ==================================================================
tensor                         stats
=============================  ==================================================================
linear / lm_head kernel        ``{"hessian": float64 [K, K] = E[x xᵀ], "tokens": n}`` over the
``[K, N]``                     input rows ``x`` of that layer (original, unrotated basis)
tied embedding table           the same for the output head's input (the final hidden state),
                               plus ``"counts"``
embedding / per-layer table    ``{"counts": int64 [V], "tokens": n}``: how often each token id
                               was gathered
=============================  ==================================================================

Layers that read the same activation (q/k/v, gate/up) share one Hessian array. Only unmasked
tokens count. The reductions run inside jit; only ``[K, K]`` sums leave the device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cqjax.ir import IR, KERNEL_ROLES
from cqjax.progress import Progress
from cqjax.sharding import place_batch

TABLE_ROLES = ("embedding", "per_layer_embedding")


class Tape:
    """Inputs recorded while tracing one forward: ``(path, x)`` in call order.

    With ``reduce`` set, ``(path, reduce(x))`` instead, computed where ``x`` is made and once per
    distinct ``x`` (layers that read one activation share the result): a jitted forward then
    need not keep every layer's input alive until its end.
    """

    def __init__(self):
        self.records: list[tuple[str, jax.Array]] = []
        self.reduce: Any = None
        self._reduced: dict[int, tuple[jax.Array, jax.Array]] = {}  # id(x) -> (x kept alive, reduce(x))

    def record(self, path: str, x: jax.Array) -> None:
        if self.reduce is not None:
            if id(x) not in self._reduced:
                self._reduced[id(x)] = (x, self.reduce(x))
            x = self._reduced[id(x)][1]
        self.records.append((path, x))

    def clear(self) -> None:
        self.records.clear()
        self._reduced.clear()

    def distinct(self) -> tuple[list[jax.Array], dict[str, int]]:
        """``(values, layout)``: the distinct recorded values in call order, and each path's index
        into them (layers that read one activation share one value)."""
        values, index, layout = [], {}, {}
        for path, x in self.records:
            if id(x) not in index:
                index[id(x)] = len(values)
                values.append(x)
            layout[path] = index[id(x)]
        return values, layout


def add_sums(total: list[np.ndarray] | None, sums) -> list[np.ndarray]:
    """Adds device sums into float64 host sums in place, one matrix at a time (no second float64
    copy of every matrix); ``total`` None: the first sums, as float64."""
    if total is None:
        return [np.asarray(s, np.float64) for s in sums]
    for t, s in zip(total, sums):
        np.add(t, np.asarray(s), out=t)
    return total


@struct.dataclass
class KernelProbe:
    w: jax.Array
    path: str = struct.field(pytree_node=False)
    tape: Tape = struct.field(pytree_node=False)

    def matmul(self, x):
        self.tape.record(self.path, x)
        return jnp.matmul(x, self.w.astype(x.dtype))


@struct.dataclass
class _TableProbe:
    w: jax.Array
    path: str = struct.field(pytree_node=False)
    tape: Tape = struct.field(pytree_node=False)

    @property
    def shape(self):
        return self.w.shape

    def take_rows(self, ids):
        return jnp.take(self.w, ids, axis=0)

    def attend(self, x):
        self.tape.record(self.path, x)
        return jnp.einsum("...d,vd->...v", x, self.w.astype(x.dtype))


class Calibration(Mapping):
    """Read-only ``path → stats`` (see the module table) plus how it was made.

    Attributes:
      source: where the calibration tokens came from (e.g. ``"self"``, ``"squad"``).
      tokens: unmasked calibration tokens seen.
      seconds: wall time of the collection.
      timing: seconds per step (e.g. ``{"tokens_s": ..., "hessian_s": ...}``).
      rows: the calibration token rows ``int32 [n, length]`` (None when not kept).
    """

    def __init__(self, stats: dict[str, dict[str, Any]], *, source: str, tokens: int, seconds: float,
                 timing: dict[str, float] | None = None, rows: np.ndarray | None = None):
        self._stats, self.source, self.tokens, self.seconds = stats, source, tokens, seconds
        self.timing, self.rows = dict(timing or {}), rows

    def __getitem__(self, path):
        return self._stats[path]

    def __iter__(self):
        return iter(self._stats)

    def __len__(self):
        return len(self._stats)

    def with_tensors(self, paths) -> Calibration:
        """The same calibration naming ``paths`` as the tensors it served, for statistics that
        were made and used block by block (:mod:`cqjax.stream_calibrated`) and not kept."""
        return Calibration({p: {} for p in paths}, source=self.source, tokens=self.tokens, seconds=self.seconds,
                           timing=self.timing, rows=self.rows)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": self.tokens, "tensors": len(self), "seconds": round(self.seconds, 1),
                **{k: round(v, 1) for k, v in self.timing.items()}}


def _sums(tape: Tape, layout: dict, reduce, forward) -> list[jax.Array]:
    """Runs ``forward`` (a probed model's call, traced) with ``reduce`` applied to each layer's
    input as it is made; returns the distinct sums and records each path's index in ``layout``."""
    tape.clear()
    tape.reduce = reduce
    forward()
    sums, paths = tape.distinct()
    layout.update(paths)
    tape.clear()
    return sums


def _probed(model: nnx.Module, ir: IR, tape: Tape):
    graphdef, state = nnx.split(nnx.clone(model))  # the caller's model keeps its leaves
    probed = []
    for key, var in nnx.to_flat_state(state):
        path = "/".join(map(str, key))
        meta = ir.meta.get(path)
        if meta is None or len(meta.shape) != 2:
            continue
        value = var.get_value()
        if meta.role in KERNEL_ROLES:
            var.set_value(KernelProbe(value, path, tape))
        elif meta.role in TABLE_ROLES:
            var.set_value(_TableProbe(value, path, tape))
        else:
            continue
        probed.append(path)
    return graphdef, state, probed


def collect(model: nnx.Module, ir: IR, tokens: np.ndarray, *, mask: np.ndarray | None = None,
            batch_size: int = 4, source: str = "?", progress: bool = True) -> Calibration:
    """Runs the float ``model`` (built from ``ir``) over ``tokens [n, T]`` and gathers the stats.

    Args:
      model: the float Flax model.
      ir: its IR (for roles).
      tokens: int32 ``[n, T]`` calibration rows.
      mask: bool ``[n, T]``; default all True.
      batch_size: rows per jitted step (the last batch is padded with masked rows).
      source: recorded in :attr:`Calibration.source`.
      progress: a progress line on stderr.
    """
    start = time.perf_counter()
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    tape = Tape()
    graphdef, state, probed = _probed(model, ir, tape)
    layout: dict[str, Any] = {}

    def step(state, tok, m, counted):
        keep = counted.reshape(-1)[:, None]

        def hessian_sum(x):
            f = jnp.where(keep, x.reshape(-1, x.shape[-1]).astype(jnp.float32), 0.0)
            return f.T @ f

        return _sums(tape, layout, hessian_sum, lambda: nnx.merge(graphdef, state)(tok, m))

    jstep = jax.jit(step)
    sums: list[np.ndarray] | None = None
    n_rows = tokens.shape[0]
    bar = Progress("statistics", total=n_rows, unit="rows", enabled=progress, tag="cqjax.calib")
    for i in range(0, n_rows, batch_size):
        tok, counted = tokens[i:i + batch_size], mask[i:i + batch_size]
        pad = batch_size - len(tok)
        tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), np.int32)])
        counted = np.concatenate([counted, np.zeros((pad, tok.shape[1]), bool)])
        m = counted.copy()
        m[len(m) - pad:, 0] = True  # padding rows: one visible token (no all-masked attention)
        sums = add_sums(sums, jstep(state, *(place_batch(jnp.asarray(a)) for a in (tok, m, counted))))
        bar.update(len(tok) - pad)
    bar.close()
    n_tokens = int(mask.sum())
    hess = [s / max(n_tokens, 1) for s in (sums or [])]
    counts = np.bincount(tokens[mask].reshape(-1), minlength=1)
    stats: dict[str, dict[str, Any]] = {}
    for path in probed:
        entry: dict[str, Any] = {"tokens": n_tokens}
        if path in layout:
            entry["hessian"] = hess[layout[path]]
        if ir.meta[path].role in TABLE_ROLES:
            V = ir.meta[path].shape[0]
            entry["counts"] = np.pad(counts[:V], (0, max(0, V - len(counts))))
        if len(entry) > 1:
            stats[path] = entry
    return Calibration(stats, source=source, tokens=n_tokens, seconds=time.perf_counter() - start)


def collect_speech(model: nnx.Module, ir: IR, features: np.ndarray, tokens: np.ndarray, mask: np.ndarray, *,
                   batch_size: int = 4, source: str = "?", progress: bool = True) -> Calibration:
    """:func:`collect` for a speech recognizer (:class:`cqjax.models.whisper.SpeechToText`):
    Hessians of every kernel's input over log-mel ``features [n, mels, frames]`` (every encoder
    position counts: Whisper always reads 30 s windows, silence included) and teacher-forced
    decoder ``tokens [n, T]`` (only ``mask``ed positions count)."""
    start = time.perf_counter()
    tape = Tape()
    graphdef, state, probed = _probed(model, ir, tape)
    layout: dict[str, Any] = {}

    def step(state, feats, toks, counted):
        def hessian_sum(x):
            f = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            if x.shape[:-1] == counted.shape:  # a decoder activation
                f = jnp.where(counted.reshape(-1)[:, None], f, 0.0)
            return f.T @ f

        return _sums(tape, layout, hessian_sum, lambda: nnx.merge(graphdef, state)(feats, toks))

    jstep = jax.jit(step)
    sums = None
    bar = Progress("statistics", total=len(tokens), unit="clips", enabled=progress, tag="cqjax.calib")
    for i in range(0, len(tokens), batch_size):
        sums = add_sums(sums, jstep(state, features[i:i + batch_size], tokens[i:i + batch_size], mask[i:i + batch_size]))
        bar.update(len(tokens[i:i + batch_size]))
    bar.close()
    enc_tokens = len(tokens) * model.config.max_source_positions
    dec_tokens = int(mask.sum())
    stats: dict[str, dict[str, Any]] = {}
    for path in probed:
        if path in layout:  # encoder kernels and the decoder's cross-attention keys/values read audio positions
            audio = path.startswith("encoder/") or re.search(r"/encoder_attn/[kv]_proj/", path)
            n = enc_tokens if audio else dec_tokens
            stats[path] = {"hessian": sums[layout[path]] / max(n, 1), "tokens": n}
    return Calibration(stats, source=source, tokens=dec_tokens, seconds=time.perf_counter() - start, rows=tokens)
