"""The bit allocator: knapsack optimality, budgets, fixed rules, and what the recipe then stores."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from cqjax import pipeline as pl
from cqjax import quant_stats
from cqjax.passes.allocate import AllocateBits, damage, random_promotion, solve
from cqjax.pipeline import Needs
from cqjax.recipes import recipe

from test_pipeline import make_ir

RECIPES = {m: recipe(m, bits=2, embed_bits=None) for m in ("cq", "rtn")}


def allocator(method="cq", **kw) -> AllocateBits:
    return AllocateBits(recipe=RECIPES[method], **kw)

SPEC = {f"layers/{i}/{n}/kernel": ("linear", (256, 64 if n == "a" else 96)) for i in range(4) for n in ("a", "b")}
SPEC["embed/embedding"] = ("embedding", (64, 128))


def _convex_costs(seed=0, n=6):
    rng = np.random.default_rng(seed)
    costs = {}
    for i in range(n):
        size, sens = int(rng.integers(100, 1000)), float(rng.uniform(0.1, 10))
        costs[f"t{i}"] = {b: (sens * size * 4.0 ** -b, size * b) for b in (2, 3, 4)}
    return costs


def _total(costs, choice):
    return sum(costs[p][b][0] for p, b in choice.items()), sum(costs[p][b][1] for p, b in choice.items())


@pytest.mark.parametrize("seed", range(5))
def test_solver_is_near_brute_force_optimum_and_feasible(seed):
    costs = _convex_costs(seed)
    floor, top = _total(costs, {p: 2 for p in costs})[1], _total(costs, {p: 4 for p in costs})[1]
    budget = (floor + top) // 2
    got_d, got_b = _total(costs, solve(costs, budget))
    best = min(_total(costs, dict(zip(costs, c)))[0] for c in itertools.product((2, 3, 4), repeat=len(costs))
               if _total(costs, dict(zip(costs, c)))[1] <= budget)
    assert got_b <= budget
    assert got_d <= best * (1 + 1e-9)
    rnd_d, rnd_b = _total(costs, random_promotion(costs, budget, seed))
    assert rnd_b <= budget and got_d <= rnd_d


def test_solver_rejects_a_budget_below_the_floor():
    costs = _convex_costs()
    with pytest.raises(ValueError, match="below the smallest choice"):
        solve(costs, 10)


@pytest.mark.parametrize("method", ["cq", "rtn"])
def test_pass_meets_the_bpw_target_and_the_recipe_honours_it(method):
    ir = make_ir(SPEC)
    alloc = allocator(method, bpw=3.0, proxy="weight", fixed={"role:embedding": 4})
    out = alloc(ir)
    bits = {p: out.meta[p].info["allocated_bits"] for p in SPEC}
    assert bits["embed/embedding"] == 4 and set(bits.values()) > {4}  # mixed, embedding fixed
    q, _ = pl.run(RECIPES[method], out, progress=False)
    assert {p: int(q.params[p].bits) for p in SPEC} == bits
    bpw = quant_stats.storage(q)["bits_per_weight"]["quantized_tensors"]
    assert 2.9 < bpw <= 3.0
    # More budget never costs quality (weight proxy = relative error, summed).
    dq = quant_stats.dequantizer()
    err = lambda ir_: sum(quant_stats.rel_error(ir.params[p], dq(ir_.params[p])) for p in SPEC)  # noqa: E731
    q4, _ = pl.run(RECIPES[method], allocator(method, bpw=4.0, proxy="weight")(ir), progress=False)
    assert err(q4) < err(q)


def test_unreachable_targets_are_explained_in_bits_per_weight():
    ir = make_ir(SPEC)
    with pytest.raises(ValueError, match=r"bpw=1\.5 is out of reach: with every allocated tensor at 2 bits .* "
                                         r"store [0-9.]+ bits/weight"):
        allocator(bpw=1.5, choices=(2, 3), proxy="weight")(ir)
    with pytest.raises(ValueError, match=r"bpw=0\.05 is out of reach: the tensors with fixed widths alone"):
        allocator(bpw=0.05, proxy="weight", fixed={"role:embedding": 8})(ir)
    # reach() names the targets choose() can meet: its ends are met exactly, beyond them is refused.
    alloc = allocator(bpw=3, choices=(2, 4), proxy="weight", fixed={"role:embedding": 8})
    plan = alloc.plan(ir)
    low, high = alloc.reach(plan)
    assert low < high
    for bpw, widths in ((low, {2}), (high, {4})):
        choice = dataclasses.replace(alloc, bpw=bpw * (1 + 1e-9)).choose(plan)
        assert {choice[p] for p in plan.costs} == widths and choice["embed/embedding"] == 8
    with pytest.raises(ValueError, match="out of reach"):
        dataclasses.replace(alloc, bpw=low * 0.999).choose(plan)
    assert allocator(bpw=3, proxy="weight").needs == Needs()
    assert allocator(bpw=3, proxy="hessian").needs == Needs(statistics={"hessian"})
    assert allocator(bpw=3, random_seed=1).needs == Needs()
    assert AllocateBits(recipe=recipe("cq-ef"), bpw=3, proxy="weight").needs == Needs(statistics={"hessian"})


def test_random_baseline_and_missing_calibration_are_explicit():
    ir = make_ir(SPEC)
    out = allocator(bpw=2.5, choices=(2, 3), random_seed=0)(ir)
    assert {m.info["allocation"] for m in out.meta.values() if "allocation" in m.info} == {"random"}
    with pytest.raises(KeyError, match="needs calibration"):
        allocator(bpw=3.0, proxy="fisher")(ir)
    with pytest.raises(ValueError, match="exactly one of"):
        allocator()
    with pytest.raises(ValueError, match="give the recipe it measures"):
        AllocateBits(bpw=3.0)


def test_damage_proxies():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5))
    w_hat = w + 0.1 * rng.standard_normal((8, 5))
    assert damage("weight", w, w, None, "p") == 0
    F = np.zeros_like(w)
    F[0] = 1.0
    assert damage("fisher", w, w_hat, {"fisher": F}, "p") == pytest.approx(0.5 * np.sum((w - w_hat)[0] ** 2))
    H = np.eye(8)
    assert damage("hessian", w, w_hat, {"hessian": H}, "p") == pytest.approx(damage("weight", w, w_hat, None, "p"))
    # A gathered table [V, D]: rows weighted by add-one smoothed token counts (one-hot inputs).
    counts = np.zeros(8)
    counts[2] = 1e6
    table = damage("hessian", w, w_hat, {"counts": counts}, "t")
    row2 = np.sum((w - w_hat)[2] ** 2) / np.sum(w[2] ** 2)
    assert table == pytest.approx(row2, rel=1e-3)
    uniform = damage("hessian", w, w_hat, {"counts": np.zeros(8)}, "t")
    assert uniform == pytest.approx(damage("weight", w, w_hat, None, "t"))
    # The Fisher of a gathered table: row 0 was read 4 times, the others never; each row gets
    # one more occurrence at the mean Fisher per occurrence (F[0] / 4 = 0.25 per element).
    counts = np.zeros(8)
    counts[0] = 4
    smoothed = damage("fisher", w, w_hat, {"fisher": F, "counts": counts}, "t")
    assert smoothed == pytest.approx(0.5 * (1.25 * np.sum((w - w_hat)[0] ** 2) + 0.25 * np.sum((w - w_hat)[1:] ** 2)))


def test_one_plan_serves_every_budget_and_choice_subset():
    import dataclasses

    ir = make_ir(SPEC)
    wide = allocator(bpw=3.0, choices=(2, 3, 4), proxy="weight")
    plan = wide.plan(ir)
    for bpw, choices in ((2.5, (2, 3)), (3.5, (2, 3, 4))):
        narrow = dataclasses.replace(wide, bpw=bpw, choices=choices)
        direct = narrow(ir)
        assert narrow.choose(plan) == {p: m.info["allocated_bits"] for p, m in direct.meta.items()
                                      if "allocated_bits" in m.info}


def _shrink_norms(path, leaf, meta):
    """A custom step after packing: every stored norm scaled by 0.9 (changes the error)."""
    return leaf.replace(norms=(leaf.norms.astype("float32") * 0.9).astype(leaf.norms.dtype)), meta


@pytest.mark.parametrize("steps", [None, {"codebook": {"mode": "fitted"}, "pack": {"gain": "ls"}}])
@pytest.mark.parametrize("custom", [False, True])
def test_prediction_equals_the_measured_error_of_the_configured_recipe(steps, custom):
    """The allocator measures the recipe the pipeline runs (options and custom passes included):
    each tensor's error after the pipeline equals the prediction for its width."""
    ir = make_ir(SPEC)
    quantizing = recipe("cq", bits=2, embed_bits=4, steps=steps)
    if custom:
        quantizing = pl.named_chain(*quantizing.steps, ("shrink", pl.as_pass(_shrink_norms, "role:linear")))
    alloc = AllocateBits(recipe=quantizing, bpw=3.2, proxy="weight", fixed={"role:embedding": 4})
    q, _ = pl.run(pl.named_chain(("allocate", alloc), *quantizing.steps), ir, progress=False)
    rows = {r["path"]: r for r in quant_stats.tensors(q, ir)}
    widths = {q.meta[p].info["allocated_bits"] for p in SPEC}
    assert len(widths) > 1 and {q.params[p].bits for p in SPEC} == widths
    for p in SPEC:
        predicted, measured = q.meta[p].info["predicted_rel_error"], rows[p]["rel_error"]
        assert predicted == pytest.approx(measured, rel=1e-6), p
    # The prediction differs from what a default recipe would have predicted for that width.
    plain = AllocateBits(recipe=recipe("cq", bits=2, embed_bits=4), bpw=3.2, proxy="weight",
                         fixed={"role:embedding": 4}).plan(ir)
    p = "layers/0/a/kernel"
    if steps or custom:
        b = q.meta[p].info["allocated_bits"]
        assert plain.costs[p][b].rel_error != pytest.approx(q.meta[p].info["predicted_rel_error"], rel=1e-3)
