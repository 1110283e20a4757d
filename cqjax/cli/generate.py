"""``mode=generate``: continue ``prompt="..."`` with ``artifact=DIR``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.cli import encoders
from cqjax.cli.common import log
from cqjax.errors import ConfigError
from cqjax.io.atomic import write_json


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Continues ``cfg.prompt`` with ``cfg.artifact``; prints it and writes generation.json."""
    from cqjax import api

    path = Path(os.path.expanduser(cfg.artifact))
    start = time.perf_counter()
    q = api.load(path, verify=cfg.verify)
    if q.tokenizer_path is None:
        raise ConfigError(f"artifact={str(path)!r} has no tokenizer/ directory: cannot encode prompt")
    if encoders.task_of(q.ir.family) is not None:
        raise ConfigError(f"artifact={str(path)!r} is a {q.ir.family} model, not a causal language model: "
                          "mode=generate continues text prompts only (mode=eval evaluates it)")
    g = cfg.generate
    log(f"generating up to {g.max_new_tokens} tokens ({'greedy' if g.temperature == 0 else f'T={g.temperature}'})")
    text = api.generate(q, None, cfg.prompt, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                        top_k=g.top_k, seed=g.seed, kv_bits=cfg.runtime.kv_bits)
    out = {"artifact": str(path), "prompt": cfg.prompt, "completion": text,
           "settings": OmegaConf.to_container(g, resolve=True), "seconds": time.perf_counter() - start}
    write_json(out_dir / "generation.json", out)
    print(cfg.prompt + text)
    return out
