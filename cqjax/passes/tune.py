"""Tune the continuous parameters of a quantized model against the float model, codes held fixed.

:class:`Tune` runs after the quantizing steps (pipeline key ``tune``, ``pipeline=cq-tune``). It
moves what the stored format keeps as floats — each quantized tensor's per-(row, block) norms and
codebook levels (CQ), scales and zeros (RTN), input scales where present, and the model's
float norm weights and biases — by gradient descent (optax Adam, :mod:`cqjax.passes.tune_core`)
so that the quantized model matches the float model (``ctx.reference``) on calibration rows
(``ctx.rows``). Codes, rotations and every layout stay as they are: a tuned artifact runs on the
FFI kernel unchanged.

==============  ================================================================================
stage           objective
==============  ================================================================================
block by block  for block ``i``: the quantized block's output on the *quantized* prefix's
                activation against the float block's output on the *float* prefix's activation
                (relative MSE), so each block also corrects the error that reaches it; the
                quantized stream then moves on through the tuned block
end to end      KL of the float model's next-token distribution to the quantized model's, on the
                teacher's top ``topk`` tokens plus the rest (fits a 262k vocabulary)
==============  ================================================================================

Time: ``max_seconds`` is split ``block_share`` / rest between the stages; the block stage gives
each block an equal share of what is left and steps until it is spent (at most ``steps``); the
end-to-end stage steps while its share lasts (at most ``e2e_steps``). Progress lines give the block, the loss before → after, and the time left. Memory: the
float reference model, the quantized model, and three activation streams ``[rows, length, D]``.

``meta.info`` of every tuned tensor gets ``tune``: ``{"block_loss": [before, after], "kl":
[before, after]}`` (its block's relative MSE, the model's KL on the calibration rows).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cqjax import select
from cqjax.ir import ELIGIBLE_ROLES, IR
from cqjax.kernels import backend
from cqjax.kernels.qarrays import CQArray, is_quantized
from cqjax.passes.tune_core import (ADDITIVE, MULTIPLICATIVE, Tunable, assemble, optimizer, relative_mse,
                                    teacher_topk, topk_kl)
from cqjax.passes.blockwise import chunks, embed, take_rows
from cqjax.pipeline import Context, Needs, Pass

#: Float parameters tuned besides the quantized leaves' fields.
FLOAT_ROLES = ("norm", "bias")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tune(Pass):
    """Block-wise, then end-to-end tuning of the stored format's continuous parameters.

    Attributes:
      rows: calibration rows used (calibration draws ``max(calib.rows, rows)``: more rows tune
        for the text at large, fewer overfit the rows).
      batch: rows per block-wise step.
      steps: block-wise steps per block, at most (0: skip the stage).
      lr: Adam learning rate of the block-wise stage (on relative offsets, see tune_core).
      e2e_steps: end-to-end steps, at most (0: skip the stage).
      e2e_batch: rows per end-to-end step.
      e2e_lr: Adam learning rate of the end-to-end stage.
      topk: teacher tokens kept per position for the KL.
      max_seconds: the time budget of the whole pass.
      block_share: the block-wise stage's share of it (when both stages run).
      seed: minibatch order.
    """

    name = "tune"
    default_where = select.Any(*(f"role:{r}" for r in FLOAT_ROLES + ELIGIBLE_ROLES))
    rows: int = 48
    batch: int = 1
    steps: int = 200
    lr: float = 1e-3
    e2e_steps: int = 200
    e2e_batch: int = 1
    e2e_lr: float = 1e-3
    topk: int = 64
    max_seconds: float = 1300.0
    block_share: float = 0.55
    seed: int = 0

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        """``rows`` calibration rows and the float reference."""
        return Needs(rows=self.rows, reference=True)

    def __post_init__(self):
        super().__post_init__()
        for key in ("rows", "batch", "e2e_batch", "topk"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ValueError(f"tune.{key}={getattr(self, key)!r}: must be an int >= 1")
        for key in ("steps", "e2e_steps"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 0):
                raise ValueError(f"tune.{key}={getattr(self, key)!r}: must be an int >= 0")
        for key in ("lr", "e2e_lr", "max_seconds"):
            if not getattr(self, key) > 0:
                raise ValueError(f"tune.{key}={getattr(self, key)!r}: must be > 0")
        if not 0 <= self.block_share <= 1:
            raise ValueError(f"tune.block_share={self.block_share!r}: must be in [0, 1]")

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        if ctx.reference is None or ctx.rows is None:
            raise ValueError("tune needs the float reference and calibration rows (Context(reference=..., "
                             "rows=...)): pipeline.run provides the reference, calibration the rows")
        if any(is_quantized(v) for v in ctx.reference.params.values()):
            raise ValueError("tune: ctx.reference must be the float model, not a quantized one (run tune in the "
                             "pipeline that quantizes, or pass Context(reference=<the float IR>))")
        from cqjax.io import hf

        selected = set(self.selected(ir))
        choose = lambda path, field: path in selected and (  # noqa: E731
            field in MULTIPLICATIVE + ADDITIVE or (field is None and ir.meta[path].role in FLOAT_ROLES))
        tokens = np.asarray(ctx.rows, np.int32)[: self.rows]
        report = _Report(ctx, self.max_seconds)
        # Seeds only record how rotations were drawn: zeroed, blocks of one shape share one compile.
        plain = ir.replace(params={p: v.replace(seed=0) for p, v in ir.params.items() if isinstance(v, CQArray)})
        with backend.use_kernel("jax"):  # the pure-JAX path is differentiable; the FFI kernel is not
            fmodel, qmodel = hf.to_model(ctx.reference), hf.to_model(plain)
            e2e = None
            if self.e2e_steps:
                # The teacher and the end-to-end step's compile (minutes for a 262k vocabulary) come
                # first, so that their time counts against the budget before the block stage splits it.
                e2e = _teacher(fmodel, tokens, self.topk), _e2e_step(optimizer(self.e2e_lr, self.e2e_steps))
                if self.steps:
                    _warm_up(e2e[1], qmodel, tokens[: min(self.e2e_batch, len(tokens))], e2e[0], choose)
            if self.steps:
                self._blocks(fmodel, qmodel, tokens, choose, report)
            tuned = self._end_to_end(fmodel, qmodel, tokens, choose, report, e2e)
        return _write_back(ir, tuned, report)

    # ----------------------------------------------------------------------------- block stage

    def _blocks(self, fmodel, qmodel, tokens, choose, report: _Report) -> None:
        n = len(qmodel.layers)
        budget = self.max_seconds * (self.block_share if self.e2e_steps else 1.0)
        fwd_f, fwd_q = _block_runner(fmodel), _block_runner(qmodel)
        step = _block_step(qmodel, optimizer(self.lr, self.steps))
        xf, side_f = embed(fmodel, tokens)
        xq, side_q = embed(qmodel, tokens)
        rng = np.random.default_rng(self.seed)
        for i in range(n):
            t0 = time.perf_counter()
            share = (budget - report.elapsed()) / (n - i)  # this block's seconds, forward passes included
            yf, side_f_next = fwd_f(fmodel.layers[i], xf, side_f, i)
            yq, next_side = fwd_q(qmodel.layers[i], xq, side_q, i)
            before = after = float(relative_mse(yq, yf))
            gq, sq = nnx.split(qmodel.layers[i])
            tun = Tunable.of(sq, choose, prefix=f"layers/{i}/")
            steps = 0
            if tun.base:
                t = tun.zeros()
                opt_state = step.opt.init(t)
                while steps < self.steps and time.perf_counter() - t0 < share:
                    idx = np.sort(rng.choice(len(tokens), min(self.batch, len(tokens)), replace=False))
                    t, opt_state, loss = step(t, opt_state, *tun.args, xq[idx], take_rows(side_q, idx), yf[idx],
                                              np.int32(i), treedef=tun.treedef, graphdef=gq)
                    jax.block_until_ready(loss)
                    steps += 1
                nnx.update(qmodel.layers[i], tun.tree(t))
            if steps:
                yq, next_side = fwd_q(qmodel.layers[i], xq, side_q, i)
                after = float(relative_mse(yq, yf))
            xq, xf, side_q, side_f = yq, yf, next_side, side_f_next
            report.block(i, n, before, after, steps, time.perf_counter() - t0, {p for p, _ in tun.names.values()})

    # ----------------------------------------------------------------------------- end to end

    def _end_to_end(self, fmodel, qmodel, tokens, choose, report: _Report, e2e) -> dict:
        """Runs the stage (``e2e``: the teacher and the step, None to skip it) and returns every
        tuned leaf's stored value."""
        g, state = nnx.split(qmodel)
        tun = Tunable.of(state, choose)
        t = tun.zeros()
        if e2e is None or not tun.base:
            return tun.stored(t)
        mask = np.ones(tokens.shape, bool)
        (top, ids, rest), step = e2e
        kl = _kl_fn(g, tun.treedef)
        before = kl(t, tun, tokens, top, ids, rest)
        rng = np.random.default_rng(self.seed + 1)
        opt_state, steps, s0 = step.opt.init(t), 0, time.perf_counter()
        while steps < self.e2e_steps:
            idx = np.sort(rng.choice(len(tokens), min(self.e2e_batch, len(tokens)), replace=False))
            t, opt_state, _ = step(t, opt_state, *tun.args, tokens[idx], mask[idx], top[idx], ids[idx], rest[idx],
                                   treedef=tun.treedef, graphdef=g)
            steps += 1
            jax.block_until_ready(t)
            if steps == 1:
                s0 = time.perf_counter()  # the first step compiles
            elif report.elapsed() + (time.perf_counter() - s0) / (steps - 1) * 2 > self.max_seconds:
                break  # keep time for the final KL
        after = kl(t, tun, tokens, top, ids, rest)
        if after > before:  # never hand back a worse model than the block stage made
            t, after = tun.zeros(), before
        report.e2e(before, after, steps)
        return tun.stored(t)


