"""Tune the continuous parameters of a quantized model against the float model (codes held fixed,
or re-assigned straight through in the block stage when ``recode_lr > 0``).

:class:`Tune` runs after the quantizing steps (pipeline key ``tune``, ``pipeline=cq-tune``). It
moves what the stored format keeps as floats — each quantized tensor's per-(row, block) norms and
codebook levels (CQ), scales and zeros (RTN), input scales where present, and the model's
float norm weights and biases — by gradient descent (optax Adam, :mod:`cqjax.passes.tune_core`)
so that the quantized model matches the float model (``ctx.reference``) on calibration rows
(``ctx.rows``). Rotations and every layout stay as they are, and the codes too unless
``recode_lr > 0`` lets the block stage move them (:mod:`cqjax.passes.recode`): a tuned artifact
runs on the FFI kernel unchanged.

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

A sentence encoder (family kind ``encoder``) predicts no tokens: it is tuned by the block stage
alone, with the whole budget.

Time: ``max_seconds`` is split ``block_share`` / rest between the stages; the block stage gives
each block an equal share of what is left and steps until it is spent (at most ``steps``); the
end-to-end stage steps while its share lasts (at most ``e2e_steps``). Progress lines give the
block, the loss before → after, and the time left.

Memory: run as a pass (``pipeline.run``, the CLI's ``calib.carry=whole``), the float reference
model, the quantized model, and three activation streams ``[rows, length, D]``. Run block by
block (:func:`cqjax.stream_calibrated.convert`, the CLI's default for ``cq-tune``), one block's
float and quantized weights and two activation streams, then the quantized model alone for the
end-to-end stage: :class:`BlockTuner` and :meth:`Tune.end_to_end` are the two stages as parts.
Either way the end-to-end stage takes its gradient block by block (:class:`_Chain`): it holds
one block's intermediates at a time and compiles each block structure once.

``meta.info`` of every tuned tensor gets ``tune``: ``{"block_loss": [before, after], "kl":
[before, after]}`` (its block's relative MSE, the model's KL on the calibration rows).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
from typing import Any

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
from cqjax.models.transformer import OutputHead
from cqjax.passes import recode
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
      recode_lr: > 0: the block-wise stage also re-assigns CQ kernels' codes, straight through
        (:mod:`cqjax.passes.recode`), their latents moving at this rate in units of the levels'
        rms; 0 (default): codes stay as packed.
      e2e_steps: end-to-end steps, at most (0: skip the stage).
      e2e_batch: rows per end-to-end step.
      e2e_lr: Adam learning rate of the end-to-end stage.
      topk: teacher tokens kept per position for the KL.
      max_seconds: the time budget of the whole pass.
      block_share: the block-wise stage's share of it (when both stages run).
      seed: minibatch order.
      dot_dtype: operands of the weight dots in the gradient steps (float32 accumulation):
        ``float32``, ``bfloat16``, or ``auto`` (bfloat16 where its dots are faster,
        :func:`cqjax.kernels.backend.bf16_dots_fast`). On SmolLM2 3-bit, bfloat16 on an AMX
        host took ~12% more steps in the same budget for a lower KL but a higher perplexity
        than float32 (README, Quality), so float32 stays the default. Losses before and after each stage,
        the activations carried to the next block and the float model's targets stay float32.
    """

    name = "tune"
    default_where = select.Any(*(f"role:{r}" for r in FLOAT_ROLES + ELIGIBLE_ROLES))
    rows: int = 48
    batch: int = 1
    steps: int = 200
    lr: float = 1e-3
    recode_lr: float = 0.0
    e2e_steps: int = 200
    e2e_batch: int = 1
    e2e_lr: float = 1e-3
    topk: int = 64
    max_seconds: float = 1300.0
    block_share: float = 0.55
    seed: int = 0
    dot_dtype: str = "float32"

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
        if not self.recode_lr >= 0:
            raise ValueError(f"tune.recode_lr={self.recode_lr!r}: must be >= 0")
        if not 0 <= self.block_share <= 1:
            raise ValueError(f"tune.block_share={self.block_share!r}: must be in [0, 1]")
        if self.dot_dtype not in ("auto",) + backend.DOT_DTYPES:
            raise ValueError(f"tune.dot_dtype={self.dot_dtype!r}: allowed: {('auto',) + backend.DOT_DTYPES}")

    def step_dots(self) -> str:
        """The dot operand dtype of the gradient steps (:attr:`dot_dtype` with ``auto`` resolved)."""
        if self.dot_dtype == "auto":
            return "bfloat16" if backend.bf16_dots_fast() else "float32"
        return self.dot_dtype

    def chooser(self, ir: IR):
        """``choose(path, field) -> bool``: whether a float of ``ir`` is tuned (a quantized leaf's
        continuous field, or a float norm or bias, on a path this pass selects)."""
        selected = set(self.selected(ir))
        return lambda path, field: path in selected and (
            field in MULTIPLICATIVE + ADDITIVE or (field is None and ir.meta[path].role in FLOAT_ROLES))

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        if ctx.reference is None or ctx.rows is None:
            raise ValueError("tune needs the float reference and calibration rows (Context(reference=..., "
                             "rows=...)): pipeline.run provides the reference, calibration the rows")
        if any(is_quantized(v) for v in ctx.reference.params.values()):
            raise ValueError("tune: ctx.reference must be the float model, not a quantized one (run tune in the "
                             "pipeline that quantizes, or pass Context(reference=<the float IR>))")
        from cqjax.io import hf
        from cqjax.models import registry

        if self.e2e_steps and registry.FAMILIES[ir.family].kind != "causal_lm":
            ctx.log(f"{ctx.step or self.name}: {ir.family} predicts no tokens, so no end-to-end KL: the whole "
                    "budget goes to the block-wise stage")
            return dataclasses.replace(self, e2e_steps=0)(ir, ctx)
        choose = self.chooser(ir)
        tokens = np.asarray(ctx.rows, np.int32)[: self.rows]
        report = Report(ctx, self.max_seconds)
        with backend.use_kernel("jax"):  # the pure-JAX path is differentiable; the FFI kernel is not
            fmodel, qmodel = hf.to_model(ctx.reference), hf.to_model(seedless(ir))
            teacher = _teacher(fmodel, tokens, self.topk) if self.e2e_steps else None
            codes = self._blocks(fmodel, qmodel, tokens, choose, report) if self.steps else {}
            tuned = self._end_to_end(qmodel, tokens, choose, report, teacher)
        return _write_back(ir, {**tuned, **codes}, report)

    def end_to_end(self, ir: IR, tokens: np.ndarray, teacher: tuple, report: Report) -> IR:
        """The end-to-end stage alone, on a quantized ``ir`` whose block stage ran elsewhere
        (:func:`cqjax.stream_calibrated.convert`), against the float model's ``teacher``
        (:func:`~cqjax.passes.tune_core.teacher_topk` of its logits on ``tokens``): no float
        model is held."""
        if not self.e2e_steps:
            return ir
        from cqjax.io import hf

        with backend.use_kernel("jax"):
            tuned = self._end_to_end(hf.to_model(seedless(ir)), tokens, self.chooser(ir), report, teacher)
        return _write_back(ir, tuned, report)

    # ----------------------------------------------------------------------------- block stage

    def block_budget(self) -> float:
        """The seconds of :attr:`max_seconds` that the block stage may spend."""
        return self.max_seconds * (self.block_share if self.e2e_steps else 1.0)

    def _blocks(self, fmodel, qmodel, tokens, choose, report: Report) -> dict:
        """Tunes ``qmodel``'s blocks in place; returns the re-assigned codes ``{(path, "codes"):
        packed}`` (empty unless :attr:`recode_lr`)."""
        n, codes = len(qmodel.layers), {}
        budget = self.block_budget()
        fwd_f = block_runner(fmodel)
        tuner = BlockTuner(self, qmodel)
        xf, side_f = embed(fmodel, tokens)
        xq, side_q = embed(qmodel, tokens)
        for i in range(n):
            t0 = time.perf_counter()
            share = (budget - report.elapsed()) / (n - i)  # this block's seconds, forward passes included
            yf, side_f = fwd_f(*nnx.split(fmodel.layers[i]), xf, side_f, i)
            done = tuner(*nnx.split(qmodel.layers[i]), xq, side_q, yf, i, choose, deadline=t0 + share)
            nnx.update(qmodel.layers[i], done.state)
            xq, side_q, xf = done.y, done.side, yf
            codes.update({k: v for k, v in done.values.items() if k[1] == "codes"})
            report.block(i, n, done.before, done.after, done.steps, time.perf_counter() - t0, done.paths,
                         done.recoded)
        return codes

    # ----------------------------------------------------------------------------- end to end

    def _end_to_end(self, qmodel, tokens, choose, report: Report, teacher) -> dict:
        """Runs the stage (``teacher``: the float model's top-k on ``tokens``, None to skip it)
        and returns every tuned leaf's stored value."""
        chain = _Chain(qmodel, choose, optimizer(self.e2e_lr, self.e2e_steps), self.step_dots())
        t = chain.zeros()
        if teacher is None or chain.empty:
            return chain.stored(t)
        if type(qmodel).hidden_states is not OutputHead.hidden_states:
            raise TypeError(f"tune end to end: {type(qmodel).__name__} overrides hidden_states; the block-by-block "
                            "gradient needs the shared embed → blocks → norm loop")
        mask = np.ones(tokens.shape, bool)
        top, ids, rest = teacher
        before = chain.kl(t, tokens, top, ids, rest)
        rng = np.random.default_rng(self.seed + 1)
        opt_state, steps, s0 = chain.opt.init(t), 0, time.perf_counter()
        while steps < self.e2e_steps:
            idx = np.sort(rng.choice(len(tokens), min(self.e2e_batch, len(tokens)), replace=False))
            t, opt_state = chain.step(t, opt_state, tokens[idx], mask[idx], top[idx], ids[idx], rest[idx])
            steps += 1
            jax.block_until_ready(t)
            if steps == 1:
                s0 = time.perf_counter()  # the first step compiles
            elif report.elapsed() + (time.perf_counter() - s0) / (steps - 1) * 2 > report.budget:
                break  # keep time for the final KL
        after = chain.kl(t, tokens, top, ids, rest)
        if after > before:  # never hand back a worse model than the block stage made
            t, after = chain.zeros(), before
        report.e2e(before, after, steps)
        return chain.stored(t)


