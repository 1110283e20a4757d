"""Gemma 4 in full (transformers' ``Gemma4ForConditionalGeneration``, ``model_type`` ``gemma4``):
the text decoder of :mod:`cqjax.models.gemma4` with the vision tower of
:mod:`cqjax.models.gemma4_vision` and the audio tower of :mod:`cqjax.models.gemma4_audio`, each
optional (a checkpoint without ``vision_config`` / ``audio_config`` has none).

A prompt is token ids with one placeholder per soft token of its images and audio clips, plus
the towers' inputs as transformers' processor gives them (:data:`INPUTS`). The model embeds it
as transformers' ``Gemma4Model.forward`` does:

=========================  ===================================================================
step                       what it does
=========================  ===================================================================
placeholders               image, video and audio placeholders embedded as the pad token
                           (``embed_tokens(ids') · sqrt(D)``), soft tokens or not
images                     the ``image_token_id`` placeholders take the images' valid soft
                           tokens, row-major (not scaled by ``sqrt(D)``)
audio                      the ``audio_token_id`` placeholders take the clips' valid soft
                           tokens the same way
per-layer inputs           the table part from ``ids'``, the projection part from the merged
                           embeddings
bidirectional images       with ``use_bidirectional_attention="vision"``, an image's soft
                           tokens see each other on sliding layers (audio stays causal)
=========================  ===================================================================

The counts of placeholders and soft tokens must agree (checked outside the trace:
:meth:`Gemma4ForConditionalGeneration.prompt_inputs`). IR paths (the text model's as
:class:`cqjax.models.gemma4.Gemma4ForCausalLM`'s, so every text tool runs it unchanged):

======================================  ======  ====================================================
IR paths                                tower   checkpoint tensors
======================================  ======  ====================================================
``layers/…``, ``embed_tokens/…``, …     text    ``model.language_model.…``
``vision_tower/…``, ``embed_vision/…``  vision  ``model.vision_tower.…``, ``model.embed_vision.…``
``audio_tower/…``, ``embed_audio/…``    audio   ``model.audio_tower.…``, ``model.embed_audio.…``
======================================  ======  ====================================================

>>> logits = prompt_logits(model, ids, input_features=f, input_features_mask=m)    # doctest: +SKIP
>>> out = runtime.generate(model, ids, max_new_tokens=8, pixel_values=pv, image_position_ids=pos)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from cqjax.errors import ConfigError
from cqjax.models import gemma4_audio, gemma4_vision
from cqjax.models.families import check_keys, expect
from cqjax.models.gemma4 import Gemma4Config, Gemma4ForCausalLM, parse_gemma4, text_hf_name

#: Top-level keys of a ``model_type: gemma4`` config besides the generic ones; the ``b*``/``e*``
#: token ids and ``vision_soft_tokens_per_image`` are for the processor (the model never reads them).
MULTIMODAL_KEYS = frozenset({
    "text_config", "vision_config", "audio_config", "image_token_id", "video_token_id", "audio_token_id",
    "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id", "eoa_token_index", "vision_soft_tokens_per_image"})
#: Placeholder ids of transformers' Gemma4Config defaults: image, video, audio.
PLACEHOLDER_DEFAULTS = {"image_token_id": 258_880, "video_token_id": 258_884, "audio_token_id": 258_881}
#: The towers' inputs a prompt may carry (transformers' names) and the dtype each is read as;
#: each pair goes together.
INPUTS = {"pixel_values": np.float32, "image_position_ids": np.int32,
          "input_features": np.float32, "input_features_mask": np.bool_}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4MultimodalConfig(Gemma4Config):
    """A ``model_type: gemma4`` config: the text decoder's fields from ``text_config`` (the head
    tied as the top-level ``tie_word_embeddings`` says, default true; ``eos_token_id`` the
    top-level one if given), plus:

    Attributes:
      vision: the vision tower (None: the checkpoint has none).
      audio: the audio tower (None: the checkpoint has none).
      image_token_id / audio_token_id: the placeholders of one image / audio soft token.
      placeholder_ids: the image, video and audio placeholders; the text model embeds them as
        the pad token (as transformers does, soft tokens or not).
      vision_bidirectional: ``text_config.use_bidirectional_attention == "vision"``: on sliding
        layers an image's soft tokens also see each other's later tokens.
    """

    vision: gemma4_vision.Gemma4VisionConfig | None = None
    audio: gemma4_audio.Gemma4AudioConfig | None = None
    image_token_id: int
    audio_token_id: int
    placeholder_ids: tuple[int, ...]
    vision_bidirectional: bool = False


def parse_gemma4_multimodal(raw: dict, source: str) -> Gemma4MultimodalConfig:
    """A ``model_type: gemma4`` config.json → :class:`Gemma4MultimodalConfig`; ConfigError names
    the key (``text_config.…``, ``vision_config.…``, ``audio_config.…``) that is wrong."""
    if not isinstance(raw.get("text_config"), dict):
        raise ConfigError(f"{source}: config key 'text_config' is required: model_type 'gemma4' is the multimodal "
                          "Gemma 4 (text_config, vision_config, audio_config); a text model's config has "
                          "model_type 'gemma4_text'")
    check_keys(raw, MULTIMODAL_KEYS, source)
    text = {"model_type": "gemma4_text", **raw["text_config"]}
    where = f"{source}: text_config"
    expect(text, "model_type", ("gemma4_text",), where)
    bidirectional = expect(text, "use_bidirectional_attention", (None, "vision"), where)
    base = parse_gemma4({k: v for k, v in text.items() if k != "use_bidirectional_attention"}, where)
    if base.pad_token_id is None:
        raise ConfigError(f"{where}: config key 'pad_token_id' is required (placeholders are embedded as it)")
    vision, audio = raw.get("vision_config"), raw.get("audio_config")
    if vision is not None:
        vision = gemma4_vision.parse_vision_config(vision, f"{source}: vision_config")
    if audio is not None:
        audio = gemma4_audio.parse_audio_config(audio, source, text_hidden_size=base.hidden_size)
    ids = {k: raw.get(k, default) for k, default in PLACEHOLDER_DEFAULTS.items()}
    for key in ("image_token_id", "audio_token_id"):
        if not isinstance(ids[key], int):
            raise ConfigError(f"{source}: config key {key!r} = {ids[key]!r}; a token id expected")
    eos = raw.get("eos_token_id", base.eos_token_id)
    text_fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Gemma4Config)}
    return Gemma4MultimodalConfig(
        **{**text_fields, "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
           "eos_token_id": tuple(eos) if isinstance(eos, list) else eos},
        vision=vision, audio=audio, image_token_id=ids["image_token_id"], audio_token_id=ids["audio_token_id"],
        placeholder_ids=tuple(int(v) for v in ids.values() if v is not None),
        vision_bidirectional=bidirectional == "vision")


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    """transformers' ``Gemma4ForConditionalGeneration``: the text decoder with the vision tower
    (``vision_tower`` / ``embed_vision``) and the audio tower (``audio_tower`` / ``embed_audio``)
    its config has.

    ``model(tokens, mask)`` reads text; ``model(tokens, mask, **inputs)`` a prompt with images
    (``pixel_values``, ``image_position_ids``) and/or audio (``input_features``,
    ``input_features_mask``), whose placeholders take the soft tokens in order (the module
    table). :func:`prompt_logits` checks the counts (:meth:`prompt_inputs`) and jits it;
    :func:`cqjax.runtime.generate` decodes from such a prompt.
    """

    def __init__(self, cfg: Gemma4MultimodalConfig, dtype=jnp.float32):
        super().__init__(cfg, dtype)
        v, a = cfg.vision, cfg.audio
        if v is not None:
            self.vision_tower = gemma4_vision.Gemma4VisionModel(v, dtype)
            self.embed_vision = gemma4_vision.MultimodalEmbedder(v.hidden_size, cfg.hidden_size, eps=v.rms_norm_eps,
                                                                 dtype=dtype)
        if a is not None:
            self.audio_tower = gemma4_audio.AudioModel(a, dtype)
            self.embed_audio = gemma4_vision.MultimodalEmbedder(a.output_dims, a.text_hidden_size,
                                                                eps=a.rms_norm_eps, dtype=dtype)

    def image_features(self, pixel_values, image_position_ids):
        """``(soft tokens [N, L, D] in the text model's width, valid [N, L])`` of the images."""
        h, valid = self.vision_tower(pixel_values, image_position_ids)
        return self.embed_vision(h), valid

    def embed(self, tokens, mask=None, positions=None, *, pixel_values=None, image_position_ids=None,
              input_features=None, input_features_mask=None):
        """:meth:`Gemma4ForCausalLM.embed` with placeholders embedded as the pad token; images'
        and audio clips' soft tokens replace their placeholders (the per-layer inputs then see
        them; image spans go into ``side`` if ``vision_bidirectional``)."""
        cfg = self.config
        text = jnp.where(jnp.isin(tokens, jnp.asarray(cfg.placeholder_ids)), cfg.pad_token_id, tokens)
        x, side = super().embed(text, mask, positions)
        if pixel_values is None and input_features is None:
            return x, side
        if pixel_values is not None:
            slots = tokens == cfg.image_token_id
            x = gemma4_vision.scatter_soft_tokens(x, slots, *self.image_features(pixel_values, image_position_ids))
            if cfg.vision_bidirectional:
                side = {**side, "spans": gemma4_vision.image_spans(slots, side["positions"])}
        if input_features is not None:
            x = gemma4_vision.scatter_soft_tokens(x, tokens == cfg.audio_token_id, *gemma4_audio.audio_soft_tokens(
                self, input_features, input_features_mask))
        # the text-only per-layer inputs computed above are unused, so a jit drops them
        return x, {**side, "ple": self.per_layer_inputs(text, x) if cfg.hidden_size_per_layer_input else None}

    def prompt_inputs(self, tokens: np.ndarray, **inputs) -> dict[str, np.ndarray]:
        """The towers' ``inputs`` of a prompt as the model reads them (:data:`INPUTS`' dtypes),
        None values left out, after checking them against ``tokens [B, T]``.

        Raises:
          ValueError: an input not in :data:`INPUTS` or without its pair; a tower the checkpoint
            lacks; shapes the tower cannot read; or placeholders that do not match the soft
            tokens (one ``image_token_id`` per image soft token, one ``audio_token_id`` per
            audio soft token).
        """
        cfg = self.config
        inputs = {k: v for k, v in inputs.items() if v is not None}
        unknown = sorted(set(inputs) - set(INPUTS))
        if unknown:
            raise ValueError(f"gemma4: prompt inputs {unknown} are not read by this model; it reads {list(INPUTS)}")
        inputs = {k: np.asarray(v, INPUTS[k]) for k, v in inputs.items()}
        for a, b in (("pixel_values", "image_position_ids"), ("input_features", "input_features_mask")):
            if (a in inputs) != (b in inputs):
                raise ValueError(f"gemma4: prompt inputs {a} and {b} go together; got only {a if a in inputs else b}")
        if "pixel_values" in inputs:
            gemma4_vision.check_image_prompt(cfg, tokens, inputs["pixel_values"], inputs["image_position_ids"])
        if "input_features" in inputs:
            features, mask = inputs["input_features"], inputs["input_features_mask"]
            if cfg.audio is None:
                raise ValueError("gemma4: this checkpoint has no audio tower (no audio_config); it cannot read audio")
            if features.ndim != 3 or mask.shape != features.shape[:2]:
                raise ValueError(f"gemma4: input_features {list(features.shape)} and input_features_mask "
                                 f"{list(mask.shape)} must be [clips, frames, mels] and [clips, frames]")
            slots = int((np.asarray(tokens) == cfg.audio_token_id).sum())
            soft = int(gemma4_audio.soft_token_counts(mask).sum())
            if slots != soft:
                raise ValueError(f"gemma4: the prompt has {slots} audio placeholders (audio_token_id "
                                 f"{cfg.audio_token_id}); the audio gives {soft} soft tokens")
        return inputs


def prompt_logits(model: Gemma4ForConditionalGeneration, tokens: np.ndarray, mask: np.ndarray | None = None,
                  **inputs) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of a prompt with images and/or audio, compiled for this call,
    quantized leaves in their runtime layout (:func:`cqjax.runtime.prepare`, under the current
    kernel mode).

    Args:
      model: a :class:`Gemma4ForConditionalGeneration` (float or quantized).
      tokens: ``[B, T]`` ids holding one placeholder per soft token of the images and the clips.
      mask: ``[B, T]`` True on real tokens (default all).
      **inputs: the towers' inputs (:data:`INPUTS`) as transformers' processor gives them:
        images as ``pixel_values [N, patches, 3·p²]`` and ``image_position_ids [N, patches, 2]``
        (or :func:`cqjax.models.gemma4_vision.patchify`), audio as ``input_features [C,
        frames, mels]`` and ``input_features_mask [C, frames]``
        (:func:`cqjax.eval.gemma4_features.log_mel`).

    Raises:
      ValueError: as :meth:`Gemma4ForConditionalGeneration.prompt_inputs`.
    """
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    inputs = model.prompt_inputs(tokens, **inputs)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    run = gemma4_vision.jit_call(model, lambda m, tokens, mask, inputs: m(tokens, mask, **inputs))
    return np.asarray(run(tokens, mask, inputs))


def hf_name(path: str, cfg: Gemma4MultimodalConfig) -> str | list:
    """The checkpoint tensor of an IR path (the module table): the towers' as their modules
    name them, the text model's as :func:`cqjax.models.gemma4.text_hf_name` under
    ``model.language_model.``."""
    if gemma4_vision.is_vision_path(path):
        return gemma4_vision.hf_name(path)
    if path.startswith(gemma4_audio.AUDIO_PREFIXES):
        return gemma4_audio.audio_hf_name(path)
    return text_hf_name(path, cfg, "model.language_model.")


def tower(path: str) -> str:
    """``vision`` or ``audio`` for a tower's (and its embedder's) paths, else ``text``."""
    if gemma4_vision.is_vision_path(path):
        return "vision"
    return "audio" if path.startswith(gemma4_audio.AUDIO_PREFIXES) else "text"
