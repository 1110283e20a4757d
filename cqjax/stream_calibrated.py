"""Calibrated conversion block by block: error feedback and tuning without the whole float model.

A recipe whose steps rewrite one leaf at a time from the IR and that leaf's calibration Hessian
(:func:`plan`: ``cq-ef``'s ``rotate → codebook → pack`` with
:class:`~cqjax.passes.gptq.ErrorFeedbackPack`, ``gptq``, a ``hessian`` codebook), optionally
followed by a :class:`~cqjax.passes.tune.Tune` step (``cq-tune``), is converted the way GPTQ
implementations do it, one decoder block at a time:

==================  ================================================================================
step                what
==================  ================================================================================
embed               the calibration rows (``tokens [n, T]``) in batches of ``batch`` rows: the first
                    block's input ``(x, side)``; only the model outside its blocks is loaded
block ``i``         its float weights read from the (lazy) checkpoint; one pass of ``x`` through it,
                    every linear's input second moments ``H = E[x xᵀ]`` summed where the input is
                    made (:class:`cqjax.calib.stats.Tape`); its tensors converted with those
                    Hessians; with ``tune``, the converted block's continuous parameters tuned so
                    that its output on the quantized stream matches the float block's output on
                    the float stream (the tune pass's block stage); then written to the artifact,
                    the weights and Hessians dropped
carry              ``"quantized"`` (default): ``x`` goes on through the quantized (tuned) block, so
                    each block's Hessians see the error of the quantized prefix (GPTQ's sequential
                    order); ``"float"``: through the float block (the Hessians of
                    :func:`cqjax.calib.stats.collect`, the in-memory ``cq-ef``); with ``tune``
                    both streams are carried
head                the final norm of the carried ``x``: the Hessian of ``lm_head`` or the tied table
the rest            tensors outside the blocks, last (the head with its Hessian, other tables plain)
end to end          with ``tune`` (``e2e_steps > 0``): the float model's top-k next-token
                    distribution on the tuning rows, from the float stream; the artifact is
                    written (marked unfinished in ``extra["tune"]``), loaded as the quantized model
                    alone, tuned end to end against that teacher, and replaced
==================  ================================================================================

What is resident: the model outside its blocks, one block's float weights, its converted leaves
and Hessians, and the carried activations (``rows × T × D`` float32 and the side inputs; two
streams with ``tune``). The end-to-end stage holds the quantized model, never a float one.
After each block the carried activations are saved beside the artifact's finished parts, so
``resume=True`` restarts from the last finished block (a block cut short is recomputed, its
finished tensors not rewritten) and gives the same bytes as an uninterrupted conversion (with
``tune``: when its steps, not its time budget, end each stage). A conversion killed in the
end-to-end stage starts over.

>>> passes, rows = convert(recipe, lazy_ir, "out/artifact", tokens=rows)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax import pipeline as pl
from cqjax import quant_stats, stream_allocate
from cqjax.calib.stats import KernelProbe, Tape, add_sums
from cqjax.io import artifact, atomic
from cqjax.io.artifact_writer import ArtifactWriter
from cqjax.ir import IR, KERNEL_ROLES, materialize
from cqjax.memory import trim_heap
from cqjax.passes.allocate import AllocateBits
from cqjax.passes.tune import Tune
from cqjax.progress import Progress
from cqjax.stream import BLOCK_PARAMS, Step, _block, _join, _write, finish, leafwise_steps, row_blocks

CARRY = ("quantized", "float")
_STATISTICS = frozenset({"hessian"})


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a recipe converts block by block: its leaf-wise ``steps`` (each reads the IR and at
    most its leaf's calibration Hessian), where the recipe starts with one its bit allocation
    (``allocate``, :mod:`cqjax.stream_allocate`), and where it ends with one its ``tune`` step
    (named ``tune_name``)."""

    steps: list[Step]
    tune: Tune | None = None
    tune_name: str = "tune"
    allocate: AllocateBits | None = None
    allocate_name: str = "allocate"


def plan(pipeline: Any) -> Plan | None:
    """The :class:`Plan` of ``pipeline``, or None if it cannot convert block by block."""
    named = pl.steps(pl.to_pass(pipeline))
    tune = name = allocate = allocate_name = None
    if named and isinstance(named[-1][1], Tune):
        (name, tune), named = named[-1], named[:-1]
    if named and isinstance(named[0][1], AllocateBits):
        (allocate_name, allocate), named = named[0], named[1:]
    steps = leafwise_steps(pl.named_chain(*named), _STATISTICS) if named else None
    return None if steps is None else Plan(steps, tune, name or "tune", allocate, allocate_name or "allocate")


