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
    record = {"artifact": str(path), "format": e.format, "dtype": dtype, "out": str(out), **result,
              "seconds": time.perf_counter() - start}
    write_json(out_dir / "export.json", record)
    log(f"wrote {out} in {record['seconds']:.1f} s")
    return record
