"""The Python API: quantize a checkpoint, save and load the artifact, generate text.

=================================================  ==============================================
call                                               does
=================================================  ==============================================
``quantize(src, bits=3, embed_bits=4)``            imports ``src`` (checkpoint dir / hub id / IR /
                                                   ``(model, ir)``), runs a recipe of
                                                   ``conf/pipeline/`` (``method="cq"``, ``"rtn"``,
                                                   ``"cq-ef"``, ...: :mod:`cqjax.recipes`) or your
                                                   ``pipeline``, and returns a :class:`Quantized`
``save(q, directory)``                             writes the artifact (:mod:`cqjax.io.artifact`),
                                                   with the source's tokenizer files
``load(directory)``                                reads it back as a :class:`Quantized`
``generate(q, tokenizer, prompt)``                 greedy (or sampled) continuation: text in,
                                                   text out; token ids in, ids out
=================================================  ==============================================

Example (``checkpoint`` is a Hugging Face checkpoint directory with tokenizer files and
``tmp`` a scratch directory; the test suite runs this on a tiny random model):

>>> import cqjax
>>> q = cqjax.quantize(checkpoint, bits=3, embed_bits=4, progress=False)
>>> [r["name"] for r in q.report]
['rotate', 'codebook', 'pack']
>>> 3 < q.storage["bits_per_weight"]["quantized_tensors"] < 6   # narrow tensors pay for side data
True
>>> path = cqjax.save(q, f"{tmp}/tiny-cq3")
>>> sorted(p.name for p in path.iterdir())
['manifest.json', 'tokenizer', 'weights.safetensors']
>>> q2 = cqjax.load(path)
>>> text = cqjax.generate(q2, None, "The quick brown", max_new_tokens=4)
>>> text == cqjax.generate(q, None, "The quick brown", max_new_tokens=4)
True
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax import pipeline as pipeline_lib
from cqjax import quant_stats, recipes, runtime, sharding
from cqjax.io import artifact, hf
from cqjax.ir import IR


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized model and what is known about it.

    Attributes:
      model: the Flax NNX model (quantized leaves inside; call it like the float model).
      ir: the quantized IR it was built from.
      report: one ``{"name", "seconds", "changed", "selected"}`` per pass (empty if unknown).
      storage: :func:`cqjax.quant_stats.storage` of ``ir`` (bits/weight, bytes, params).
      tokenizer_path: a directory with tokenizer files (None: no tokenizer).
      recipe: how it was quantized (method, bits, embed_bits, recipe keywords).
    """

    model: nnx.Module
    ir: IR
    report: list[dict]
    storage: dict
    tokenizer_path: Path | None = None
    recipe: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The transformers tokenizer from ``tokenizer_path`` (None without one)."""
        return load_tokenizer(self.tokenizer_path) if self.tokenizer_path else None


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(directory)``, local files only, no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _source(model_or_path: Any) -> tuple[IR, Path | None]:
    if isinstance(model_or_path, IR):
        return model_or_path, None
    if isinstance(model_or_path, tuple) and len(model_or_path) == 2 and isinstance(model_or_path[1], IR):
        return model_or_path[1], None
    if isinstance(model_or_path, (str, os.PathLike)):
        directory = hf.resolve(model_or_path)
        return hf.import_checkpoint(directory), directory
    raise TypeError(f"quantize: expected a checkpoint directory or hub id, an IR, or (model, ir); "
                    f"got {type(model_or_path).__name__}")


def quantize(model_or_path: Any, *, bits: int = 3, embed_bits: int | None = 4, method: str = "cq",
             pipeline: Any = None, steps: dict | None = None, calib: dict | None = None, progress: bool = True,
             dtype=jnp.float32, mesh: Any = None, **quant: Any) -> Quantized:
    """Quantizes a model with a recipe of ``conf/pipeline/`` (the CLI's) or any pipeline.

    Args:
      model_or_path: a checkpoint directory or hub id, an IR, or ``(model, ir)`` as from
        :func:`cqjax.io.hf.load`.
      bits: bit width of linear layers.
      embed_bits: bit width of embeddings and the LM head.
      method: a recipe name (:func:`cqjax.recipes.names`: ``"cq"``, ``"cq-ef"``, ``"rtn"``, ``"gptq"``).
      pipeline: a pass or chain to run instead (then ``bits``/``method``/``steps``/``quant`` are unused).
      steps: per-step options of the recipe, e.g. ``{"pack": {"gain": "ls"}}``.
      calib: :class:`cqjax.config.CalibConfig` values for a recipe that needs calibration
        (``source``, ``rows``, ``length``, ``seed``); it needs a checkpoint with a tokenizer.
      progress: print one line per pass.
      dtype: float dtype of the model's remaining float parameters.
      mesh: a :class:`jax.sharding.Mesh` (:func:`cqjax.sharding.make_mesh`): calibration runs the
        float model with its weights split along ``model`` and its rows along ``data``, and the
        quantized model comes back split the same way (:mod:`cqjax.sharding`); the stored bytes
        are those of a single-device run.
      **quant: more :class:`cqjax.config.QuantConfig` values: ``block``, ``seed``, ``codebook``,
        ``overrides``, ``roles``, ``bpw``, ``choices``, ``proxy``.

    Returns:
      A :class:`Quantized`.

    Raises:
      ConfigError: a bad value, or a ``quant.overrides`` pattern that matches no tensor.
    """
    ir, source = _source(model_or_path)
    if pipeline is None:
        cfg = recipes.config(method, {"bits": bits, "embed_bits": embed_bits, **quant}, steps)
        pipeline = recipes.build(cfg)
        recipes.check_rules(cfg, ir)
        recipes.check_budget(pipeline, ir)
        hf.check_finite(ir)
        recipe = {"method": method, "bits": bits, "embed_bits": embed_bits, **quant, "steps": steps}
    else:
        cfg, recipe = None, {"method": "custom", "pipeline": pipeline_lib.to_pass(pipeline).name}
    ctx = pipeline_lib.Context(progress=progress)
    needs = pipeline_lib.to_pass(pipeline).needs
    if needs.calibration:
        with sharding.use_mesh(mesh):
            stats = _calibration(ir, source, needs, calib or {}, progress)
        ctx = ctx.replace(calibration=stats, rows=stats.rows)
        recipe["calibration"] = stats.describe()
    qir, report = pipeline_lib.run(pipeline, ir, ctx, progress=progress)
    if mesh is not None:
        qir = sharding.shard_ir(qir, mesh)
    tok = source if source is not None and _has_tokenizer(source) else None
    if source is not None:
        recipe["source"] = str(source)
    return Quantized(model=hf.to_model(qir, dtype), ir=qir, report=report, storage=quant_stats.storage(qir),
                     tokenizer_path=tok, recipe=recipe)


def _calibration(ir: IR, source: Path | None, needs, calib: dict, progress: bool):
    """The :class:`cqjax.calib.Calibration` (statistics and rows) from the float model of ``ir``
    (split over the mesh of :func:`cqjax.sharding.use_mesh`, if any)."""
    from omegaconf import OmegaConf

    from cqjax.calib import calibrate
    from cqjax.config import CalibConfig

    if source is None or not _has_tokenizer(source):
        raise ValueError("quantize: this recipe needs calibration, which needs the checkpoint directory with its "
                         "tokenizer (pass the path, not an IR), or run it with pipeline=... and your own Context")
    c = OmegaConf.merge(OmegaConf.structured(CalibConfig), calib)
    return calibrate(hf.to_model(ir), ir, load_tokenizer(source), needs.statistics, source=c.source,
                     rows=max(c.rows, needs.rows), length=c.length, seed=c.seed, progress=progress)


def save(q: Quantized, directory: str | os.PathLike) -> Path:
    """Writes ``q`` as an artifact directory (atomically), with its tokenizer files. With several
    JAX processes (``jax.distributed``) every one must call it; process 0 writes."""
    extra = {"recipe": q.recipe, "passes": q.report, "storage": q.storage}
    ir = q.ir
    if jax.process_count() > 1:  # a mesh across processes: all gather the shards, the first writes
        ir = sharding.gather_ir(ir)
        if jax.process_index() != 0:
            return Path(directory)
    return artifact.save(ir, directory, tokenizer_from=q.tokenizer_path, extra=extra)


def load(directory: str | os.PathLike, dtype=jnp.float32, *, verify: bool = True, mesh: Any = None) -> Quantized:
    """Reads an artifact directory written by :func:`save`, validated against the format and (with
    ``verify``) every stored array's sha256 (:func:`cqjax.io.artifact.load`); with ``mesh``, its
    weights split over it (:func:`cqjax.sharding.shard_ir`)."""
    manifest = artifact.read_manifest(directory)
    ir = artifact.load(directory, verify=verify)
    if mesh is not None:
        ir = sharding.shard_ir(ir, mesh)
    extra = artifact.from_json(manifest.get("extra", {}))
    return Quantized(model=hf.to_model(ir, dtype), ir=ir, report=list(extra.get("passes", [])),
                     storage=quant_stats.storage(ir), tokenizer_path=artifact.tokenizer_dir(directory),
                     recipe=dict(extra.get("recipe", {})))


def generate(model: Quantized | nnx.Module, tokenizer: Any, prompt: str | Sequence[str] | Sequence[int] | np.ndarray, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop: Sequence[str] = (),
             stream: Callable[[str], None] | None = None, chat: bool = False, system: str | None = None,
             stop_at_eos: bool = True, kv_bits: int | None = None) -> str | list[str] | np.ndarray:
    """Continues ``prompt`` with :func:`cqjax.runtime.generate` (KV cache, jitted steps).

    Args:
      model: a :class:`Quantized` or any cqjax Flax model.
      tokenizer: a transformers tokenizer, or None to use the :class:`Quantized`'s own.
      prompt: text, a list of texts (one left-padded batch: each gets the tokens it would get
        alone; needs a tokenizer), or token ids ``[T]`` / ``[B, T]``.
      max_new_tokens, temperature, top_k, top_p, seed, kv_bits: as in :func:`cqjax.runtime.generate`.
      stop: text only: strings that end a completion (cut before the first one).
      stream: text only: called with each piece of the completion as it is produced (one prompt).
      chat: text only: wrap each prompt in the tokenizer's chat template as a user turn
        (after ``system``, if given).
      stop_at_eos: stop at the tokenizer's (and the model config's) EOS token.

    Returns:
      For text, the generated continuation (special tokens skipped), or one per prompt of a
      list; for token ids, ``[B, T + n]`` ids, prompt included.
    """
    from cqjax import textgen

    if isinstance(model, Quantized):
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
        model = model.model
    text = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str))
    if text:
        if tokenizer is None:
            raise ValueError("generate: a text prompt needs a tokenizer (pass one, or load an artifact or "
                             "checkpoint that has tokenizer files)")
        if chat:
            prompt = (textgen.chat_prompt(tokenizer, prompt, system=system) if isinstance(prompt, str)
                      else [textgen.chat_prompt(tokenizer, p, system=system) for p in prompt])
        return textgen.complete(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop=stop, stream=stream,
                                stop_at_eos=stop_at_eos, kv_bits=kv_bits, add_special_tokens=not chat)
    if stop or stream is not None or chat:
        raise ValueError("generate: stop, stream and chat need a text prompt (token ids were given)")
    eos = textgen.eos_ids(tokenizer, model) if stop_at_eos and tokenizer is not None else None
    return runtime.generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, eos_token_id=eos or None, kv_bits=kv_bits)