def convert(pipeline: Any, ir: IR, directory: str | Path, *, tokens: np.ndarray, ctx: pl.Context | None = None,
            extra: dict | None = None, tokenizer_from: str | Path | None = None, resume: bool = False,
            key: Any = None, progress: bool = True, carry: str = "quantized", batch: int = 4
            ) -> tuple[list[dict], list[dict]]:
    """Converts the (lazy) float ``ir`` with ``pipeline`` block by block (see the module doc).

    Args:
      pipeline: a recipe for which :func:`plan` is not None.
      ir: the float IR of a causal LM (lazy leaves are read block by block).
      directory: the artifact to write (atomically, at the end).
      tokens: int32 ``[n, T]`` calibration rows (a ``tune`` step tunes on the first
        ``tune.rows`` of them).
      ctx: the passes' context (its ``rng_seed`` seeds the rotations; its ``calibration`` is
        replaced block by block).
      extra, tokenizer_from, key: as for :func:`cqjax.stream.convert`.
      resume: continue an interrupted conversion of the same key, recipe and tokens.
      progress: a progress line per block on stderr.
      carry: ``"quantized"`` or ``"float"``: the stream whose Hessians the blocks see (see the
        module doc).
      batch: calibration rows per jitted step.

    Returns:
      ``(passes, rows)`` as :func:`cqjax.stream.convert` returns them.

    Raises:
      ValueError: the pipeline cannot convert block by block, a bad ``carry``, or empty tokens.
    """
    from cqjax.eval.streamed import StreamedLM
    from cqjax.runtime import evaluation_leaf

    ctx = pl.Context() if ctx is None else ctx
    how = plan(pipeline)
    if how is None:
        raise ValueError("stream_calibrated.convert: a step does not rewrite leaf by leaf from the IR and its "
                         "calibration Hessian (or a tune step is not last); run the recipe with cqjax.pipeline.run")
    steps, tune = how.steps, how.tune
    if carry not in CARRY:
        raise ValueError(f"carry={carry!r}: allowed {CARRY}")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"calibration tokens must be a non-empty [rows, length] array, got shape {tokens.shape}")
    pl.check_filters(pl.to_pass(pipeline), ir)
    directory = Path(directory)
    artifact.check_target(directory)
    writer = ArtifactWriter(directory, resume=resume, key={
        "source": key, "pipeline": pl.describe(pl.to_pass(pipeline)), "seed": ctx.rng_seed,
        "extra": artifact.to_json(artifact.reproducible(extra or {}), "extra"),
        "calibration": {"tokens": hashlib.sha256(tokens.tobytes()).hexdigest(), "shape": list(tokens.shape),
                        "carry": carry, "batch": batch}})
    allocated = time.perf_counter()
    if how.allocate is not None:
        ir = stream_allocate.allocate(how.allocate, ir, tokens, ctx, scratch=writer.parts, progress=progress)
    allocated = time.perf_counter() - allocated
    lm = StreamedLM(ir, dtype=None, name="calibration")
    n = lm.num_layers
    blocks = [[p for p in ir.meta if p.startswith(f"layers/{i}/")] for i in range(n)]
    rest = [p for p in ir.meta if not p.startswith("layers/")]
    report = [Step(s.name, s.p, s.selects) for s in steps]
    if how.allocate is not None:
        report.insert(0, Step(how.allocate_name, how.allocate, lambda path, meta: "allocated_bits" in meta.info))
    tuner = None
    if tune is not None:
        tuner = _BlockTuning(tune, how.tune_name, lm, ir, ctx, n)
        report.append(Step(how.tune_name, tune, lambda path, meta: path in tuner.selected))
    seconds = dict.fromkeys((s.name for s in report), 0.0)
    if how.allocate is not None:
        seconds[how.allocate_name] = allocated
    stats = BlockStats(lm)
    batches = [(tokens[i:i + batch], np.ones(tokens[i:i + batch].shape, bool)) for i in range(0, len(tokens), batch)]

    def fresh():  # the first block's inputs of the streams this conversion carries
        acts = [lm.embed(t, m) for t, m in batches]
        return {"q": acts if carry == "quantized" or tune else None, "f": acts if carry == "float" or tune else None}

    saved = _Carry(writer.parts)
    first, streams = saved.load(fresh)
    if writer.resumed:
        ctx.log(f"resuming: {writer.resumed} of {len(ir.meta)} tensors already converted, from block {first}")
    bar = Progress("convert (calibrated)", total=n, unit="blocks", every_s=10.0, tag="cqjax", enabled=progress)
    bar.update(first)

    def quantize(paths, hessians, n_tokens) -> dict[str, list]:
        block_ctx = ctx.replace(calibration={p: {"hessian": h, "tokens": n_tokens} for p, h in hessians.items()})
        out = {}
        for path in paths:
            leaf, meta = ir.params[path], ir.meta[path]
            parts = row_blocks(leaf, meta, steps, path, _block_params(meta)) or [(leaf, meta)]
            out[path] = _pooled([_block(steps, path, part, part_meta, block_ctx, meta.shape)
                                 for part, part_meta in parts])
            if how.allocate is not None:  # the allocation's share of the report: it set this tensor's width
                for d in out[path]:
                    d[2][how.allocate_name] = "allocated_bits" in meta.info
        return out

    def write(done: dict[str, list]) -> dict[str, Any]:
        leaves = {}
        for path, d in done.items():
            if writer.done(path):  # a block cut short: recomputed for the carry, not rewritten
                leaves[path] = _join([(q, m) for q, m, *_ in d], ir.meta[path].shape, path)[0]
            else:
                leaves[path] = _write(writer, ir, path, d, seconds)
        return leaves

    for i in range(first, n):
        graphdef, state = lm.load_block(i)
        out, hessians = stats(graphdef, state, i, streams["q"] if carry == "quantized" else streams["f"], blocks[i],
                              ir)
        target = None
        if streams["f"] is not None:
            target = out if carry == "float" else lm.run_block(graphdef, state, i, streams["f"])
        del state, out
        done = quantize(blocks[i], hessians, stats.tokens)
        del hessians
        if tuner is not None:
            done = tuner(i, done, streams["q"], target)
        leaves = write(done)
        del done
        if streams["q"] is not None:
            graphdef, state = lm.block_state(i, lambda p: evaluation_leaf(leaves[p], packed=False))
            streams["q"] = lm.run_block(graphdef, state, i, streams["q"])
            del state
        streams["f"] = target
        del leaves, target
        saved.save(i + 1, streams)
        trim_heap()
        bar.update(1)
    bar.close()
    head = stats.head([lm.final_norm(x) for x, _ in streams["q" if carry == "quantized" else "f"]], rest, ir)
    teacher = None
    if tune is not None and tune.e2e_steps:
        teacher = _teacher(lm, streams["f"], tune.rows, tune.topk)
    del streams, lm, stats
    trim_heap()
    write(quantize(rest, head, len(tokens) * tokens.shape[1]))
    if teacher is None:
        return finish(writer, ir, report, seconds, extra, tokenizer_from)
    # The end-to-end stage holds the quantized model (not the float one): its block stage is
    # written first as a complete artifact, marked unfinished, which the stage then replaces.
    passes, _ = finish(writer, ir, report, seconds, {**(extra or {}), "tune": "end-to-end stage unfinished"},
                       tokenizer_from)
    start = time.perf_counter()
    qir = tune.end_to_end(artifact.load(directory, verify=False), tokens[: tune.rows], teacher,
                          tuner.e2e_report())
    for p in passes:
        p["seconds"] += (time.perf_counter() - start) if p["name"] == how.tune_name else 0.0
    rows = quant_stats.tensors(qir, ir)
    artifact.save(qir, directory, tokenizer_from=tokenizer_from, extra={**(extra or {}), "passes": passes})
    return passes, rows