class _Report:
    """Progress lines and the ``tune`` record written into ``meta.info``."""

    def __init__(self, ctx: Context, budget: float):
        self.ctx, self.budget, self.start = ctx, budget, time.perf_counter()
        self.info: dict[str, dict] = {}
        self.kl: list[float] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def block(self, i, n, before, after, steps, seconds, paths) -> None:
        for p in paths:
            self.info.setdefault(p, {})["block_loss"] = [before, after]
        left = max(0.0, self.budget - self.elapsed())
        self.ctx.log(f"tune block {i + 1}/{n}: relative error {before:.4g} -> {after:.4g} ({steps} steps, "
                     f"{seconds:.1f} s); {left / 60:.1f} min of the budget left")

    def e2e(self, before, after, steps) -> None:
        self.kl = [before, after]
        self.ctx.log(f"tune end to end: KL {before:.4g} -> {after:.4g} nats/token ({steps} steps, "
                     f"{self.elapsed() / 60:.1f} min in all)")





def _block_runner(model):
    """``run(layer, x, side, i) -> (y, side)`` over all rows, a few at a time; one compile per
    layer structure (the layer's graph and state are arguments, the block index is traced)."""

    @functools.partial(jax.jit, static_argnums=0)
    def fwd(graphdef, state, x, side, i):
        return model.block(i, x, side, layer=nnx.merge(graphdef, state))[:2]

    def run(layer, x, side, i):
        g, state = nnx.split(layer)
        parts = [fwd(g, state, x[c], take_rows(side, c), np.int32(i)) for c in chunks(x.shape[0])]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)

    return run