class Report:
    """Progress lines and the ``tune`` record written into ``meta.info``."""

    def __init__(self, ctx: Context, budget: float):
        self.ctx, self.budget, self.start = ctx, budget, time.perf_counter()
        self.info: dict[str, dict] = {}
        self.kl: list[float] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def block(self, i, n, before, after, steps, seconds, paths, recoded=None) -> None:
        for p in paths:
            self.info.setdefault(p, {})["block_loss"] = [before, after]
            if recoded is not None:
                self.info[p]["recoded"] = recoded
        left = max(0.0, self.budget - self.elapsed())
        codes = "" if recoded is None else f", {100 * recoded:.2f}% of codes re-assigned"
        self.ctx.log(f"tune block {i + 1}/{n}: relative error {before:.4g} -> {after:.4g} ({steps} steps{codes}, "
                     f"{seconds:.1f} s); {left / 60:.1f} min of the budget left")

    def e2e(self, before, after, steps) -> None:
        self.kl = [before, after]
        self.ctx.log(f"tune end to end: KL {before:.4g} -> {after:.4g} nats/token ({steps} steps, "
                     f"{self.elapsed() / 60:.1f} min in all)")





def block_runner(model):
    """``run(graphdef, state, x, side, i) -> (y, side)``: one block of ``model`` (anything with
    ``block(i, x, side, layer=)``) over all rows, a few at a time; one compile per block
    structure (the graph is static, the state and the block index are traced)."""

    @functools.partial(jax.jit, static_argnums=0)
    def fwd(graphdef, state, x, side, i):
        return model.block(i, x, side, layer=nnx.merge(graphdef, state))[:2]

    def run(graphdef, state, x, side, i):
        parts = [fwd(graphdef, state, x[c], take_rows(side, c), np.int32(i)) for c in chunks(x.shape[0])]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)

    return run


