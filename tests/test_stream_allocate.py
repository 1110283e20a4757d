"""Bit allocation block by block (cqjax.stream_allocate) against the in-memory allocator: the
same statistics (Fisher, Hessians, token counts), the same widths, and a conversion that starts
with it."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import recipes, stream_allocate, stream_calibrated
from cqjax.calib.fisher import fisher_diag
from cqjax.calib.stats import collect
from cqjax.io import artifact, hf
from cqjax.passes.allocate import AllocateBits
from cqjax.pipeline import Context
from cqjax.quant_stats import is_eligible
from test_import_errors import write
from test_quant_passes import tensors
from test_recipes import CFG as ONE_BLOCK


def checkpoint(directory, tied: bool):
    cfg = {**ONE_BLOCK, "num_hidden_layers": 2, "tie_word_embeddings": tied}
    weights = tensors(cfg, seed=5, scale=0.05)
    weights |= {k.replace(".0.", ".1."): v for k, v in tensors(cfg, seed=6, scale=0.05).items() if ".0." in k}
    return write(directory, config=cfg, weights=weights)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).integers(0, ONE_BLOCK["vocab_size"], size=(3, 10)).astype(np.int32)


@pytest.mark.parametrize("tied", [True, False])
def test_statistics_are_the_whole_models(tied, rows, tmp_path, monkeypatch):
    """The Fisher (per-row gradients through the blocks, a tied table's two uses summed before
    squaring), the Hessians and the token counts the allocator measures with are the ones
    calibration computes on the whole float model."""
    ir = hf.import_checkpoint(checkpoint(tmp_path / "ckpt", tied))
    model = hf.to_model(ir)
    want = {p: dict(v) for p, v in collect(model, ir, rows, progress=False).items()}
    for p, f in fisher_diag(model, rows, [p for p, m in ir.meta.items() if is_eligible(p, m)], progress=False).items():
        want.setdefault(p, {})["fisher"] = f
    seen = {}
    measure = AllocateBits.measure

    def spy(self, ir, ctx, widths, **kw):
        seen.update({p: dict(ctx.calibration[p]) for p in widths})
        return measure(self, ir, ctx, widths, **kw)

    monkeypatch.setattr(AllocateBits, "measure", spy)
    alloc = recipes.recipe("cq-ef", bits=3, bpw=3.2).steps[0][1]
    stream_allocate.allocate(alloc, ir, rows, Context(rng_seed=1), progress=False)
    assert set(seen) == {p for p, m in ir.meta.items() if is_eligible(p, m)}
    for path, stats in want.items():
        got = seen[path]
        assert set(got) == set(stats), path
        for key in ("fisher", "hessian"):
            if key in stats:
                np.testing.assert_allclose(got[key], stats[key], rtol=2e-3, atol=1e-6 * np.abs(stats[key]).max(),
                                           err_msg=f"{path} {key}")
        if "counts" in stats:
            np.testing.assert_array_equal(got["counts"], stats["counts"])
        assert got["tokens"] == stats["tokens"]


@pytest.mark.slow
def test_conversion_starts_with_the_allocation(rows, tmp_path):
    """``quant.bpw`` with error feedback converts block by block: the widths are the in-memory
    allocator's, and the artifact meets the budget."""
    ir = hf.import_checkpoint(checkpoint(tmp_path / "ckpt", tied=False))
    recipe = recipes.recipe("cq-ef", bits=3, bpw=3.2)
    how = stream_calibrated.plan(recipe)
    assert isinstance(how.allocate, AllocateBits) and [s.name for s in how.steps] == ["rotate", "codebook", "pack"]
    model = hf.to_model(ir)
    calib = {p: dict(v) for p, v in collect(model, ir, rows, progress=False).items()}
    for p, f in fisher_diag(model, rows, [p for p, m in ir.meta.items() if is_eligible(p, m)], progress=False).items():
        calib.setdefault(p, {})["fisher"] = f
    want = how.allocate(ir, Context(rng_seed=1, calibration=calib))
    stream_calibrated.convert(recipe, ir, tmp_path / "a", tokens=rows, ctx=Context(rng_seed=1), key="k",
                              progress=False, carry="float")
    got = artifact.load(tmp_path / "a")
    widths = {p: m.info.get("allocated_bits") for p, m in want.meta.items()}
    assert {p: m.info.get("allocated_bits") for p, m in got.meta.items()} == widths
    assert len({b for b in widths.values() if b}) > 1  # mixed
    for p, m in got.meta.items():
        if m.info.get("allocated_bits"):
            assert got.params[p].bits == m.info["allocated_bits"]
            assert m.info["predicted_rel_error"] == pytest.approx(want.meta[p].info["predicted_rel_error"], rel=1e-3)
