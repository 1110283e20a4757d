"""Calibration statistics agree with inputs captured by hooks on transformers' torch model."""

from __future__ import annotations

import numpy as np
import pytest

from cqjax.calib import calibration_tokens, collect
from cqjax.calib.sequences import from_text
from cqjax.io import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_parity import CASES, batch, write_checkpoint  # noqa: E402


def torch_hessians(ref, tokens, mask):
    """E[x xᵀ] of every nn.Linear's input over the unmasked tokens, keyed by module name."""
    sums, hooks = {}, []
    keep = torch.tensor(mask.reshape(-1))

    def hook(name):
        def f(_module, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[keep].double()
            sums[name] = sums.get(name, 0) + (x.T @ x).numpy()
        return f

    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        ref(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    for h in hooks:
        h.remove()
    return {k: v / mask.sum() for k, v in sums.items()}


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2"])
def test_hessians_and_counts_match_torch_hooks(name, tmp_path, capsys):
    ref = write_checkpoint(CASES[name](), tmp_path)
    model, ir = hf.load(tmp_path)
    tokens, mask = batch(97)
    calib = collect(model, ir, tokens, mask=mask, batch_size=2, progress=True)  # 3 rows: one padded batch
    assert "[cqjax.calib] statistics: 3/3 rows (100%)" in capsys.readouterr().err  # padding not counted
    expected = torch_hessians(ref, tokens, mask)
    checked = 0
    for path, meta in ir.meta.items():
        if meta.role not in ("linear", "lm_head"):
            continue
        module = meta.hf_name.removesuffix(".weight")
        np.testing.assert_allclose(calib[path]["hessian"], expected[module], rtol=2e-4, atol=1e-5 * np.abs(expected[module]).max(),
                                   err_msg=path)
        checked += 1
    assert checked >= 7 * 3
    # q/k/v read one activation: one shared array.
    assert calib["layers/0/self_attn/q_proj/kernel"]["hessian"] is calib["layers/0/self_attn/v_proj/kernel"]["hessian"]
    table = calib["embed_tokens/embedding"]
    np.testing.assert_array_equal(table["counts"], np.bincount(tokens[mask], minlength=97))
    assert table["tokens"] == calib.tokens == mask.sum()
    if ir.config.tie_word_embeddings:  # the tied head's input is the final hidden state
        assert table["hessian"].shape == (64, 64)


def test_masked_tokens_do_not_count(tmp_path):
    write_checkpoint(CASES["llama"](), tmp_path)
    model, ir = hf.load(tmp_path)
    tokens, mask = batch(97)
    a = collect(model, ir, tokens, mask=mask, batch_size=3, progress=False)
    garbage = np.where(mask, tokens, 5).astype(np.int32)
    b = collect(model, ir, garbage, mask=mask, batch_size=1, progress=False)
    for path in a:
        if "hessian" in a[path]:
            np.testing.assert_allclose(a[path]["hessian"], b[path]["hessian"], rtol=1e-4, atol=1e-7)


def test_calibration_tokens_sources(tmp_path, capsys):
    write_checkpoint(CASES["llama"](), tmp_path)
    model, _ = hf.load(tmp_path)

    class Tok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    rows = calibration_tokens("self", tokenizer=Tok(), model=model, n=3, length=9, seed=0)
    assert rows.shape == (3, 9) and (rows[:, 0] == 1).all() and rows.max() < 97
    again = calibration_tokens("self", tokenizer=Tok(), model=model, n=3, length=9, seed=0, progress=True)
    np.testing.assert_array_equal(rows, again)
    assert "[cqjax.calib] self-generated calibration: 24/24 tok" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text("abcdefghij" * 10)
    rows = calibration_tokens(str(text), tokenizer=Tok(), n=4, length=6)
    assert rows.shape == (4, 6) and (rows[:, 0] == 1).all()
    np.testing.assert_array_equal(rows[1, 1:], [ord(c) % 97 for c in "fghij"])
    with pytest.raises(ValueError, match="2 x 5 needed"):
        from_text(Tok(), "abc", n=2, length=6)
    with pytest.raises(ValueError, match="calibration source 'wiki'"):
        calibration_tokens("wiki", tokenizer=Tok())


def test_fisher_matches_torch_per_row_squared_gradients(tmp_path, capsys):
    from cqjax.calib.fisher import fisher_diag

    ref = write_checkpoint(CASES["llama"](), tmp_path)
    model, ir = hf.load(tmp_path)
    tokens = np.random.default_rng(3).integers(0, 97, (3, 10)).astype(np.int32)
    paths = ["layers/1/mlp/down_proj/kernel", "lm_head/kernel", "embed_tokens/embedding"]
    ours = fisher_diag(model, tokens, paths, progress=True)
    assert "[cqjax.calib] fisher: 3/3 rows (100%)" in capsys.readouterr().err
    params = dict(ref.named_parameters())
    expected = {p: 0.0 for p in paths}
    for row in tokens:
        ref.zero_grad()
        ids = torch.tensor(row[None], dtype=torch.long)
        logits = ref(input_ids=ids).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
        for p in paths:
            g = params[ir.meta[p].hf_name].grad.numpy()
            expected[p] = expected[p] + (g.T if ir.meta[p].role in ("linear", "lm_head") else g) ** 2 / len(tokens)
    for p in paths:
        np.testing.assert_allclose(ours[p], expected[p], rtol=2e-3, atol=1e-6 * expected[p].max(), err_msg=p)


def test_calibrate_rejects_unknown_statistics():
    from cqjax.calib import calibrate

    with pytest.raises(ValueError, match=r"\['curvature'\]: allowed \('hessian', 'fisher'\)"):
        calibrate(None, None, None, {"curvature"})


@pytest.mark.parametrize("tied", [True, False])
def test_half_precision_dots_are_bf16_inference(tied, tmp_path):
    """A bf16 model wrapped for sampling computes what bf16 weights times bf16-rounded inputs
    give (float32 sums), replaces its own leaves, and samples rows; float32 models stay as they are."""
    import jax.numpy as jnp
    from flax import nnx

    from cqjax.calib.sequences import _HalfDots, half_precision_dots

    config = CASES["llama"]()
    config.tie_word_embeddings = tied
    write_checkpoint(config, tmp_path, dtype=torch.bfloat16)
    ir = hf.import_checkpoint(tmp_path)
    tokens, mask = batch(config.vocab_size)
    model = hf.to_model(ir, dtype=None)
    kernel = np.asarray(model.layers[0].mlp.up_proj.kernel.get_value().astype(jnp.float32))
    x = np.random.default_rng(0).standard_normal((2, kernel.shape[0])).astype(np.float32)
    wrapped = half_precision_dots(model)
    assert wrapped is model
    leaves = [v for _, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), _HalfDots)]
    assert len(leaves) == 7 * config.num_hidden_layers + 1 + (not tied)
    up = model.layers[0].mlp.up_proj.kernel.get_value()
    assert isinstance(up, _HalfDots) and up.shape == kernel.shape
    want = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) @ kernel
    np.testing.assert_allclose(np.asarray(up.matmul(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    float_logits = np.asarray(hf.to_model(ir, dtype=None)(tokens, mask))
    half_logits = np.asarray(model(tokens, mask))
    assert np.abs(half_logits - float_logits).max() < 0.05 * np.abs(float_logits).max()

    class Tok:
        bos_token_id = 1

    rows = calibration_tokens("self", tokenizer=Tok(), model=model, n=2, length=7, seed=0)
    assert rows.shape == (2, 7) and rows.max() < config.vocab_size
    float32 = hf.to_model(ir, dtype="float32")
    half_precision_dots(float32)
    assert not any(isinstance(v.get_value(), _HalfDots) for _, v in nnx.to_flat_state(nnx.state(float32)))