@dataclasses.dataclass(frozen=True)
class BlockResult:
    """What :class:`BlockTuner` made of one block.

    Attributes:
      state: the block's state with the tuned values.
      y, side: the tuned block's output and side outputs (the next block's input).
      before, after: its relative MSE against the target before and after tuning.
      steps: the Adam steps taken.
      paths: the IR paths it tuned.
      values: ``{(IR path, field): array}`` of the tuned values (empty if no step ran): float32,
        and the packed ``codes`` of re-assigned kernels (uint8).
      recoded: the fraction of the block's CQ codes re-assigned (None: codes were held fixed).
    """

    state: Any
    y: Any
    side: Any
    before: float
    after: float
    steps: int
    paths: set
    values: dict
    recoded: float | None = None


class BlockTuner:
    """Tunes one block at a time: its output on the quantized stream against the float block's
    output on the float stream (the block stage of :class:`Tune`).

    Args:
      tune: the settings (``steps``, ``batch``, ``lr``, ``seed``).
      model: anything with ``block(i, x, side, layer=)``: a model, or a streamed model's shell.
    """

    def __init__(self, tune: Tune, model):
        self.tune, self.run = tune, block_runner(model)
        opt = optimizer(tune.lr, tune.steps)
        if tune.recode_lr:
            opt = optax.multi_transform({"fields": opt, "codes": optimizer(tune.recode_lr, tune.steps)},
                                        ("fields", "codes"))
        self.step = _block_step(model, opt, tune.step_dots())

    def __call__(self, graphdef, state, x, side, y, i: int, choose, *, deadline: float) -> BlockResult:
        """Tunes block ``i`` (``(graphdef, state)``, quantized leaves in it) on the inputs ``(x,
        side)`` against ``y`` until ``steps`` or the ``deadline`` (of ``time.perf_counter()``)."""
        tune = self.tune
        yq, side_q = self.run(graphdef, state, x, side, i)
        before = after = float(relative_mse(yq, y))
        prefix = f"layers/{i}/"
        tun = Tunable.of(state, choose, prefix=prefix)
        lat = recode.latents(state, choose, prefix) if tune.recode_lr else {}
        steps, values, recoded = 0, {}, None
        rng = np.random.default_rng((tune.seed, i))  # per block: a resumed conversion draws the same
        if tun.base:
            t = (tun.zeros(), {p: jnp.zeros_like(u0) for p, (u0, _) in lat.items()})
            opt_state = self.step.opt.init(t)
            while steps < tune.steps and time.perf_counter() < deadline:
                idx = np.sort(rng.choice(len(x), min(tune.batch, len(x)), replace=False))
                t, opt_state, loss = self.step(t, opt_state, *tun.args, lat, x[idx], take_rows(side, idx), y[idx],
                                               np.int32(i), treedef=tun.treedef, graphdef=graphdef)
                jax.block_until_ready(loss)
                steps += 1
            if steps:
                state, values = tun.tree(t[0]), tun.stored(t[0])
                if lat:
                    state, codes, recoded = recode.harden(state, lat, t[1])
                    values.update({(prefix + p, "codes"): c for p, c in codes.items()})
                yq, side_q = self.run(graphdef, state, x, side, i)
                after = float(relative_mse(yq, y))
        return BlockResult(state, yq, side_q, before, after, steps, {p for p, _ in tun.names.values()}, values,
                           recoded)