class _BlockTuning:
    """The block stage of a ``tune`` step inside a block-by-block conversion: each block's
    converted leaves tuned so that the block's output on the quantized stream matches the float
    block's on the float stream (:class:`cqjax.passes.tune.BlockTuner`), before they are written.

    Its budget (``tune.block_budget()``) counts tuning time only, shared equally by the blocks
    not yet tuned; the end-to-end stage gets what is left of ``tune.max_seconds``."""

    def __init__(self, tune: Tune, name: str, lm, ir: IR, ctx: pl.Context, n: int):
        from cqjax.passes.tune import BlockTuner, Report

        self.tune, self.name, self.lm, self.ir, self.ctx, self.n = tune, name, lm, ir, ctx, n
        self.selected = set(tune.selected(ir))
        self.choose = tune.chooser(ir)
        self.tuner = BlockTuner(tune, lm.shell)
        self.report = Report(ctx, tune.block_budget())
        self.spent = 0.0

    def __call__(self, i: int, done: dict[str, list], acts: list, target: list) -> dict[str, list]:
        """``done`` (block ``i``'s converted leaves, as :func:`_block` returns each tensor's row
        blocks) with its tuned leaves in place, one entry per tuned tensor."""
        from cqjax.kernels import backend
        from cqjax.passes.tune import by_path, seedless_leaf, tune_record, tuned_leaf

        start = time.perf_counter()
        rows = self.tune.rows
        x, side = _rows(acts, rows)
        y, _ = _rows(target, rows)
        joined = {p: _join([(q, m) for q, m, *_ in d], self.ir.meta[p].shape, p) for p, d in done.items()}
        share = (self.tune.block_budget() - self.spent) / (self.n - i)
        with backend.use_kernel("jax"):  # the pure-JAX path is differentiable
            graphdef, state = self.lm.block_state(i, lambda p: seedless_leaf(joined[p][0]))
            result = self.tuner(graphdef, state, x, side, y, i, self.choose, deadline=start + share)
        changes = by_path(result.values)
        record = {"block_loss": [result.before, result.after]}
        if result.recoded is not None:
            record["recoded"] = result.recoded
        out = dict(done)
        tuned = sorted(result.paths & set(done))
        for path in tuned:
            if path not in changes:  # no step ran: its row blocks as converted, with the record
                out[path] = [(q, tune_record(m, **record), {**t, self.name: False}, took, sums)
                             for q, m, t, took, sums in done[path]]
                continue
            leaf = tuned_leaf(joined[path][0], changes[path])  # one entry: the tuned tensor, re-measured
            took = {name: sum(d[3][name] for d in done[path]) for name in done[path][0][3]}
            touched = {name: any(d[2][name] for d in done[path]) for name in done[path][0][2]}
            out[path] = [(leaf, tune_record(joined[path][1], **record), {**touched, self.name: True}, took,
                          _error_sums(self.ir, path, leaf))]
        seconds = time.perf_counter() - start
        self.spent += seconds
        if tuned:  # the stage's time, counted once
            out[tuned[0]][0][3][self.name] = seconds
        self.report.start = time.perf_counter() - self.spent  # its budget counts tuning only
        self.report.block(i, self.n, result.before, result.after, result.steps, seconds, result.paths,
                          result.recoded)
        return out

    def e2e_report(self):
        from cqjax.passes.tune import Report

        return Report(self.ctx, max(0.0, self.tune.max_seconds - self.spent))


