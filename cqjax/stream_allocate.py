"""Bit allocation block by block: the allocator's statistics without the whole float model.

:func:`allocate` gives the IR what :class:`cqjax.passes.allocate.AllocateBits` gives it in
memory (``meta.info["allocated_bits"]``, ``allocation``, ``predicted_rel_error``), holding one
float block at a time, so that a block-by-block conversion
(:func:`cqjax.stream_calibrated.convert`) can start with the allocator:

===========  =====================================================================================
phase        what
===========  =====================================================================================
forward      the calibration rows through the float blocks; each block's input saved to disk
             (``rows × length × hidden`` float32 per block)
head         per row: the gradient of its mean next-token NLL at the last block's output, and the
             squared gradient of the output head (lm_head, or the tied table)
backward     from the last block to the first: per row, the block's vector-Jacobian product gives
             its weights' squared gradients (summed: the diagonal Fisher of
             :func:`cqjax.calib.fisher.fisher_diag`) and the gradient at its input; its
             Hessians come from its saved input; each of its tensors is measured at each width
             (:meth:`AllocateBits.measure`) and its statistics dropped
embedding    the token table's gradient from the first block's input gradient; a tied table's
             per-row gradient is the head's plus the embedding's, so its square adds the cross
             term on that row's tokens (the embedding's gradient is zero elsewhere)
choose       the knapsack over every tensor's costs (:meth:`AllocateBits.choose`)
===========  =====================================================================================

Statistics are taken only where the allocator or its measured recipe reads them: the Fisher
(the ``fisher`` proxy), the Hessians (the ``hessian`` proxy, error feedback), a table's token
counts. Families whose blocks take float side inputs made from weights (per-layer embeddings)
are refused (:class:`ValueError`): their gradients would need those inputs' too.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax import pipeline as pl
from cqjax.calib.stats import TABLE_ROLES
from cqjax.ir import IR
from cqjax.memory import trim_heap
from cqjax.passes.allocate import AllocateBits, Plan
from cqjax.progress import Progress


def allocate(alloc: AllocateBits, ir: IR, tokens: np.ndarray, ctx: pl.Context, *, scratch: str | Path | None = None,
             progress: bool = True) -> IR:
    """``ir`` (a lazy float IR) with the allocation of ``alloc`` in its metadata (see the module
    doc), measured on the calibration rows ``tokens [n, T]``.

    Args:
      alloc: the allocator (its ``recipe`` is measured per tensor and width).
      ir: the float IR of a causal LM.
      tokens: int32 calibration rows (every position real).
      ctx: for ``log`` and ``rng_seed`` (the measured recipe's rotations).
      scratch: a directory for the saved block inputs (default: a temporary one); removed after.
      progress: progress lines on stderr.

    Raises:
      ValueError: the family's blocks take float side inputs, or the budget is out of reach.
    """
    from cqjax.eval.streamed import StreamedLM
    from cqjax.stream_calibrated import BlockStats

    start = time.perf_counter()
    tokens = np.asarray(tokens, np.int32)
    wants = set(alloc.needs.statistics)
    fisher = "fisher" in wants
    lm = StreamedLM(ir, dtype=jnp.float32, name="allocate")
    _check_side(lm, tokens)
    fixed, free, params = alloc.split(ir)
    n = lm.num_layers
    mask = np.ones(tokens.shape, bool)
    work = Path(tempfile.mkdtemp(prefix="allocate-", dir=scratch))
    try:
        bar = Progress("allocate: forward", total=n, unit="blocks", every_s=10.0, tag="cqjax", enabled=progress)
        acts = [lm.embed(tokens[r:r + 1], mask[r:r + 1]) for r in range(len(tokens))]
        layout = jax.tree.structure(acts)
        for i in range(n):
            _save(work / f"{i}.npz", acts)
            graphdef, state = lm.load_block(i)
            acts = lm.run_block(graphdef, state, i, acts)
            del state
            bar.update(1)
        bar.close()
        rest = [p for p in ir.meta if not p.startswith("layers/")]
        grads = _Gradients(lm, ir, tokens, rest) if fisher else None
        stats = {p: {"tokens": int(tokens.size)} for p in ir.meta}
        hessians = BlockStats(lm) if "hessian" in wants else None
        if hessians is not None:
            stats.update({p: {**stats[p], "hessian": h}
                          for p, h in hessians.head([lm.final_norm(x) for x, _ in acts], rest, ir).items()})
        cts = grads.head([x for x, _ in acts]) if fisher else None
        del acts
        costs: dict = {}
        fixed_costs: dict = {}

        def measure(paths: list[str]) -> None:
            quiet = ctx.replace(calibration={p: stats[p] for p in paths}, progress=False)
            costs.update(alloc.measure(ir, quiet, {p: alloc.choices for p in paths if p in free}, progress=False))
            fixed_costs.update({p: c[fixed[p]] for p, c in alloc.measure(
                ir, quiet, {p: (fixed[p],) for p in paths if p in fixed}, sizes_only=True, progress=False).items()})
            for p in paths:
                stats[p] = {}  # measured: dropped

        bar = Progress("allocate: measure", total=n, unit="blocks", every_s=10.0, tag="cqjax", enabled=progress)
        for i in reversed(range(n)):
            block = [p for p in ir.meta if p.startswith(f"layers/{i}/") and (p in free or p in fixed)]
            inputs = _load(work / f"{i}.npz", layout)
            graphdef, state = lm.load_block(i)
            if hessians is not None:
                for p, h in hessians(graphdef, state, i, inputs, block, ir)[1].items():
                    stats[p]["hessian"] = h
            if fisher:
                for p, f in grads.block(graphdef, state, i, inputs, cts).items():
                    if p in stats:
                        stats[p]["fisher"] = f
            del state, inputs
            measure(block)
            (work / f"{i}.npz").unlink()
            trim_heap()
            bar.update(1)
        bar.close()
        outside = [p for p in rest if (p in free or p in fixed)]  # tables, an untied head
        for p in outside:
            if ir.meta[p].role in TABLE_ROLES:
                counts = np.bincount(tokens.reshape(-1), minlength=ir.meta[p].shape[0])[: ir.meta[p].shape[0]]
                stats[p]["counts"] = counts
        if fisher:
            for p, f in grads.embedding(cts).items():
                stats[p]["fisher"] = f
        measure(outside)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan = Plan(costs=costs, fixed=fixed, fixed_costs=fixed_costs, params=params)
    out = alloc.apply(ir, alloc.choose(plan), plan, ctx)
    ctx.log(f"allocate: block by block in {time.perf_counter() - start:.1f} s")
    return out


def _check_side(lm, tokens: np.ndarray) -> None:
    """Refuses a family whose first block's side inputs hold floats (made from weights)."""
    shapes = jax.eval_shape(lm.embed, tokens[:1], np.ones(tokens[:1].shape, bool))[1]
    if any(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(shapes)):
        raise ValueError(f"allocation block by block: the {lm.ir.family} blocks take float side inputs (per-layer "
                         "embeddings); run it in memory (calib.carry=whole)")


def _save(file: Path, acts: list) -> None:
    np.savez(file, *[np.asarray(a) for a in jax.tree.leaves(acts)])


def _load(file: Path, layout) -> list:
    """A block's saved inputs (every row's ``(x, side)``, in the tree ``layout``)."""
    with np.load(file) as f:
        return jax.tree.unflatten(layout, [jnp.asarray(f[f"arr_{k}"]) for k in range(len(f.files))])


class _Gradients:
    """Per-row gradients of the rows' mean next-token NLL, block by block from the head (see the
    module doc): ``head``, then ``block`` for each block from the last, then ``embedding``."""

    def __init__(self, lm, ir: IR, tokens: np.ndarray, rest: list[str]):
        self.lm, self.ir, self.tokens = lm, ir, tokens
        self.mask = np.ones(tokens.shape, bool)
        self.rest = rest
        self.tables = [p for p in rest if ir.meta[p].role in TABLE_ROLES]
        shell = lm.shell

        @jax.jit
        def head(params, x, tok):
            def loss(params, x):
                logits = lm.head_fn(params, lm.norm_fn(params, x))
                lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
                return -jnp.mean(jnp.take_along_axis(lp, tok[:, 1:, None], axis=-1))

            _, pull = jax.vjp(loss, params, x)  # vjp, not grad: integer leaves get float0 cotangents
            g_params, g_x = pull(jnp.float32(1.0))
            return _squares(g_params), g_params, g_x

        @functools.partial(jax.jit, static_argnums=0)
        def block(graphdef, state, x, side, ct, i):
            f = lambda state, x: shell.block(i, x, side, layer=nnx.merge(graphdef, state))[0]  # noqa: E731
            _, pull = jax.vjp(f, state, x)
            g_state, g_x = pull(ct)
            return _squares(g_state), g_x

        @jax.jit
        def embed(params, tok, mask, ct):
            _, pull = jax.vjp(lambda params: lm.embed_fn(params, tok, mask)[0], params)
            return pull(ct)[0]

        self._head, self._block, self._embed = head, block, embed
        self.fisher: dict[str, np.ndarray] = {}
        self.head_rows: list[dict[str, np.ndarray]] = []  # per row: {table: its gradient on the row's tokens}

    def head(self, outputs: list) -> list:
        """The last block's per-row outputs → their loss gradients; sums the head's squares and
        keeps each row's gradient of the tables on that row's tokens (for the cross term)."""
        cts, sums = [], None
        for r, x in enumerate(outputs):
            tok = jnp.asarray(self.tokens[r:r + 1])
            sq, g, g_x = self._head(self.lm.params, x, tok)
            sums = _add(sums, _flat(sq))
            flat = _flat(g)
            ids = np.unique(self.tokens[r])
            self.head_rows.append({p: np.asarray(flat[p][jnp.asarray(ids)]) for p in self.tables if p in flat})
            cts.append(g_x)
        self.fisher.update({p: v for p, v in (sums or {}).items() if p in self.rest})
        return cts

    def block(self, graphdef, state, i: int, acts: list, cts: list) -> dict[str, np.ndarray]:
        """Block ``i``'s Fisher (``{IR path: float32 array}``, mean over rows); ``cts`` (the
        gradients at its output, per row) becomes the gradients at its input, in place."""
        sums = None
        for r, (x, side) in enumerate(acts):
            sq, cts[r] = self._block(graphdef, state, x, side, cts[r], np.int32(i))
            sums = _add(sums, _flat(sq))
        return {f"layers/{i}/{k}": v / len(acts) for k, v in sums.items()}

    def embedding(self, cts: list) -> dict[str, np.ndarray]:
        """The Fisher of the tensors outside the blocks (the head's, plus the embedding lookup's
        share of the tables, with the cross term of a tied table)."""
        fisher = {p: np.array(v, np.float32) for p, v in self.fisher.items()}
        for r, ct in enumerate(cts):
            g = _flat(self._embed(self.lm.params, jnp.asarray(self.tokens[r:r + 1]),
                                  jnp.asarray(self.mask[r:r + 1]), ct))
            for p in self.tables:
                if p not in g:
                    continue
                ids = np.unique(self.tokens[r])
                e = np.asarray(g[p][jnp.asarray(ids)])
                cross = 2.0 * self.head_rows[r][p] * e if p in self.head_rows[r] else 0.0
                fisher.setdefault(p, np.zeros(self.ir.meta[p].shape, np.float32))
                fisher[p][ids] += e * e + cross
        n = len(cts)
        return {p: v / n for p, v in fisher.items()}


def _squares(tree):
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)) if jnp.issubdtype(g.dtype, jnp.floating)
                        else g, tree)


def _flat(state) -> dict[str, jax.Array]:
    """``{path: array}`` of an NNX state's float leaves (paths relative to the state)."""
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)
            if jnp.issubdtype(v.get_value().dtype, jnp.floating)}


def _add(sums: dict | None, new: dict) -> dict:
    if sums is None:
        return {k: np.array(v, np.float32) for k, v in new.items()}
    for k, v in new.items():
        sums[k] += np.asarray(v)
    return sums