def _block_step(model, opt: optax.GradientTransformation, dots: str):
    """One jitted Adam step on a block's offsets ``(fields, latents)`` against the float block's
    output (weight dots on ``dots`` operands; ``lat``: :func:`cqjax.passes.recode.latents`)."""

    @functools.partial(jax.jit, static_argnames=("treedef", "graphdef"))
    def step(t, opt_state, frozen, base, mult, scale, lat, x, side, y, i, *, treedef, graphdef):
        def loss(t):
            tree = recode.relax(assemble(treedef, frozen, base, mult, scale, t[0]), lat, t[1])
            return relative_mse(model.block(i, x, side, layer=nnx.merge(graphdef, tree))[0], y)

        with backend.use_dot_dtype(dots):  # read while tracing
            value, grads = jax.value_and_grad(loss)(t)
        updates, opt_state = opt.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, value

    step.opt = opt
    return step


class _Chain:
    """The end-to-end stage's objective and its gradient, block by block.

    The quantized model runs as its parts (``embed``, each block, the final norm and the head),
    each jitted alone: one compile per block structure. The gradient of the top-k KL comes back
    from the head through one block at a time, each block's forward recomputed inside its
    vector-Jacobian product from its saved input ``(x, side)``; float side inputs (Gemma 4's
    per-layer inputs and shared keys and values) carry their cotangents along with ``x``. So
    the stage holds one block's intermediates at a time and compiles in seconds, where one
    jitted step over the whole model held every block's and compiled for minutes (8.4 GB
    resident for a 135M model, mostly XLA's compile). The offsets ``t`` are ``{"outer": the
    tensors outside the blocks, "blocks": [one per block]}``; one Adam state and one
    global-norm clip span them all, as in a step over the whole model.
    """

    def __init__(self, qmodel, choose, opt: optax.GradientTransformation, dots: str = "float32"):
        self.graphdef, state = nnx.split(qmodel)
        self.outer = Tunable.of(state, lambda p, f: not p.startswith("layers/") and choose(p, f))
        self.blocks = [(g, Tunable.of(s, choose, prefix=f"layers/{i}/"))
                       for i, (g, s) in enumerate(nnx.split(layer) for layer in qmodel.layers)]
        self.opt = opt
        self._train = _chain_functions(qmodel, opt, dots)  # the gradient steps
        self._eval = _chain_functions(qmodel, opt, "float32") if dots != "float32" else self._train  # the KL

    @property
    def empty(self) -> bool:
        return not self.outer.base and not any(tun.base for _, tun in self.blocks)

    def zeros(self) -> dict:
        return {"outer": self.outer.zeros(), "blocks": [tun.zeros() for _, tun in self.blocks]}

    def _parts(self, tree) -> list:
        """``[(Tunable, its part of tree)]`` for a tree shaped like the offsets."""
        return [(self.outer, tree["outer"])] + [(tun, part) for (_, tun), part in zip(self.blocks, tree["blocks"])]

    def stored(self, t) -> dict:
        """``{(IR path, field): float32 array}`` of the tuned leaves at offsets ``t``."""
        return {k: v for tun, part in self._parts(t) for k, v in tun.stored(part).items()}

    def named(self, tree) -> dict:
        """``{(IR path, field): array}`` of a tree shaped like the offsets (a gradient)."""
        return {tun.names[k]: np.asarray(v) for tun, part in self._parts(tree) for k, v in part.items()}

    @property
    def _outer(self) -> dict:
        """The static arguments of the functions that run the whole model's outer tensors."""
        return {"graphdef": self.graphdef, "treedef": self.outer.treedef}

    def forward(self, f, t, tokens, mask, keep: bool):
        """``(x, side, inputs)``: the last block's output and (``keep``) every block's input,
        by the functions ``f`` (:attr:`_train` or :attr:`_eval`)."""
        x, side = f.embed(t["outer"], *self.outer.args, tokens, mask, **self._outer)
        inputs = []
        for i, (g, tun) in enumerate(self.blocks):
            if keep:
                inputs.append((x, side))
            x, side = f.block(t["blocks"][i], *tun.args, x, side, np.int32(i), graphdef=g, treedef=tun.treedef)
        return x, side, inputs

    def grad(self, t, tokens, mask, top, ids, rest) -> dict:
        """The gradient of the mean top-k KL of ``tokens`` (a batch of rows) at offsets ``t``."""
        f = self._train
        x, side, inputs = self.forward(f, t, tokens, mask, keep=True)
        g_outer, g_x = f.head_grad(t["outer"], *self.outer.args, x, top, ids, rest, mask, **self._outer)
        ct = (g_x, jax.tree.map(jnp.zeros_like, _floats(side)[0]))
        g_blocks = [None] * len(self.blocks)
        for i in reversed(range(len(self.blocks))):
            g, tun = self.blocks[i]
            g_blocks[i], *ct = f.block_vjp(t["blocks"][i], *tun.args, *inputs[i], ct, np.int32(i),
                                           graphdef=g, treedef=tun.treedef)
            ct = tuple(ct)
        g_outer = f.embed_vjp(t["outer"], *self.outer.args, tokens, mask, ct, g_outer, **self._outer)
        return {"outer": g_outer, "blocks": g_blocks}

    def step(self, t, opt_state, tokens, mask, top, ids, rest):
        """One Adam step on the KL of ``tokens``: ``(t, opt_state)``."""
        return self._train.apply(self.grad(t, tokens, mask, top, ids, rest), opt_state, t)

    def kl(self, t, tokens, top, ids, rest) -> float:
        """The mean top-k KL over all rows (a few rows at a time)."""
        total = 0.0
        for c in chunks(len(tokens)):
            mask = np.ones(tokens[c].shape, bool)
            x, _, _ = self.forward(self._eval, t, tokens[c], mask, keep=False)
            total += float(self._eval.head_kl(t["outer"], *self.outer.args, x, top[c], ids[c], rest[c], mask,
                                             **self._outer)) * (c.stop - c.start)
        return total / len(tokens)


