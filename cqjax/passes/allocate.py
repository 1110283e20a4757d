"""Sensitivity-driven mixed precision: choose each tensor's bit width to meet a size budget.

:class:`AllocateBits` is an analysis pass: it runs first (on the float IR), leaves every leaf as
it is and writes ``meta.info["allocated_bits"]``, which the quantizing passes
(:class:`~cqjax.passes.cq.FitCodebook`, :class:`~cqjax.passes.rtn.RoundToNearest`) honour
before their own rules. For every eligible tensor ``t`` and candidate width ``b`` it quantizes
the tensor alone with ``recipe`` — the pipeline's own quantizing steps, custom passes and
options included — so sizes and errors are exact, not modelled: after the pipeline runs, each
tensor's relative error equals the ``predicted_rel_error`` recorded for its chosen width (the
recipe is per tensor and deterministic; steps after it, such as tuning, are outside this). It
measures

==============  ===================================================================================
proxy           estimated damage ``d_t(b)`` of quantizing ``t`` alone at ``b`` bits
==============  ===================================================================================
``fisher``      ``½ Σ F ⊙ (W − Ŵ_b)²`` with ``F`` the diagonal Fisher of the float model
                (``calibration[path]["fisher"]``): a second-order estimate of the KL it causes.
                A gathered table with ``counts``: each row's ``F`` plus the mean Fisher of one
                occurrence (add-one smoothing: rows unseen in calibration still count)
``hessian``     ``tr((W − Ŵ_b)ᵀ H (W − Ŵ_b)) / tr(Wᵀ H W)``: relative output error of the layer
                on calibration inputs (``calibration[path]["hessian"]``); every layer weighs the same.
                A gathered table (one-hot inputs): ``H = diag(p)``, ``p`` its add-one smoothed token
                counts (``calibration[path]["counts"]``)
``weight``      ``‖W − Ŵ_b‖² / ‖W‖²`` (data-free)
==============  ===================================================================================

and solves the multiple-choice knapsack ``min Σ d_t(b_t)`` s.t. ``Σ bytes_t(b_t) ≤ budget``
exactly by dynamic programming over the budget (:func:`solve`). The budget is a target stored bits/weight over the eligible
tensors (the definition of :mod:`cqjax.quant_stats`) or a byte count; tensors matched by
``fixed`` rules (role bundles: ``{"role:embedding": 4}``) keep their width and their bytes
count against the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cqjax.ir import IR, materialize
from cqjax.pipeline import Context, Needs, Pass, PassLike, sub_ir
from cqjax.progress import Progress
from cqjax.quant_stats import ELIGIBLE, dequantizer, rel_error, tensor_bytes
from cqjax.select import Rules

PROXIES = ("fisher", "hessian", "weight")


def damage(proxy: str, w: np.ndarray, w_hat: np.ndarray, stats: Mapping[str, Any] | None, path: str) -> float:
    """``d_t(b)`` of one tensor for ``proxy`` (see the module table); ``w`` as stored in the IR."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    if proxy == "weight":
        return float(np.sum(d * d) / max(np.sum(np.square(w, dtype=np.float64)), 1e-30))
    if proxy == "hessian" and stats is not None and "hessian" not in stats and "counts" in stats:
        # A gathered table: its input is one-hot, E[x xᵀ] = diag(p) with p the token frequencies
        # (add-one smoothed: ids unseen in calibration still count).
        p = np.asarray(stats["counts"], np.float64) + 1.0
        wf = np.asarray(w, np.float64)
        return float(np.sum(p[:, None] * d * d) / max(np.sum(p[:, None] * wf * wf), 1e-30))
    if stats is None or proxy not in ("fisher", "hessian") or (proxy == "fisher" and "fisher" not in stats) \
            or (proxy == "hessian" and "hessian" not in stats):
        raise KeyError(f"{path}: proxy {proxy!r} needs calibration[{path!r}][{proxy!r}] "
                       "(run calibration with it, or use proxy='weight')")
    if proxy == "fisher":
        F = np.asarray(stats["fisher"], np.float64)
        counts = stats.get("counts")
        if counts is not None and F.ndim == 2 and len(counts) == F.shape[0]:
            # A gathered table: rows the calibration never read have no gradient, yet other text
            # reads them. Every row gets one more occurrence at the mean Fisher per occurrence
            # (add-one smoothing, as the hessian proxy's counts).
            F = F + F.sum(axis=0) / max(float(np.sum(counts)), 1.0)
        return float(0.5 * np.sum(F * d * d))
    H = np.asarray(stats["hessian"], np.float64)
    wf = np.asarray(w, np.float64)
    if H.shape[0] != wf.shape[0]:  # a tied table [V, D] used as a head: rows are outputs
        wf, d = wf.T, d.T
    # tr(Dᵀ H D) as sum(D ⊙ H D): one BLAS matmul (a 3-operand einsum loops in C: ~30x slower)
    return float(np.sum(d * (H @ d)) / max(np.sum(wf * (H @ wf)), 1e-30))