def _block_step(model, opt: optax.GradientTransformation):
    """One jitted Adam step on a block's offsets against the float block's output."""

    @functools.partial(jax.jit, static_argnames=("treedef", "graphdef"))
    def step(t, opt_state, frozen, base, mult, scale, x, side, y, i, *, treedef, graphdef):
        def loss(t):
            layer = nnx.merge(graphdef, assemble(treedef, frozen, base, mult, scale, t))
            return relative_mse(model.block(i, x, side, layer=layer)[0], y)

        value, grads = jax.value_and_grad(loss)(t)
        updates, opt_state = opt.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, value

    step.opt = opt
    return step


def _e2e_step(opt: optax.GradientTransformation):
    """One jitted Adam step on the whole model's offsets against the teacher's top-k KL."""

    @functools.partial(jax.jit, static_argnames=("treedef", "graphdef"))
    def step(t, opt_state, frozen, base, mult, scale, tokens, mask, top, ids, rest, *, treedef, graphdef):
        def loss(t):
            model = nnx.merge(graphdef, assemble(treedef, frozen, base, mult, scale, t))
            return topk_kl(model(tokens, mask), top, ids, rest, mask)

        value, grads = jax.value_and_grad(loss)(t)
        updates, opt_state = opt.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, value

    step.opt = opt
    return step