def _floats(tree):
    """``(float leaves, the rest, treedef)`` of a pytree, each list with None in the other's
    places (a None is an empty subtree: differentiation and tree maps skip it)."""
    leaves, treedef = jax.tree.flatten(tree)
    is_float = [jnp.issubdtype(a.dtype, jnp.floating) for a in leaves]
    return ([a if f else None for a, f in zip(leaves, is_float)],
            [None if f else a for a, f in zip(leaves, is_float)], treedef)


def _joined(floats, rest, treedef):
    return jax.tree.unflatten(treedef, [a if a is not None else b for a, b in zip(floats, rest)])


def _chain_functions(model, opt, dots: str):
    """The jitted parts of :class:`_Chain` for ``model`` (its ``block`` method; ``graphdef``
    and ``treedef`` static, the block index traced), weight dots on ``dots`` operands."""

    def static(fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with backend.use_dot_dtype(dots):  # read while tracing
                return fn(*args, **kwargs)

        return jax.jit(traced, static_argnames=("graphdef", "treedef"))

    def merged(t, frozen, base, mult, scale, graphdef, treedef):
        return nnx.merge(graphdef, assemble(treedef, frozen, base, mult, scale, t))

    @static
    def embed(t, frozen, base, mult, scale, tokens, mask, *, graphdef, treedef):
        return merged(t, frozen, base, mult, scale, graphdef, treedef).embed(tokens, mask)

    @static
    def embed_vjp(t, frozen, base, mult, scale, tokens, mask, ct, g_head, *, graphdef, treedef):
        def f(t):
            x, side = merged(t, frozen, base, mult, scale, graphdef, treedef).embed(tokens, mask)
            return x, _floats(side)[0]

        g = jax.vjp(f, t)[1](ct)[0]
        return jax.tree.map(jnp.add, g, g_head)

    def run_block(t, frozen, base, mult, scale, x, side, i, graphdef, treedef):
        return model.block(i, x, side, layer=merged(t, frozen, base, mult, scale, graphdef, treedef))[:2]

    @static
    def block(t, frozen, base, mult, scale, x, side, i, *, graphdef, treedef):
        return run_block(t, frozen, base, mult, scale, x, side, i, graphdef, treedef)

    @static
    def block_vjp(t, frozen, base, mult, scale, x, side, ct, i, *, graphdef, treedef):
        """``(g_t, g_x, g_side_floats)`` from the cotangent of the block's ``(x, side floats)``."""
        side_f, side_rest, side_def = _floats(side)

        def f(t, x, side_f):
            y, out = run_block(t, frozen, base, mult, scale, x, _joined(side_f, side_rest, side_def), i,
                               graphdef, treedef)
            return y, _floats(out)[0]

        return jax.vjp(f, t, x, side_f)[1](ct)

    def kl(t, frozen, base, mult, scale, x, top, ids, rest, mask, graphdef, treedef):
        m = merged(t, frozen, base, mult, scale, graphdef, treedef)
        return topk_kl(m.logits(m.norm(x)), top, ids, rest, mask)

    @static
    def head_kl(t, frozen, base, mult, scale, x, top, ids, rest, mask, *, graphdef, treedef):
        return kl(t, frozen, base, mult, scale, x, top, ids, rest, mask, graphdef, treedef)

    @static
    def head_grad(t, frozen, base, mult, scale, x, top, ids, rest, mask, *, graphdef, treedef):
        return jax.grad(kl, argnums=(0, 5))(t, frozen, base, mult, scale, x, top, ids, rest, mask, graphdef, treedef)

    @jax.jit
    def apply(grads, opt_state, t):
        updates, opt_state = opt.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state

    return types.SimpleNamespace(embed=embed, embed_vjp=embed_vjp, block=block, block_vjp=block_vjp,
                                 head_kl=head_kl, head_grad=head_grad, apply=apply)


def _teacher(fmodel, tokens, k: int):
    """The float model's top-``k`` log-probabilities, ids and rest mass on every row."""
    g, state = nnx.split(fmodel)
    run = jax.jit(lambda state, tok: teacher_topk(nnx.merge(g, state)(tok), k))
    parts = [run(state, jnp.asarray(tokens[c])) for c in chunks(len(tokens))]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3))


