"""Calibrated conversion block by block: error feedback without the whole float model in memory.

A recipe whose steps rewrite one leaf at a time from the IR and that leaf's calibration Hessian
(:func:`calibrated_steps`: ``cq-ef``'s ``rotate → codebook → pack`` with
:class:`~cqjax.passes.gptq.ErrorFeedbackPack`, ``gptq``, a ``hessian`` codebook) is converted
the way GPTQ implementations do it, one decoder block at a time:

==================  ================================================================================
step                what
==================  ================================================================================
embed               the calibration rows (``tokens [n, T]``) in batches of ``batch`` rows: the first
                    block's input ``(x, side)``; only the model outside its blocks is loaded
block ``i``         its float weights read from the (lazy) checkpoint; one pass of ``x`` through it,
                    every linear's input second moments ``H = E[x xᵀ]`` summed where the input is
                    made (:class:`cqjax.calib.stats.Tape`); its tensors converted with those
                    Hessians and written to the artifact; the weights and Hessians dropped
carry              ``"quantized"`` (default): ``x`` goes on through the quantized block, so each
                    block's Hessians see the error of the quantized prefix (GPTQ's sequential
                    order); ``"float"``: through the float block (the Hessians of
                    :func:`cqjax.calib.stats.collect`, the in-memory ``cq-ef``)
head                the final norm of the carried ``x``: the Hessian of ``lm_head`` or the tied table
the rest            tensors outside the blocks, last (the head with its Hessian, other tables plain)
==================  ================================================================================

What is resident: the model outside its blocks, one block's float weights, its converted leaves
and Hessians, and the carried activations (``rows × T × D`` float32 and the side inputs).
After each block the carried activations are saved beside the artifact's finished parts, so
``resume=True`` restarts from the last finished block (a block cut short is recomputed, its
finished tensors not rewritten) and gives the same bytes as an uninterrupted conversion.

>>> passes, rows = convert(recipe, lazy_ir, "out/artifact", tokens=rows)  # doctest: +SKIP
"""

from __future__ import annotations

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
from cqjax.calib.stats import KernelProbe, Tape, add_sums
from cqjax.io import artifact, atomic
from cqjax.io.artifact_writer import ArtifactWriter
from cqjax.ir import IR, KERNEL_ROLES
from cqjax.memory import trim_heap
from cqjax.progress import Progress
from cqjax.stream import BLOCK_PARAMS, Step, _block, _join, _write, finish, leafwise_steps, row_blocks

CARRY = ("quantized", "float")
_STATISTICS = frozenset({"hessian"})


def calibrated_steps(pipeline: Any) -> list[Step] | None:
    """The flattened steps of ``pipeline`` if each rewrites leaf by leaf from the IR and at most
    that leaf's calibration Hessian; else None (the recipe cannot convert block by block)."""
    return leafwise_steps(pipeline, _STATISTICS)


def convert(pipeline: Any, ir: IR, directory: str | Path, *, tokens: np.ndarray, ctx: pl.Context | None = None,
            extra: dict | None = None, tokenizer_from: str | Path | None = None, resume: bool = False,
            key: Any = None, progress: bool = True, carry: str = "quantized", batch: int = 4
            ) -> tuple[list[dict], list[dict]]:
    """Converts the (lazy) float ``ir`` with ``pipeline`` block by block (see the module doc).

    Args:
      pipeline: a recipe for which :func:`calibrated_steps` is not None.
      ir: the float IR of a causal LM (lazy leaves are read block by block).
      directory: the artifact to write (atomically, at the end).
      tokens: int32 ``[n, T]`` calibration rows.
      ctx: the passes' context (its ``rng_seed`` seeds the rotations; its ``calibration`` is
        replaced block by block).
      extra, tokenizer_from, key: as for :func:`cqjax.stream.convert`.
      resume: continue an interrupted conversion of the same key, recipe and tokens.
      progress: a progress line per block on stderr.
      carry: ``"quantized"`` or ``"float"`` (see the module doc).
      batch: calibration rows per jitted step.

    Returns:
      ``(passes, rows)`` as :func:`cqjax.stream.convert` returns them.

    Raises:
      ValueError: the pipeline cannot convert block by block, a bad ``carry``, or empty tokens.
    """
    from cqjax.eval.streamed import StreamedLM
    from cqjax.runtime import evaluation_leaf

    ctx = pl.Context() if ctx is None else ctx
    steps = calibrated_steps(pipeline)
    if steps is None:
        raise ValueError("stream_calibrated.convert: a step does not rewrite leaf by leaf from the IR and its "
                         "calibration Hessian; run the recipe with cqjax.pipeline.run")
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
    lm = StreamedLM(ir, dtype=None, name="calibration")
    n = lm.num_layers
    blocks = [[p for p in ir.meta if p.startswith(f"layers/{i}/")] for i in range(n)]
    rest = [p for p in ir.meta if not p.startswith("layers/")]
    seconds = dict.fromkeys((s.name for s in steps), 0.0)
    stats = _BlockStats(lm)
    batches = [(tokens[i:i + batch], np.ones(tokens[i:i + batch].shape, bool)) for i in range(0, len(tokens), batch)]
    saved = _Carry(writer.parts)
    first, acts = saved.load(lambda: [lm.embed(t, m) for t, m in batches])
    if writer.resumed:
        ctx.log(f"resuming: {writer.resumed} of {len(ir.meta)} tensors already converted, from block {first}")
    bar = Progress("convert (calibrated)", total=n, unit="blocks", every_s=10.0, tag="cqjax", enabled=progress)
    bar.update(first)

    def convert_tensors(paths, hessians, n_tokens):
        block_ctx = ctx.replace(calibration={p: {"hessian": h, "tokens": n_tokens} for p, h in hessians.items()})
        leaves = {}
        for path in paths:
            leaf, meta = ir.params[path], ir.meta[path]
            parts = row_blocks(leaf, meta, steps, path, _block_params(meta)) or [(leaf, meta)]
            done = _pooled([_block(steps, path, part, part_meta, block_ctx, meta.shape) for part, part_meta in parts])
            if writer.done(path):  # a block cut short: recomputed for the carry, not rewritten
                leaves[path] = _join([(q, m) for q, m, *_ in done], meta.shape, path)[0]
            else:
                leaves[path] = _write(writer, ir, path, done, seconds)
        return leaves

    for i in range(first, n):
        graphdef, state = lm.load_block(i)
        out, hessians = stats(graphdef, state, i, acts, blocks[i], ir)
        del state
        leaves = convert_tensors(blocks[i], hessians, stats.tokens)
        del hessians
        if carry == "float":
            acts = out
        else:
            del out
            graphdef, state = lm.block_state(i, lambda p: evaluation_leaf(leaves[p], packed=False))
            acts = lm.run_block(graphdef, state, i, acts)
            del state
        del leaves
        saved.save(i + 1, acts)
        trim_heap()
        bar.update(1)
    bar.close()
    head = stats.head([lm.final_norm(x) for x, _ in acts], rest, ir)
    del acts, lm, stats
    trim_heap()
    convert_tensors(rest, head, len(tokens) * tokens.shape[1])
    return finish(writer, ir, steps, seconds, extra, tokenizer_from)


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


class _BlockStats:
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