def _rows(acts: list, rows: int) -> tuple[jax.Array, Any]:
    """The first ``rows`` rows of a stream's batches ``[(x, side)]``, joined: ``(x, side)``."""
    x = jnp.concatenate([a[0] for a in acts])[:rows]
    side = jax.tree.map(lambda *s: jnp.concatenate(s)[:rows], *[a[1] for a in acts])
    return x, side


def _error_sums(ir: IR, path: str, leaf: Any) -> tuple[float, float] | None:
    """:func:`cqjax.quant_stats.error_sums` of a quantized ``leaf`` against ``ir``'s float
    tensor (None for a float leaf)."""
    if not quant_stats.is_quantized(leaf):
        return None
    w = np.asarray(materialize(ir.params[path]), np.float32)
    transposed = ir.meta[path].role in KERNEL_ROLES and w.ndim == 2
    return quant_stats.error_sums(w.T if transposed else w, quant_stats.dequantizer(transpose=transposed)(leaf))


def _teacher(lm, acts: list, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float model's top-``k`` log-probabilities, ids and rest mass
    (:func:`cqjax.passes.tune_core.teacher_topk`) on the first ``rows`` rows of the float
    stream after the last block, one row at a time (a row's logits are the largest array)."""
    from cqjax.passes.tune_core import teacher_topk

    run = jax.jit(lambda params, h: teacher_topk(lm.head_fn(params, h), k))
    x, _ = _rows(acts, rows)
    parts = [run(lm.params, lm.final_norm(x[r:r + 1])) for r in range(x.shape[0])]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3))


def _block_params(meta) -> int:
    """Weights per row block of a tensor: row blocks bound a large table's working copies, and
    each holds at least as many weights as its Hessian has entries, so preparing the Hessian
    (rotated, factored) again per block stays a small share of the work."""
    k = meta.shape[0] if meta.role in KERNEL_ROLES else meta.shape[-1]
    return max(BLOCK_PARAMS, k * k)


