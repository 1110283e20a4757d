"""``mode=generate``: continue ``prompt="..."`` (or a list of prompts, one batch) with
``artifact=DIR``; ``mode=chat``: talk with it through its tokenizer's chat template."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.cli import encoders
from cqjax.cli.common import log
from cqjax.errors import ConfigError
from cqjax.io.atomic import write_json


def _load(cfg: DictConfig):
    """The artifact of ``cfg.artifact``, refused unless it is a causal LM with a tokenizer."""
    from cqjax import api

    path = Path(os.path.expanduser(cfg.artifact))
    q = api.load(path, verify=cfg.verify)
    if q.tokenizer_path is None:
        raise ConfigError(f"artifact={str(path)!r} has no tokenizer/ directory: cannot encode prompt")
    if encoders.task_of(q.ir.family) is not None:
        raise ConfigError(f"artifact={str(path)!r} is a {q.ir.family} model, not a causal language model: "
                          f"mode={cfg.mode.name} continues text prompts only (mode=eval evaluates it)")
    if (cfg.generate.chat or cfg.mode.name == "chat") and not getattr(q.tokenizer, "chat_template", None):
        raise ConfigError(f"artifact={str(path)!r}: its tokenizer has no chat template, so "
                          f"{'mode=chat' if cfg.mode.name == 'chat' else 'generate.chat=true'} cannot format a chat")
    return path, q


def _settings(g: DictConfig) -> dict[str, Any]:
    return dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                seed=g.seed, stop=list(g.stop))


def _print(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Continues ``cfg.prompt`` with ``cfg.artifact``; prints it (streamed for one prompt) and
    writes generation.json."""
    from cqjax import api

    start = time.perf_counter()
    path, q = _load(cfg)
    g = cfg.generate
    single = isinstance(cfg.prompt, str)
    prompts = [cfg.prompt] if single else [str(p) for p in cfg.prompt]
    log(f"generating up to {g.max_new_tokens} tokens for {len(prompts)} prompt(s) "
        f"({'greedy' if g.temperature == 0 else f'T={g.temperature}'})")
    stream = g.stream and len(prompts) == 1
    if stream and not g.chat:
        _print(prompts[0])
    texts = api.generate(q, None, prompts, chat=g.chat, system=g.system, stream=_print if stream else None,
                         kv_bits=cfg.runtime.kv_bits, **_settings(g))
    if stream:
        _print("\n")
    else:
        for p, t in zip(prompts, texts):
            print(t if g.chat else p + t)
    out = {"artifact": str(path), "prompt": prompts[0] if single else prompts,
           "completion": texts[0] if single else texts,
           "settings": OmegaConf.to_container(g, resolve=True), "seconds": time.perf_counter() - start}
    write_json(out_dir / "generation.json", out)
    return out


def chat(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Reads user turns from stdin (a terminal, or lines piped in) until end of input or
    ``/exit``; streams each reply; writes the conversation to chat.json."""
    from cqjax import textgen

    _, q = _load(cfg)
    g = cfg.generate
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model: one line per turn; /exit or Ctrl-D ends", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            user = input("> " if interactive else "")
        except EOFError:
            break
        if user.strip() == "/exit":
            break
        if not user.strip():
            continue
        text = textgen.chat_prompt(q.tokenizer, user, system=g.system, history=history)
        reply = textgen.complete(q.model, q.tokenizer, text, stream=_print if g.stream else None,
                                 kv_bits=cfg.runtime.kv_bits, add_special_tokens=False, **_settings(g))
        _print(("" if g.stream else reply) + "\n")
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    out = {"artifact": cfg.artifact, "system": g.system, "turns": history}
    write_json(out_dir / "chat.json", out)
    return out
