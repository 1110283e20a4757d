"""Streamed conversion: a data-free recipe applied tensor by tensor, straight into the artifact.

A recipe whose every step rewrites one leaf at a time and needs nothing besides the IR
(:func:`leafwise_steps`: ``rotate → codebook → pack``, RTN, user passes built on
:class:`cqjax.pipeline.Pass`) does not need the whole model in memory: :func:`convert` reads
one tensor of the lazily imported checkpoint, runs every step on it, measures its error against
the float tensor, hands the stored arrays to an
:class:`~cqjax.io.artifact_writer.ArtifactWriter` and drops it before reading the next. A
tensor larger than :data:`BLOCK_PARAMS` weights goes through in row blocks when its steps are
row-separable, so the memory a conversion takes does not grow with the model. The artifact is
byte-identical to ``artifact.save(pipeline.run(recipe, ir))`` whatever the row blocks and
threads (every step, the rotation included, computes each row on its own), and a killed
conversion resumed with ``resume=True`` gives the same bytes as one never interrupted.

>>> report = convert(recipe, lazy_ir, "out/artifact", resume=True)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cqjax import _xla_ext
from cqjax import pipeline as pl
from cqjax import quant_stats
from cqjax import select as select_lib
from cqjax.io import artifact, hf
from cqjax.io.artifact_writer import ArtifactWriter
from cqjax.ir import IR, LazyTensor, TensorMeta, materialize
from cqjax.kernels.qarrays import CQArray
from cqjax.passes.common import KERNEL_ROLES
from cqjax.passes.cq import Rotated
from cqjax.progress import Progress


#: Weights per row block of a large tensor: a block's conversion takes ~35 bytes per weight at
#: its peak (float32 rows, rotated copy, codes, float64 error sums), so ~300 MB.
BLOCK_PARAMS = 1 << 23
#: Threads converting blocks at once: this process's cores, at most 4.
WORKERS = min(4, len(os.sched_getaffinity(0)))


@dataclasses.dataclass(frozen=True)
class Step:
    """One leaf-wise step: ``rewrite`` of ``p`` on the leaves ``selects``."""

    name: str
    p: pl.Pass
    selects: Any  # a predicate (path, meta) -> bool


def _leafwise(p: Any) -> bool:
    if isinstance(p, pl.FunctionPass) or getattr(type(p), "leafwise", False):
        return p.leafwise
    return isinstance(p, pl.Pass) and type(p).__call__ is pl.Pass.__call__


def leafwise_steps(pipeline: Any, statistics: frozenset[str] = frozenset()) -> list[Step] | None:
    """The flattened steps of ``pipeline`` if each rewrites leaf by leaf and needs nothing but
    the IR and the calibration ``statistics`` of the leaf it rewrites (no rows, no reference);
    else None (the recipe cannot stream)."""
    out = []
    for name, step in pl.steps(pl.to_pass(pipeline)):
        p = step.inner if isinstance(step, pl.Masked) else step
        needs = p.needs
        if not _leafwise(p) or needs.rows or needs.reference or not set(needs.statistics) <= set(statistics):
            return None
        out.append(Step(name, p, select_lib.to_predicate(step.filter)))
    return out


def _check_meta(step: Step, path: str, before, after) -> None:
    for field in pl.PROTECTED:
        if field not in step.p.may_change and getattr(before, field) != getattr(after, field):
            raise pl.PassError(f"pass {step.name!r}: {path}: meta.{field} changed {getattr(before, field)!r} -> "
                               f"{getattr(after, field)!r} but the pass does not declare it in may_change")


def row_blocks(leaf: Any, meta: TensorMeta, steps: list[Step], path: str, max_params: int) -> list | None:
    """``[(leaf, meta)]`` of consecutive row blocks of at most ``max_params`` weights each, for
    a 2-D tensor larger than that whose every step is row-separable; else None.

    Rows are what the passes quantize one by one (a kernel's output columns, a table's rows);
    a block of a lazily imported kernel reads only its own rows of the checkpoint (stored
    ``[out, in]``)."""
    size = math.prod(meta.shape)
    if len(meta.shape) != 2 or size <= max_params or not all(
            s.p.row_separable for s in steps if s.selects(path, meta)):
        return None
    transposed = meta.role in KERNEL_ROLES
    if isinstance(leaf, LazyTensor) and (leaf.transform is not None) != transposed:
        return None  # not laid out as imported: rows are not the source's first axis
    n = meta.shape[1] if transposed else meta.shape[0]
    step = max(1, max_params // (size // n))
    out = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        shape = (meta.shape[0], hi - lo) if transposed else (hi - lo, meta.shape[1])
        if isinstance(leaf, LazyTensor):
            part = LazyTensor(shape=shape, dtype=leaf.dtype, source=f"{leaf.source}[rows {lo}:{hi}]",
                              reader=lambda lo=lo, hi=hi: leaf.reader()[lo:hi], transform=leaf.transform)
        else:
            part = leaf[:, lo:hi] if transposed else leaf[lo:hi]
        out.append((part, meta.replace(shape=shape)))
    return out


def _run_steps(steps: list[Step], path: str, leaf: Any, meta: TensorMeta, ctx: pl.Context,
               full_shape: tuple[int, ...], seen: list | None = None
               ) -> tuple[Any, TensorMeta, dict[str, bool], dict[str, float]]:
    """``leaf`` through every step that selects it; also ``{step: changed}`` and ``{step:
    seconds}`` (``seen`` collects each step's leaf). Selection sees ``full_shape``-shaped
    metadata, so a row block is selected as its whole tensor is."""
    touched, seconds = {}, {}
    for s in steps:
        if not s.selects(path, meta.replace(shape=full_shape)):
            continue
        start = time.perf_counter()
        new_leaf, new_meta = s.p.rewrite(path, leaf, meta, ctx.replace(step=s.name))
        seconds[s.name] = time.perf_counter() - start
        _check_meta(s, path, meta, new_meta)
        touched[s.name] = not (pl.same(leaf, new_leaf) and pl.same(meta, new_meta))
        leaf, meta = new_leaf, new_meta
        if seen is not None:
            seen.append(leaf)
    return leaf, meta, touched, seconds


def _block(steps: list[Step], path: str, part: Any, part_meta: TensorMeta, ctx: pl.Context,
           full_shape: tuple[int, ...]):
    """One row block (or whole tensor): read once, checked finite, converted, and its error sums
    (None: not quantized). Runs on a worker thread: NumPy, BLAS and XLA release the GIL."""
    source = part.source if isinstance(part, LazyTensor) else path
    part = materialize(part)
    hf.check_finite_array(part, path, source)
    transposed = part_meta.role in KERNEL_ROLES and part.ndim == 2
    rows = None
    if any(s.selects(path, part_meta.replace(shape=full_shape)) for s in steps):
        # float32 once, in the source's row order (a kernel's output rows: contiguous as read);
        # the steps see the IR layout (a transposed view), the error compares contiguous rows.
        rows = np.asarray(part.T if transposed else part, np.float32)
        part = rows.T if transposed else rows
    seen: list = []
    q, q_meta, touched, seconds = _run_steps(steps, path, part, part_meta, ctx, full_shape, seen)
    sums = None
    if rows is not None and quant_stats.is_quantized(q):
        sums = _rotated_error_sums(q, seen)
        if sums is None:
            sums = quant_stats.error_sums(rows, quant_stats.dequantizer(transpose=transposed)(q))
    return q, q_meta, touched, seconds, sums


def _rotated_error_sums(q: Any, seen: list) -> tuple[float, float] | None:
    """:func:`cqjax.quant_stats.error_sums` of a CQ leaf measured in its rotated basis, against
    the rotated float rows a step produced (None where that is not the same number).

    The rotation is orthogonal, so ``‖w − Rᵀŷ‖ = ‖Rw − ŷ‖`` (and ``‖w‖ = ‖Rw‖``) when nothing
    is cropped (no padding) and no input scale changes the basis; one C++ pass over the packed
    codes (``xla_ext/include/cqjax/quantize.h``) then replaces a full dequantization."""
    rotated = next((leaf for leaf in reversed(seen) if isinstance(leaf, Rotated)), None)
    if (not isinstance(q, CQArray) or rotated is None or q.in_scale is not None
            or rotated.rows.shape[1] != q.K or not np.array_equal(np.asarray(q.s1), rotated.rotation.s1)
            or not np.array_equal(np.asarray(q.perm), rotated.rotation.perm)):
        return None
    return _xla_ext.rotated_error_sums(
        np.ascontiguousarray(rotated.rows, np.float32), np.asarray(q.codes), q.bits,
        np.asarray(q.norms).view(np.uint16), list(q.blocks), np.asarray(q.codebooks, np.float32))


def _join(done: list, shape: tuple[int, ...], path: str) -> tuple[Any, TensorMeta]:
    """One leaf from converted row blocks (their metadata must agree but for the shape)."""
    (leaf, meta), rest = done[0], done[1:]
    if rest:
        if any(m.replace(shape=meta.shape) != meta for _, m in rest):
            raise pl.PassError(f"{path}: row blocks were converted with different metadata")
        leaf = type(leaf).concat_rows([q for q, _ in done])
    return leaf, meta.replace(shape=shape)


def _write(writer: ArtifactWriter, ir: IR, path: str, done: list, seconds: dict[str, float]) -> Any:
    """Joins a tensor's converted blocks and writes it, with its stats row and steps as the note;
    returns the joined leaf."""
    for *_, took, _ in done:
        for name, t in took.items():
            seconds[name] += t
    leaf, meta = _join([(q, m) for q, m, *_ in done], ir.meta[path].shape, path)
    row, = quant_stats.tensors(IR(family=ir.family, config=ir.config, params={path: leaf}, meta={path: meta}))
    sums = [d[4] for d in done if d[4] is not None]
    if sums:
        row["rel_error"] = quant_stats.pooled_rel_error(sums)
    touched = {name: any(d[2][name] for d in done) for name in done[0][2]}
    writer.add(*artifact.stored(path, leaf, meta), note={"row": row, "steps": touched})
    return leaf


def convert(pipeline: Any, ir: IR, directory: str | Path, *, ctx: pl.Context | None = None,
            extra: dict | None = None, tokenizer_from: str | Path | None = None, resume: bool = False,
            key: Any = None, progress: bool = True, max_params: int = BLOCK_PARAMS,
            workers: int = WORKERS) -> tuple[list[dict], list[dict]]:
    """Converts the (lazy) float ``ir`` with the leaf-wise ``pipeline`` into the artifact
    ``directory``, one tensor at a time.

    Args:
      pipeline: a recipe for which :func:`leafwise_steps` is not None.
      ir: the float IR (lazy tensors: each is read when its turn comes).
      directory: the artifact to write (atomically, at the end).
      ctx: the passes' context (its ``rng_seed`` seeds the rotations).
      extra: ``manifest["extra"]`` as for :func:`cqjax.io.artifact.save`; ``"passes"`` (the
        returned report, without times) is added to it.
      tokenizer_from: a checkpoint directory whose tokenizer files go into ``tokenizer/``.
      resume: continue from the finished tensors of an interrupted conversion of the same ``key``.
      key: JSON-able identity of the source (e.g. the checkpoint's fingerprint); with the
        recipe, the seed and ``extra`` it decides what may be resumed.
      progress: a progress line on stderr.
      max_params: a tensor with more weights is converted in row blocks of at most this many
        (when every step is row-separable), which bounds the memory one tensor takes.
      workers: threads converting blocks at once (each holds one block; the artifact is the
        same for any number).

    Returns:
      ``(passes, rows)``: one ``{"name", "seconds", "changed", "selected"}`` per step (as
      :func:`cqjax.pipeline.run` reports; after a resume ``seconds`` counts this run only), and one :func:`cqjax.quant_stats.tensors` row per
      tensor with its ``rel_error``.

    Raises:
      ValueError: the pipeline does not rewrite leaf by leaf (run it with :func:`cqjax.pipeline.run`).
      PassError: a step's filter selects nothing, or a step changed protected metadata.
      CheckpointError: a tensor has a NaN or an infinity (checked as each tensor is read; the
        tensors converted before it stay resumable).
    """
    ctx = pl.Context() if ctx is None else ctx
    steps = leafwise_steps(pipeline)
    if steps is None:
        raise ValueError("stream.convert: the pipeline has a step that does not rewrite leaf by leaf or needs "
                         "calibration or the float reference; run it with cqjax.pipeline.run")
    pl.check_filters(pl.to_pass(pipeline), ir)
    directory = Path(directory)
    artifact.check_target(directory)
    writer = ArtifactWriter(directory, resume=resume, key={
        "source": key, "pipeline": pl.describe(pl.to_pass(pipeline)), "seed": ctx.rng_seed,
        "extra": artifact.to_json(artifact.reproducible(extra or {}), "extra")})
    bar = Progress("convert", total=len(ir.meta), unit="tensors", every_s=10.0, tag="cqjax", enabled=progress)
    if writer.resumed:
        ctx.log(f"resuming: {writer.resumed} of {len(ir.meta)} tensors already converted")
    seconds = dict.fromkeys((s.name for s in steps), 0.0)

    def jobs():  # (path, its number of blocks, the future of one block; None: already written)
        for path, meta in ir.meta.items():
            if writer.done(path):
                yield path, 0, None
                continue
            blocks = row_blocks(ir.params[path], meta, steps, path, max_params) or [(ir.params[path], meta)]
            for part, part_meta in blocks:
                yield path, len(blocks), pool.submit(_block, steps, path, part, part_meta, ctx, meta.shape)

    done: list = []

    def drain(keep: int) -> None:  # writes finished tensors, in order, until `keep` jobs are left
        nonlocal done
        while len(window) > keep:
            path, n, future = window.popleft()
            if future is not None:
                done.append(future.result())
                if len(done) < n:
                    continue
                _write(writer, ir, path, done, seconds)
                done = []
            bar.update(1)

    workers = max(1, workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        window: collections.deque = collections.deque()
        for job in jobs():
            window.append(job)
            drain(workers)  # at most `workers` blocks in flight: memory stays bounded
        drain(0)
    bar.close()
    return finish(writer, ir, steps, seconds, extra, tokenizer_from)


def finish(writer: ArtifactWriter, ir: IR, steps: list[Step], seconds: dict[str, float], extra: dict | None,
           tokenizer_from: str | Path | None) -> tuple[list[dict], list[dict]]:
    """Writes the artifact of a conversion whose every tensor is in ``writer``; returns
    ``(passes, rows)`` (see :func:`convert`)."""
    notes = [writer.notes[p] for p in ir.meta]
    passes = [{"name": s.name, "seconds": seconds[s.name], "selected": sum(s.name in n["steps"] for n in notes),
               "changed": sum(bool(n["steps"].get(s.name)) for n in notes)} for s in steps]
    writer.finish(artifact.header_of(ir.family, ir.config, {**(extra or {}), "passes": passes}),
                  metadata=artifact.WEIGHTS_METADATA, tokenizer=artifact.tokenizer_copier(tokenizer_from))
    return passes, [n["row"] for n in notes]