def solve(costs: Mapping[str, Mapping[int, tuple[float, int]]], budget: int, *,
          resolution: int = 200_000) -> dict[str, int]:
    """Multiple-choice knapsack: ``{path: bits}`` minimizing total damage with bytes ≤ ``budget``.

    Dynamic programming over the budget in ``budget / resolution``-byte units (each choice's
    size rounded up, so the result always fits), exact up to that rounding; then greedy
    upgrades by damage saved per byte spend what the rounding left over.

    Args:
      costs: ``{path: {bits: (damage, bytes)}}``.
      budget: the byte budget for these tensors.
      resolution: budget units of the dynamic program.

    Raises:
      ValueError: even the smallest choice of every tensor exceeds the budget.
    """
    paths = list(costs)
    floor = sum(min(nb for _, nb in costs[p].values()) for p in paths)
    if floor > budget:
        raise ValueError(f"budget {budget:,} bytes is below the smallest choice of every tensor ({floor:,} bytes)")
    unit = max(1, -(-budget // resolution))
    C = budget // unit
    dp = np.zeros(C + 1)  # least damage of the tensors so far within c units
    picks = np.zeros((len(paths), C + 1), np.int8)
    options = [sorted(costs[p]) for p in paths]
    for i, p in enumerate(paths):
        new = np.full(C + 1, np.inf)
        for j, b in enumerate(options[i]):
            d, nb = costs[p][b]
            w = -(-nb // unit)
            if w > C:
                continue
            cand = np.full(C + 1, np.inf)
            cand[w:] = dp[:C + 1 - w] + d
            better = cand < new
            new[better], picks[i, better] = cand[better], j
        dp = new
    c = int(np.argmin(dp))
    choice = {}
    for i in range(len(paths) - 1, -1, -1):
        b = options[i][picks[i, c]]
        choice[paths[i]] = b
        c -= -(-costs[paths[i]][b][1] // unit)
    left = budget - sum(costs[p][b][1] for p, b in choice.items())
    while True:  # spend the rounding slack
        best, best_gain = None, 0.0
        for p in paths:
            d0, b0 = costs[p][choice[p]]
            for b, (d, nb) in costs[p].items():
                if d < d0 and nb - b0 <= left and (d0 - d) / max(nb - b0, 1e-9) > best_gain:
                    best, best_gain = (p, b, nb - b0), (d0 - d) / max(nb - b0, 1e-9)
        if best is None:
            return choice
        p, b, extra = best
        choice[p] = b
        left -= extra


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocateBits(Pass):
    """Writes ``meta.info["allocated_bits"]`` for the eligible tensors (see the module docstring).

    Attributes:
      recipe: the quantizing steps that follow (a pass or chain whose passes honour
        ``allocated_bits``); each tensor is measured by running it on that tensor alone.
      bpw: target stored bits/weight over the eligible tensors (or give ``budget_bytes``).
      budget_bytes: target stored bytes of the eligible tensors.
      choices: candidate widths.
      fixed: rules (``{filter: bits}``) for tensors that are not allocated, e.g. role bundles.
      proxy: ``fisher`` | ``hessian`` | ``weight``.
      random_seed: if set, ignore sensitivities and promote a random set of tensors from the
        smallest choice instead (the baseline an allocator must beat).

    ``meta.info`` gets ``allocated_bits``, ``allocation`` (the proxy or ``"random"``) and
    ``predicted_rel_error`` (``‖W − Ŵ‖² / ‖W‖²`` of the recipe at that width), fixed tensors too.
    """

    name = "allocate"
    default_where = ELIGIBLE
    recipe: PassLike | None = None
    bpw: float | None = None
    budget_bytes: int | None = None
    choices: Sequence[int] = (2, 3, 4)
    fixed: Any = None
    proxy: str = "fisher"
    random_seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.recipe is None:
            raise ValueError("allocate: give the recipe it measures (recipe=the quantizing steps that follow)")
        if (self.bpw is None) == (self.budget_bytes is None):
            raise ValueError("allocate: give exactly one of bpw and budget_bytes")
        if self.proxy not in PROXIES:
            raise ValueError(f"allocate.proxy={self.proxy!r}; allowed: {PROXIES}")
        object.__setattr__(self, "choices", tuple(sorted(int(b) for b in self.choices)))
        object.__setattr__(self, "fixed", Rules.of(self.fixed) if self.fixed else None)

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        """The calibration statistic the proxy reads (none for ``weight`` or random promotion),
        plus what the measured recipe reads."""
        own = frozenset() if self.random_seed is not None or self.proxy == "weight" else frozenset({self.proxy})
        return Needs(statistics=own) | self.recipe.needs

    def quantize(self, ir: IR, path: str, bits: int, ctx: Context) -> Any:
        """The leaf ``recipe`` gives ``path`` at ``bits`` (the tensor quantized alone)."""
        meta = ir.meta[path]
        one = sub_ir(ir, [path]).replace(meta={path: meta.replace(info={**meta.info, "allocated_bits": int(bits)})})
        return self.recipe(one, ctx).params[path]

    def measure(self, ir: IR, ctx: Context, widths: Mapping[str, Sequence[int]], *,
                sizes_only: bool = False, progress: bool | None = None) -> dict[str, dict[int, Cost]]:
        """``{path: {bits: Cost}}`` by quantizing each tensor alone at each of its widths
        (damage 0 with ``sizes_only``; a progress line if ``progress``, default ``ctx.progress``)."""
        costs: dict[str, dict[int, Cost]] = {}
        dequantize = dequantizer()
        quiet = ctx.replace(progress=False)
        bar = Progress(f"allocate ({'sizes' if sizes_only else self.proxy})", total=len(widths), unit="tensors",
                       every_s=10.0, tag="cqjax", enabled=ctx.progress if progress is None else progress)
        for path, bits in widths.items():
            w = np.asarray(materialize(ir.params[path]), np.float32)
            costs[path] = {}
            for b in bits:
                leaf = self.quantize(ir, path, b, quiet)
                w_hat = np.asarray(dequantize(leaf))
                d = 0.0 if sizes_only else damage(self.proxy, w, w_hat, ctx.calibration.get(path), path)
                costs[path][b] = Cost(d, tensor_bytes(leaf, w.size), rel_error(w, w_hat))
            bar.update(1)
        bar.close()
        return costs

    def plan(self, ir: IR, ctx: Context | None = None) -> Plan:
        """Measures what :meth:`choose` needs: the costs of every free tensor at every choice and
        those of the fixed ones at their width. A plan serves any budget and any subset of
        ``choices`` (``dataclasses.replace(pass, bpw=..., choices=...).choose(plan)``)."""
        ctx = Context() if ctx is None else ctx
        fixed, free, params = self.split(ir)
        fixed_costs = self.measure(ir, ctx, {p: (b,) for p, b in fixed.items()}, sizes_only=True)
        costs = self.measure(ir, ctx, {p: self.choices for p in free}, sizes_only=self.random_seed is not None)
        return Plan(costs=costs, fixed=fixed, fixed_costs={p: c[fixed[p]] for p, c in fixed_costs.items()},
                    params=params)

    def split(self, ir: IR) -> tuple[dict[str, int], list[str], int]:
        """``(fixed, free, params)``: ``{path: bits}`` of the selected tensors that fixed rules
        cover, the paths of the others (allocated), and the parameters of all of them."""
        paths = self.selected(ir)
        fixed = {p: self.fixed.get(p, ir.meta[p]) for p in paths} if self.fixed else {}
        fixed = {p: int(b) for p, b in fixed.items() if b is not None}
        return fixed, [p for p in paths if p not in fixed], sum(int(np.prod(ir.meta[p].shape)) for p in paths)

    def choose(self, plan: Plan) -> dict[str, int]:
        """``{path: bits}`` for every selected tensor: the knapsack (or random promotion) over the
        free tensors' costs restricted to ``choices``, within this pass's budget.

        Raises:
          ValueError: the target is out of reach, in stored bits/weight.
        """
        budget = int(self.budget_bytes if self.budget_bytes is not None else self.bpw * plan.params / 8)
        target = f"bpw={self.bpw:g}" if self.bpw is not None else f"budget_bytes={self.budget_bytes:,}"
        if plan.fixed_bytes >= budget and plan.costs:
            raise ValueError(f"allocate: {target} is out of reach: the tensors with fixed widths alone store "
                             f"{8 * plan.fixed_bytes / plan.params:.3f} bits/weight of the eligible tensors")
        low, _ = self._extreme_bytes(plan)
        if low > budget:
            raise ValueError(f"allocate: {target} is out of reach: with every allocated tensor at "
                             f"{min(self.choices)} bits the eligible tensors store "
                             f"{8 * low / plan.params:.3f} bits/weight")
        budget -= plan.fixed_bytes
        costs = {p: {b: c[b][:2] for b in self.choices} for p, c in plan.costs.items()}
        if self.random_seed is not None:
            choice = random_promotion(costs, budget, self.random_seed)
        else:
            choice = solve(costs, budget)
        return {**choice, **plan.fixed}

    def reach(self, plan: Plan) -> tuple[float, float]:
        """The stored bits/weight of the eligible tensors with every allocated tensor at the
        smallest, and at the largest, of ``choices``: the targets :meth:`choose` can meet."""
        return tuple(8 * nb / plan.params for nb in self._extreme_bytes(plan))

    def _extreme_bytes(self, plan: Plan) -> tuple[int, int]:
        """Stored bytes of the eligible tensors at the ends of :meth:`reach`."""
        return tuple(plan.fixed_bytes + sum(f(c[b].bytes for b in self.choices) for c in plan.costs.values())
                     for f in (min, max))

    def apply(self, ir: IR, choice: Mapping[str, int], plan: Plan, ctx: Context | None = None) -> IR:
        """``ir`` with ``meta.info`` ``allocated_bits``, ``allocation`` and ``predicted_rel_error``
        set from ``choice`` and the plan's measurements."""
        how = "random" if self.random_seed is not None else self.proxy
        widths = list(choice.values())
        (Context() if ctx is None else ctx).log(
            f"allocate ({how}): " + ", ".join(f"{widths.count(b)} tensors at {b} bits" for b in sorted(set(widths))))
        meta = {}
        for p, b in choice.items():
            cost = plan.fixed_costs[p] if p in plan.fixed else plan.costs[p][b]
            meta[p] = ir.meta[p].replace(info={**ir.meta[p].info, "allocated_bits": int(b), "allocation": how,
                                               "predicted_rel_error": cost.rel_error})
        return ir.replace(meta=meta)

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        plan = self.plan(ir, ctx)
        return self.apply(ir, self.choose(plan), plan, ctx)


class Cost(NamedTuple):
    """One tensor at one width: the proxy's ``damage``, stored ``bytes``, measured ``rel_error``."""

    damage: float
    bytes: int
    rel_error: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :meth:`AllocateBits.plan` measured (see there).

    Attributes:
      costs: ``{path: {bits: Cost}}`` of the allocated tensors.
      fixed: ``{path: bits}`` of the tensors that fixed rules cover.
      fixed_costs: ``{path: Cost}`` of those at their width (damage not measured: 0).
      params: parameters of all selected tensors (the bits/weight denominator).
    """

    costs: Mapping[str, Mapping[int, Cost]]
    fixed: Mapping[str, int]
    fixed_costs: Mapping[str, Cost]
    params: int

    @property
    def fixed_bytes(self) -> int:
        """Stored bytes of the tensors with fixed widths."""
        return sum(c.bytes for c in self.fixed_costs.values())


def random_promotion(costs: Mapping[str, Mapping[int, tuple[float, int]]], budget: int, seed: int) -> dict[str, int]:
    """Every tensor at its smallest width, then tensors in random order promoted one step at a
    time while the budget allows (the baseline an allocator must beat)."""
    rng = np.random.default_rng(seed)
    widths = {p: sorted(c) for p, c in costs.items()}
    choice = {p: w[0] for p, w in widths.items()}
    left = budget - sum(costs[p][b][1] for p, b in choice.items())
    progress = True
    while progress:
        progress = False
        for p in rng.permutation(sorted(costs)):
            w = widths[p]
            i = w.index(choice[p])
            if i + 1 < len(w):
                extra = costs[p][w[i + 1]][1] - costs[p][choice[p]][1]
                if extra <= left:
                    choice[p], left, progress = w[i + 1], left - extra, True
                    break
    return choice
