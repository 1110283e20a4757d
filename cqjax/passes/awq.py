"""Activation-aware per-input-channel scales (AWQ-style) around any quantization recipe.

:class:`ActivationScale` wraps the downstream recipe (the CQ chain, the RTN baseline, or their
error-feedback variants). For each linear kernel ``W [K, N]`` (the IR stores kernels
``[in, out]``) with a calibration Hessian ``H = E[x xᵀ]`` (``ctx.calibration[path]["hessian"]``,
unrotated basis) it quantizes ``diag(s)·W`` with the recipe, where

    ``s_k = mean(x_k²)^(α/2) = H_kk^(α/2)``, normalized to geometric mean 1, stored as fp16,

and picks ``α`` per tensor from ``linspace(0, 1, grid)`` (``α = 0``: no scaling, the plain
recipe's leaf bit for bit) to minimize the relative output error of the leaf the model will run

    ``tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)``,  ``ΔW = W − Ŵ``,  ``Ŵ = diag(1/s)·Q(diag(s)·W)``.

The chosen ``s`` is stored in the quantized leaf as ``in_scale`` (fp16 ``[K]``, counted in its
stored bytes); the runtime divides the activation by it before the rotation
(:mod:`cqjax.kernels.qarrays`). No float copy of a weight is kept and no graph knowledge is
needed (nothing is folded into a norm). The recipe sees the scaled problem consistently: its
Hessian is ``diag(1/s) H diag(1/s)`` (the scaled weight's input is ``x / s``), so
``ErrorFeedbackPack`` / ``GPTQRoundToNearest`` inside it feed back in the right basis.

Tensors without a Hessian (embeddings, tied tables, missing stats) get the recipe's plain leaf;
one ``ctx.log`` line names them. ``meta.info`` gets ``awq_alpha`` and, when searched,
``awq_rel_error`` (chosen) and ``awq_rel_error_plain`` (``α = 0``).

Cost: the recipe runs once on the whole IR, then ``grid − 1`` more times per scaled tensor (one
tensor at a time, so memory stays at one tensor's copies). Passes inside the recipe that decide
jointly over tensors (``AllocateBits``) must run before the ActivationScale step.

Python::

    recipe = ActivationScale(recipe=recipes.recipe("cq", bits=3))   # or "rtn", "cq-ef", ...
    qir, _ = pipeline.run(recipe, ir, Context(calibration=stats))

Hydra: ``+pipeline.awq._target_=cqjax.passes.awq.ActivationScale`` adds the step last; the
pipeline builder then calls :func:`compose`, which makes it wrap the other steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cqjax import select
from cqjax.ir import IR, KERNEL_ROLES, LazyTensor, materialize
from cqjax.kernels.qarrays import is_quantized
from cqjax.passes.common import calibration_hessian
from cqjax.pipeline import Chain, Context, Needs, Pass, PassLike, named_chain, sub_ir
from cqjax.pipeline import steps as flat_steps
from cqjax.progress import Progress
from cqjax.quant_stats import dequantizer

#: ``|log2 s|`` is clipped to this (fp16 holds the scale and the scaled weights' norms).
MAX_LOG2_SCALE = 12.0


def channel_scales(H: np.ndarray, alpha: float) -> np.ndarray:
    """fp16 ``[K]`` scales ``H_kk^(α/2)``, geometric mean 1 over the live channels (``H_kk > 0``).

    Dead channels get 1; ``|log2 s|`` is clipped to :data:`MAX_LOG2_SCALE`.
    """
    d = np.diag(np.asarray(H, np.float64))
    s = np.ones(d.shape[0])
    live = d > 0
    if alpha != 0 and live.any():
        logs = 0.5 * alpha * np.log2(d[live])
        s[live] = np.exp2(np.clip(logs - logs.mean(), -MAX_LOG2_SCALE, MAX_LOG2_SCALE))
    return s.astype(np.float16)


def output_error(w: np.ndarray, w_hat: np.ndarray, H: np.ndarray, base: float | None = None) -> float:
    """``tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)`` for kernels ``[K, N]`` (float64); ``base`` is the
    denominator if already known."""
    w = np.asarray(w, np.float64)
    d = w - np.asarray(w_hat, np.float64)
    num = float(np.sum(d * (H @ d)))
    den = float(np.sum(w * (H @ w))) if base is None else base
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def scaled_entry(entry: Mapping[str, Any], s: np.ndarray) -> dict:
    """The calibration entry of ``diag(s)·W``: ``H / (s sᵀ)`` and a ``[K, ...]`` Fisher ``/ s²``."""
    sf = s.astype(np.float64)
    out = dict(entry)
    out["hessian"] = np.asarray(entry["hessian"], np.float64) / np.outer(sf, sf)
    fisher = entry.get("fisher")
    if fisher is not None and np.ndim(fisher) == 2 and np.shape(fisher)[0] == sf.shape[0]:
        out["fisher"] = np.asarray(fisher, np.float64) / (sf * sf)[:, None]
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationScale(Pass):
    """Per-input-channel activation-aware scales chosen through the downstream recipe.

    Attributes:
      alpha: a fixed exponent for every tensor (``0``: the plain recipe); None searches.
      grid: number of exponents in ``[0, 1]`` searched per tensor (``>= 2``).
      recipe: the quantizing pass or chain to wrap (None: set by :func:`compose` / :meth:`around`).
      where: the tensors to scale (default: linear and LM-head kernels); the recipe itself
        runs on everything it selects.
    """

    name = "awq"
    default_where = select.All(select.Any(*(f"role:{r}" for r in KERNEL_ROLES)),
                               lambda path, meta: len(meta.shape) == 2)
    alpha: float | None = None
    grid: int = 11
    recipe: Any = None

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"{self.name}.alpha={self.alpha!r}: must be in [0, 1] or null (search)")
        if self.alpha is None and not (isinstance(self.grid, int) and self.grid >= 2):
            raise ValueError(f"{self.name}.grid={self.grid!r}: must be an int >= 2")

    #: :meth:`rewrite` converts one leaf (the recipe on it, then its search), so a
    #: block-by-block conversion (:func:`cqjax.stream_calibrated.plan`) can run this step.
    leafwise = True

    @property
    def filter(self) -> Any:
        """What the step rewrites: every path a step of the wrapped recipe selects (before a
        recipe is set: the kernels to scale)."""
        if self.recipe is None:
            return self.scaled
        return select.Any(*(select.to_predicate(getattr(p, "filter", True)) for _, p in flat_steps(self.recipe)))

    @property
    def scaled(self) -> Any:
        """The filter of the kernels whose input channels are scaled (``where``)."""
        return self.default_where if self.where is None else self.where

    @property
    def alphas(self) -> tuple[float, ...]:
        if self.alpha is not None:
            return (float(self.alpha),)
        return tuple(float(a) for a in np.linspace(0.0, 1.0, self.grid))

    @property
    def may_change(self) -> frozenset[str]:  # type: ignore[override]
        return self._recipe().may_change if self.recipe is not None else frozenset()

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        """Calibration Hessians, plus what the wrapped recipe reads."""
        own = Needs(statistics={"hessian"})
        return own | self.recipe.needs if self.recipe is not None else own

    def around(self, recipe: Any) -> ActivationScale:
        """This pass wrapping ``recipe``."""
        return dataclasses.replace(self, recipe=recipe)

    def selected(self, ir: IR) -> list[str]:
        inner = self.recipe.selected(ir) if self.recipe is not None else None
        return list(ir.params) if inner is None else inner

    def rewrite(self, path: str, leaf: Any, meta: Any, ctx: Context) -> tuple[Any, Any]:
        """One leaf through the wrapped recipe and, for a kernel to scale, the exponent search."""
        one = IR(family="", config=None, params={path: leaf}, meta={path: meta})
        out = self(one, ctx.replace(progress=False))
        return out.params[path], out.meta[path]

    def _recipe(self) -> Any:
        if self.recipe is None:
            raise ValueError(f"pass {self.name!r} has no recipe to wrap: use ActivationScale(recipe=...), "
                             ".around(chain), or cqjax.passes.awq.compose(steps) in the pipeline builder")
        return self.recipe

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        recipe = self._recipe()
        base = recipe(ir, ctx)
        paths, plain = [], []
        for path in select.select(ir, self.scaled):
            leaf, meta = base.params.get(path), ir.meta[path]
            if not is_quantized(leaf):
                if not isinstance(leaf, (np.ndarray, jax.Array, LazyTensor)):
                    raise ValueError(f"{self.name}: the recipe left {path} as a {type(leaf).__name__}, not a "
                                     "quantized leaf; wrap a complete quantization recipe")
                continue  # kept float by the recipe
            if not leaf.transposed or leaf.K != meta.shape[0]:
                continue  # a table
            if leaf.in_scale is not None:
                raise ValueError(f"{self.name}: {path} already has an in_scale (two ActivationScale steps?)")
            H = calibration_hessian(ctx, path, meta.shape[0])
            (plain if H is None else paths).append(path)
        if plain:
            ctx.log(f"{self.name}: no calibration Hessian for {len(plain)} of {len(plain) + len(paths)} kernels "
                    f"({', '.join(plain[:4])}{', ...' if len(plain) > 4 else ''}): plain recipe")
        if self.alpha == 0 or not paths:
            return base.replace(meta={p: _info(base.meta[p], alpha=0.0) for p in paths})
        dequantize = dequantizer()
        params, meta = {}, {}
        bar = Progress(f"pass {ctx.step or self.name}", total=len(paths), unit="tensors", every_s=10.0, tag="cqjax",
                       enabled=ctx.progress)
        quiet = ctx.replace(progress=False)  # the recipe reruns per tensor and exponent
        for path in paths:
            params[path], meta[path] = self._one(path, ir, base, quiet, recipe, dequantize)
            bar.update(1)
        bar.close()
        return base.replace(params=params, meta=meta)

    def _one(self, path: str, ir: IR, base: IR, ctx: Context, recipe: Any, dequantize) -> tuple[Any, Any]:
        """The best ``(leaf, meta)`` of one kernel over the exponents."""
        w = np.asarray(materialize(ir.params[path]), np.float32)
        H = calibration_hessian(ctx, path, w.shape[0])
        search = self.alpha is None
        if search:
            den = float(np.sum(w.astype(np.float64) * (H @ w.astype(np.float64))))
            err0 = output_error(w, dequantize(base.params[path]), H, den)
        best = (0.0, base.params[path], base.meta[path], err0 if search else None)
        one = sub_ir(ir, [path])
        for alpha in self.alphas:
            if alpha == 0:
                continue
            s = channel_scales(H, alpha)
            if np.all(s == 1):
                continue
            scaled = one.replace(params={path: s.astype(np.float32)[:, None] * w})
            sctx = ctx.replace(calibration={**ctx.calibration, path: scaled_entry(ctx.calibration[path], s)})
            out = recipe(scaled, sctx)
            leaf = out.params[path]
            if not is_quantized(leaf):
                raise ValueError(f"{self.name}: the recipe left {path} as a {type(leaf).__name__}, not a "
                                 "quantized leaf; wrap a complete quantization recipe")
            leaf = leaf.replace(in_scale=jnp.asarray(s))
            err = output_error(w, dequantize(leaf), H, den) if search else None
            if not search or err < best[3]:
                best = (alpha, leaf, out.meta[path], err)
        alpha, leaf, m, err = best
        extra = {"awq_rel_error": err, "awq_rel_error_plain": err0} if search else {}
        return leaf, _info(m, alpha=alpha, **extra)


def _info(meta, alpha: float, **extra):
    return meta.replace(info={**meta.info, "awq_alpha": alpha, **extra})


def compose(steps: Chain | Sequence[tuple[str, PassLike]]) -> Chain:
    """Pipeline steps with an :class:`ActivationScale` step (without a recipe) made to wrap the
    quantizing steps, for config-built pipelines where the step is added last
    (``+pipeline.awq._target_=cqjax.passes.awq.ActivationScale``).

    It wraps the steps after it, or (when it is last) the steps before it; steps that need
    the float reference (tuning, which runs after quantization) are never wrapped and stay
    after it; steps before it that it does not wrap (e.g. a bit allocation) run first. Steps
    are returned unchanged when there is no such step.
    """
    steps = list(steps.steps if isinstance(steps, Chain) else steps)
    at = [i for i, (_, p) in enumerate(steps) if isinstance(p, ActivationScale) and p.recipe is None]
    if not at:
        return named_chain(*steps)
    if len(at) > 1:
        raise ValueError(f"pipeline has {len(at)} ActivationScale steps ({[steps[i][0] for i in at]}); use one")
    i = at[0]
    name, p = steps[i]
    before, after = (steps[:i], steps[i + 1:]) if i < len(steps) - 1 else ([], steps[:i])
    wrap = [(n, q) for n, q in after if not q.needs.reference]
    late = [(n, q) for n, q in after if q.needs.reference]
    if not wrap:
        raise ValueError(f"pipeline step {name!r} ({p.name}) has no quantization steps to wrap")
    return named_chain(*before, (name, p.around(named_chain(*wrap))), *late)
