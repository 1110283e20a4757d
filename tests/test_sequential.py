"""Error feedback block by block through the quantized prefix: the first stage sees the float
stream (so it equals the float-Hessian error feedback there), later blocks see the quantized
stream, every eligible tensor ends packed, and the result beats the data-free recipe."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax import pipeline as pl
from cqjax import recipes
from cqjax.calib.stats import collect
from cqjax.io import hf
from cqjax.kernels.qarrays import CQArray
from cqjax.passes.cq import FitCodebook, Rotate
from cqjax.passes.gptq import ErrorFeedbackPack
from cqjax.passes.sequential import SequentialErrorFeedbackPack
from cqjax.pipeline import Context
from test_tune import CFG, _weights, kl
from test_import_errors import write

HEAD = "embed_tokens/embedding"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = {**CFG, "tie_word_embeddings": True}
    ir = hf.import_checkpoint(write(tmp_path_factory.mktemp("seq") / "ckpt", config=cfg, weights={
        k: v for k, v in _weights().items() if not k.startswith("lm_head")}))
    # 16 calibration and 16 held-out rows: with 6 and 4, which variant beat the data-free recipe
    # depended on the seed and even on float summation order (seeds 0-3: each variant lost on one)
    rng = np.random.default_rng(0)
    rows, held_out = rng.integers(0, 37, (16, 32)).astype(np.int32), rng.integers(0, 37, (16, 32)).astype(np.int32)
    front = pl.chain(Rotate(block=32), FitCodebook(bits=2))
    seq = {a: pl.run(pl.chain(front, SequentialErrorFeedbackPack(asymmetric=a, rows=16)), ir,
                     Context(rows=rows), progress=False)[0] for a in (0.0, 1.0)}
    calib = collect(hf.to_model(ir), ir, rows, progress=False)
    ef, _ = pl.run(pl.chain(front, ErrorFeedbackPack()), ir, Context(calibration=calib), progress=False)
    plain, _ = pl.run(recipes.recipe("cq", bits=2, embed_bits=2, block=32), ir, progress=False)
    return ir, seq, ef, plain, rows, held_out


def test_every_eligible_tensor_is_packed_with_its_record(setup):
    ir, seq, *_ = setup
    q = seq[1.0]
    for path in ("layers/0/self_attn/q_proj/kernel", "layers/1/mlp/down_proj/kernel", HEAD):
        assert isinstance(q.params[path], CQArray), path
        info = q.meta[path].info
        assert info["error_feedback"] == "sequential" and 0 <= info["ef_rel_error"] < 1
    # the tied table is also the input embedding: its target is never moved
    assert q.meta[HEAD].info["asymmetric"] == 0.0
    assert q.meta["layers/1/mlp/down_proj/kernel"].info["asymmetric"] == 1.0


def test_the_first_stage_sees_the_float_stream(setup):
    """Block 0's q/k/v read the embedding, the same on both streams: their codes are those of
    error feedback from the float model's Hessian on the same rows (up to float32 summation
    order), and with ``asymmetric`` the target there is the weight itself (C = H)."""
    _, seq, ef, *_ = setup
    path = "layers/0/self_attn/q_proj/kernel"
    for a in (0.0, 1.0):
        same = np.mean(np.asarray(seq[a].params[path].codes) == np.asarray(ef.params[path].codes))
        assert same > 0.98, (a, same)


@pytest.mark.slow
def test_it_beats_the_data_free_recipe_on_held_out_rows(setup):
    ir, seq, _, plain, rows, held_out = setup
    for a in (0.0, 1.0):
        assert kl(ir, seq[a], held_out) < kl(ir, plain, held_out), a


def test_it_needs_rows_and_the_reference_and_checks_its_settings(setup):
    ir = setup[0]
    with pytest.raises(ValueError, match="asymmetric"):
        SequentialErrorFeedbackPack(asymmetric=2.0)
    with pytest.raises(ValueError, match="rows"):
        SequentialErrorFeedbackPack(rows=0)
    assert SequentialErrorFeedbackPack(rows=5).needs == pl.Needs(rows=5, reference=True)
    with pytest.raises(ValueError, match="reference and calibration"):
        SequentialErrorFeedbackPack()(ir, Context())
