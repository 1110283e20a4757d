"""Generation as users drive it: batches of prompts of different lengths, nucleus sampling,
stop strings, streamed text and chat templates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import data, runtime, textgen
from cqjax.io import hf

transformers = pytest.importorskip("transformers")
from test_parity import CASES, write_checkpoint  # noqa: E402


@pytest.mark.parametrize("name, kv_bits", [("llama", None), ("gemma3", None), ("llama", 16), ("gemma2", 16)])
def test_a_ragged_batch_decodes_what_each_prompt_decodes_alone(name, kv_bits, tmp_path):
    """gemma3: sliding layers, so positions must be per row; kv_bits=16: the bfloat16 cache read
    by the C++ attention kernel (gemma2: with its softcap) skips each row's padding too."""
    write_checkpoint(CASES[name](), tmp_path)
    model, _ = hf.load(tmp_path)
    prompts = [[5, 17, 3, 42, 8, 9, 60, 11], [7], [30, 31, 32]]
    batch = runtime.generate(model, prompts, max_new_tokens=7, kv_bits=kv_bits)
    for p, row in zip(prompts, batch):
        np.testing.assert_array_equal(row, runtime.generate(model, p, max_new_tokens=7, kv_bits=kv_bits)[0])
    sampled = runtime.generate(model, prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=4)
    assert [len(r) for r in sampled] == [len(p) + 5 for p in prompts]


def test_left_pad_and_decoder_refuse_bad_masks():
    tokens, mask = runtime.left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True] * 3, [False, False, True]])
    with pytest.raises(ValueError, match="non-empty"):
        runtime.left_pad([[1], []])


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda p: np.array([int(runtime.sample(logits, k, 1.0, top_p=p)[0]) for k in keys[:200]])  # noqa: E731
    assert set(draw(0.5)) == {0}            # 0.5 alone reaches 0.5
    assert set(draw(0.6)) == {0, 1}         # 0.5 is short of 0.6: the next token joins
    assert set(draw(0.9)) == {0, 1, 2}
    assert set(draw(1.0)) == {0, 1, 2, 3}
    assert int(runtime.sample(logits, keys[0], 0.0, top_p=0.1)[0]) == 0  # greedy ignores it


class CharTokenizer:
    """One character per token (ids are code points); decode of partial ids is exact."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_text_stream_cuts_at_stop_strings_and_never_shows_part_of_one():
    shown = []
    s = textgen.TextStream(CharTokenizer(), stop=["END", "\n\n"], emit=shown.append)
    finished = [s.push(ord(c)) for c in "abc EN"]
    assert not any(finished) and "".join(shown) == "abc "  # "EN" might become "END": held back
    assert not s.push(ord("d"))  # it did not
    assert "".join(shown) == "abc ENd"
    assert not s.push(ord("\n")) and s.push(ord("\n")) and s.stopped
    assert s.close() == "abc ENd" and "".join(shown) == "abc ENd"
    s = textgen.TextStream(CharTokenizer(), stop=["xy"], emit=None)
    assert [s.push(ord(c)) for c in "axy"] == [False, False, True] and s.close() == "a"
    s = textgen.TextStream(CharTokenizer(), stop=["xy"], eos={ord("!")})
    assert [s.push(ord(c)) for c in "ab!c"] == [False, False, True, True] and s.close() == "ab"


def test_generate_stops_once_every_row_has_ended_at_its_own_step(monkeypatch):
    """Rows reach EOS at different steps: generation stops when the last one does."""
    script = iter([[5, 9], [6, 6], [7, 7], [9, 8], [1, 1]])

    class Scripted:
        def __init__(self, *args, **kwargs):
            pass

        def prefill(self, ids, mask):
            return np.asarray(next(script), np.int32)

        def step(self, nxt):
            return np.asarray(next(script), np.int32)

    monkeypatch.setattr(runtime, "Decoder", Scripted)
    out = runtime.generate(None, np.zeros((2, 3), np.int32), max_new_tokens=5, eos_token_id=9)
    np.testing.assert_array_equal(out[:, 3:], [[5, 6, 7, 9], [9, 6, 7, 8]])


def test_chat_template_of_the_packaged_model():
    try:
        directory = data.model_dir("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from cqjax import api

    tok = api.load_tokenizer(directory)
    text = textgen.chat_prompt(tok, "Hi!", system="Be brief.")
    assert text.index("Be brief.") < text.index("Hi!") and text.rstrip().endswith("assistant")
    assert tok.convert_tokens_to_ids("<|im_end|>") in textgen.eos_ids(tok)
    with pytest.raises(ValueError, match="no chat template"):
        textgen.chat_prompt(CharTokenizer(), "Hi!")


@pytest.mark.slow
def test_packaged_model_chats_and_streams():
    try:
        directory = data.model_dir("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from cqjax import api

    model, _ = hf.load(directory)
    tok = api.load_tokenizer(directory)
    pieces = []
    reply = api.generate(model, tok, "What is the capital of France?", chat=True, max_new_tokens=24,
                         stream=pieces.append)
    assert "Paris" in reply and "".join(pieces) == reply and len(pieces) > 3
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]
    assert api.generate(model, tok, prompts, max_new_tokens=10) == [
        api.generate(model, tok, p, max_new_tokens=10) for p in prompts]
    assert api.generate(model, tok, "1, 2, 3,", max_new_tokens=30, stop=[" 7"]) == " 4, 5, 6,"