def _warm_up(step, qmodel, tokens, teacher, choose) -> None:
    """Compiles ``step`` (from :func:`_e2e_step`) for a batch of ``tokens``' shape by running it
    once on them, result dropped."""
    g, state = nnx.split(qmodel)
    tun = Tunable.of(state, choose)
    if tun.base:
        t = tun.zeros()
        top, ids, rest = teacher
        n = len(tokens)
        out = step(t, step.opt.init(t), *tun.args, tokens, np.ones(tokens.shape, bool), top[:n], ids[:n], rest[:n],
                   treedef=tun.treedef, graphdef=g)
        jax.block_until_ready(out)


def _teacher(fmodel, tokens, k: int):
    """The float model's top-``k`` log-probabilities, ids and rest mass on every row."""
    g, state = nnx.split(fmodel)
    run = jax.jit(lambda state, tok: teacher_topk(nnx.merge(g, state)(tok), k))
    parts = [run(state, jnp.asarray(tokens[c])) for c in chunks(len(tokens))]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3))


def _kl_fn(graphdef, treedef):
    """``kl(t, tun, tokens, top, ids, rest)``: the student's mean top-k KL over all rows."""

    @jax.jit
    def part(t, frozen, base, mult, scale, tokens, top, ids, rest):
        model = nnx.merge(graphdef, assemble(treedef, frozen, base, mult, scale, t))
        return topk_kl(model(tokens), top, ids, rest)

    def kl(t, tun, tokens, top, ids, rest):
        parts = [(float(part(t, *tun.args, tokens[c], top[c], ids[c], rest[c])), c.stop - c.start)
                 for c in chunks(len(tokens))]
        return sum(v * n for v, n in parts) / sum(n for _, n in parts)

    return kl


def _write_back(ir: IR, tuned: dict, report: _Report) -> IR:
    """``ir`` with the tuned values in place (fields of quantized leaves in their stored dtypes,
    float32 arrays for float parameters) and ``meta.info["tune"]`` on every tuned tensor."""
    fields: dict[str, dict] = {}
    for (path, field), value in tuned.items():
        fields.setdefault(path, {})[field] = value
    params, meta = {}, {}
    for path, changes in fields.items():
        leaf = ir.params[path]
        if is_quantized(leaf):  # back to the stored dtypes (fp16)
            params[path] = leaf.replace(**{f: jnp.asarray(v, getattr(leaf, f).dtype) for f, v in changes.items()})
        else:
            params[path] = np.asarray(changes[None], np.float32)
        record = {**report.info.get(path, {}), "kl": report.kl}
        meta[path] = ir.meta[path].replace(info={**ir.meta[path].info, "tune": record})
    return ir.replace(params=params, meta=meta)