def seedless(ir: IR) -> IR:
    """``ir`` with its CQ leaves' seeds zeroed: seeds only record how rotations were drawn, and
    blocks of one shape then share one compile."""
    return ir.replace(params={p: v.replace(seed=0) for p, v in ir.params.items() if isinstance(v, CQArray)})


def seedless_leaf(leaf):
    """One leaf as :func:`seedless` and ``hf.to_model`` give it to tuning: a CQ leaf with its
    seed zeroed, a float array as float32, anything else as it is."""
    if isinstance(leaf, CQArray):
        return leaf.replace(seed=0)
    if isinstance(leaf, (np.ndarray, jax.Array)) and jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.asarray(leaf, jnp.float32)
    return leaf


def tuned_leaf(leaf, changes: dict):
    """``leaf`` with the tuned ``{field (None for a float parameter): float32 array}``: a
    quantized leaf's fields back in their stored dtypes (fp16), a float parameter as float32."""
    if is_quantized(leaf):
        return leaf.replace(**{f: jnp.asarray(v, getattr(leaf, f).dtype) for f, v in changes.items()})
    return np.asarray(changes[None], np.float32)


def tune_record(meta, **record):
    """``meta`` with ``record`` merged into ``info["tune"]``."""
    return meta.replace(info={**meta.info, "tune": {**meta.info.get("tune", {}), **record}})


def by_path(values: dict) -> dict[str, dict]:
    """``{(path, field): value}`` grouped as ``{path: {field: value}}``."""
    out: dict[str, dict] = {}
    for (path, field), value in values.items():
        out.setdefault(path, {})[field] = value
    return out


def _write_back(ir: IR, tuned: dict, report: Report) -> IR:
    """``ir`` with the tuned values in place (:func:`tuned_leaf`) and ``meta.info["tune"]`` on
    every tuned tensor."""
    params, meta = {}, {}
    for path, changes in by_path(tuned).items():
        params[path] = tuned_leaf(ir.params[path], changes)
        meta[path] = tune_record(ir.meta[path], **report.info.get(path, {}), kl=report.kl)
    return ir.replace(params=params, meta=meta)
