"""Where each tower of a speech recognizer breaks: word error rate against bits, per tower.

    python benchmarks/speech_towers.py --json towers.json --plot towers.png
    python benchmarks/speech_towers.py --json t.json --sentences 32 --bits 8 4 --method rtn

For the packaged Whisper tiny.en (or ``--model DIR``) it transcribes ``--sentences`` BoolQ
sentences spoken by espeak-ng (:mod:`cqjax.eval.speech`) with the float model (the baseline of
the same run), then with the audio encoder alone, the text decoder alone (its token table and
tied head included) and both quantized at each of ``--bits`` by ``--method`` (``cq-ef``, the
CLI's default for it, calibrated once on ``--calib-rows`` other spoken sentences; or data-free
``cq`` or ``rtn``; every eligible tensor of the tower at that width), weights decoded once to
float32.

Output: ``{"machine", "model", "method", "sentences", "float_wer", "records": [{"tower"
("audio" | "text" | "both"), "bits", "bits_per_weight" (the quantized tensors'), "wer",
"changed" (transcriptions that differ from the float model's), "seconds"}]}``; ``--plot``: WER
against bits, one line per tower, the float WER dashed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkpoint, machine, write_result  # noqa: E402

TOWERS = {"audio": "tower:audio", "text": "tower:text", "both": None}


def quantized(ir, method: str, bits: int, where, calib):
    from cqjax import pipeline as pl
    from cqjax import quant_stats, recipes

    chain = recipes.recipe(method, bits=bits, embed_bits=bits)
    ctx = pl.Context(calibration=calib or {}, rows=None if calib is None else calib.rows)
    q, _ = pl.run(chain if where is None else pl.masked(chain, where), ir, ctx, progress=False)
    rows = [r for r in quant_stats.tensors(q) if r["kind"] in ("cq", "rtn")]
    return q, 8 * sum(r["bytes"] for r in rows) / sum(r["params"] for r in rows)


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, tower in enumerate(TOWERS):
        pts = sorted((r["bits"], r["wer"]) for r in result["records"] if r["tower"] == tower)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{tower} quantized" if tower != "both" else "both")
    ax.axhline(result["float_wer"], linestyle="--", color="gray", label="float")
    ax.set_xlabel("bits per weight of the quantized tower (codes)")
    ax.set_ylabel("word error rate")
    ax.set_xticks(sorted({r["bits"] for r in result["records"]}))
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(f"{result['model']}: WER by quantized tower ({result['method']}, {result['sentences']} sentences)",
                 fontsize=10)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--model", default="whisper-tiny-en")
    ap.add_argument("--method", default="cq-ef", choices=("cq-ef", "cq", "rtn"))
    ap.add_argument("--calib-rows", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--sentences", type=int, default=200)
    args = ap.parse_args(argv)

    from cqjax import runtime
    from cqjax.api import load_tokenizer
    from cqjax.eval import speech
    from cqjax.io import hf

    directory = checkpoint(args.model)
    ir, tokenizer = hf.import_checkpoint(directory), load_tokenizer(directory)
    texts, audio = speech.clips(args.sentences, log=print)
    t = time.perf_counter()
    model = hf.to_model(ir)
    reference = speech.transcribe(model, tokenizer, audio, progress=True)
    calib = None
    if args.method == "cq-ef":
        from cqjax.calib.calibrate import calibrate_speech

        calib = calibrate_speech(model, ir, tokenizer, args.calib_rows, skip=max(200, args.sentences), log=print)
    result = {"machine": None, "model": args.model, "method": args.method, "sentences": len(texts),
              "calibration": None if calib is None else calib.describe(),
              "float_wer": speech.word_error_rate(texts, reference), "float_seconds": time.perf_counter() - t,
              "records": []}
    print(f"float: WER {result['float_wer']:.4f}", flush=True)
    for bits in args.bits:
        for tower, where in TOWERS.items():
            t = time.perf_counter()
            q, bpw = quantized(ir, args.method, bits, where, calib)
            hyps = speech.transcribe(runtime.dequantized_model(q), tokenizer, audio)
            rec = {"tower": tower, "bits": bits, "bits_per_weight": bpw, "wer": speech.word_error_rate(texts, hyps),
                   "changed": sum(a != b for a, b in zip(hyps, reference)), "seconds": time.perf_counter() - t}
            result["records"].append(rec)
            print(rec, flush=True)
            result["machine"] = machine()
            write_result(args.json, result)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