def _pooled(done: list) -> list:
    """Row blocks of one tensor with their error feedback's ``ef_rel_error`` pooled over the
    blocks (``Σ loss / Σ base``, each block's ``base`` recorded as ``ef_base``) in every block's
    metadata, so that they join into one tensor."""
    infos = [d[1].info for d in done]
    if len(done) < 2 or any("ef_base" not in i for i in infos):
        return done
    base = sum(i["ef_base"] for i in infos)
    loss = sum(i["ef_rel_error"] * i["ef_base"] for i in infos)
    info = {"ef_rel_error": loss / base if base > 0 else 0.0, "ef_base": base}
    return [(q, m.replace(info={**m.info, **info}), *rest) for q, m, *rest in done]


def _gram(x: jax.Array) -> jax.Array:
    """``Σ x xᵀ`` over every position of ``x [..., K]`` (float32)."""
    f = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return f.T @ f


_jit_gram = jax.jit(_gram)


class BlockStats:
    """Runs a block over the carried activations and sums its linears' input Hessians.

    ``stats(graphdef, state, i, acts, paths, ir) -> (outputs, {path: H float64 [K, K]})``: the
    kernels of ``paths`` (block ``i``'s tensors with a kernel role) are probed in a copy of the
    block; one compile per block structure (the probes name paths inside the block).
    """

    def __init__(self, lm):
        self.lm, self.tape, self.tokens = lm, Tape(), 0
        self.layouts: dict = {}
        tape, shell = self.tape, lm.shell

        @functools.partial(jax.jit, static_argnums=(0, 1))
        def run(graphdef, key, state, x, side, i):
            tape.clear()
            tape.reduce = _gram
            y = shell.block(i, x, side, layer=nnx.merge(graphdef, state))[:2]
            sums, self.layouts[key] = tape.distinct()
            tape.clear()
            return y, sums

        self._run = run

    def __call__(self, graphdef, state, i, acts, paths, ir):
        prefix = f"layers/{i}/"
        kernels = {p[len(prefix):] for p in paths if ir.meta[p].role in KERNEL_ROLES and len(ir.meta[p].shape) == 2}
        state = jax.tree.map(lambda x: x, state)  # new Variables: the caller's block keeps its kernels
        for key, var in nnx.to_flat_state(state):
            rel = "/".join(map(str, key))
            if rel in kernels:
                var.set_value(KernelProbe(var.get_value(), rel, self.tape))
        key = (graphdef, tuple(sorted(kernels)))
        outs, sums = [], None
        for x, side in acts:
            y, s = self._run(graphdef, key, state, x, side, np.int32(i))
            outs.append(y)
            sums = add_sums(sums, s)
        self.tokens = sum(int(np.prod(x.shape[:-1])) for x, _ in acts)
        layout = self.layouts[key]
        return jax.block_until_ready(outs), {prefix + rel: sums[k] / self.tokens for rel, k in layout.items()}

    def head(self, hidden: list[jax.Array], paths: list[str], ir) -> dict[str, np.ndarray]:
        """``{path: H}`` of the output head (``lm_head/kernel``, else the tied table) on the
        final-norm hidden states, if that path is among ``paths``."""
        path = "lm_head/kernel" if "lm_head/kernel" in ir.meta else "embed_tokens/embedding"
        if path not in paths:
            return {}
        sums = None
        for h in hidden:
            sums = add_sums(sums, [_jit_gram(h)])
        return {path: sums[0] / sum(int(np.prod(h.shape[:-1])) for h in hidden)}


class _Carry:
    """The carried activations after the last finished block, in the artifact's parts folder."""

    def __init__(self, parts: Path):
        self.file = parts / "carry.npz"

    def save(self, block: int, acts: list) -> None:
        leaves = jax.tree.leaves(acts)
        atomic.write_bytes(self.file, _npz({"block": np.int64(block), **{f"a{k}": np.asarray(a)
                                                                         for k, a in enumerate(leaves)}}))

    def load(self, fresh) -> tuple[int, list]:
        """``(first block to convert, its input activations)``: from the file where there is
        one (a resumed conversion), else block 0 and ``fresh()``."""
        acts = fresh()
        if not self.file.is_file():
            return 0, acts
        with np.load(self.file) as f:
            block = int(f["block"])
            leaves = [jnp.asarray(f[f"a{k}"]) for k in range(len(f.files) - 1)]
        treedef = jax.tree.structure(acts)
        if treedef.num_leaves != len(leaves):
            return 0, acts
        return block, jax.tree.unflatten(treedef, leaves)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
