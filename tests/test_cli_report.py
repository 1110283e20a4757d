"""Report pieces without a model: the schema check, report.md, summary.md, the plots."""

from __future__ import annotations

import copy

import pytest

from cqjax.report import check_schema, evals_table, markdown, summary_table
from cqjax.report.plots import _front, pareto, report_plots
from cqjax.report.sweep import collect, write_summary


def report(pipeline="cq", bits=3, bpw=3.4, ppl=25.0, kl=0.3):
    return {
        "model": "tiny", "mode": "convert", "pipeline_name": pipeline, "pipeline": ["rotate", "codebook", "pack"],
        "config": {"quant": {"bits": bits, "embed_bits": 4}}, "parameters": 1000,
        "bits_per_weight": {"quantized_tensors": bpw, "model": bpw + 0.1},
        "bytes": {"float": 2000, "quantized": int(bpw * 125)},
        "evals": {"perplexity": {"baseline": 20.0, "quantized": ppl, "kl": kl, "top1": 0.8, "tokens": 511,
                                 "protocol": {"text": {"source": "wikipedia"}, "context": 512, "stride": 511}},
                  "arc_easy": {"baseline": 0.5, "quantized": 0.45, "stderr": 0.05, "n": 100,
                               "protocol": {"source": "arc_easy/rc_0shot", "split": "test"}}},
        "tensors": [{"path": f"layers/{i}/mlp/up_proj/kernel", "role": "linear", "bits": bits, "rel_error": 0.03 * (i + 1)}
                    for i in range(3)] + [{"path": "embed_tokens/embedding", "role": "embedding", "bits": 4,
                                           "rel_error": 0.01},
                                          {"path": "norm/scale", "role": "norm", "bits": 16, "rel_error": None}],
        "passes": [{"name": "rotate", "seconds": 1.0}, {"name": "codebook", "seconds": 0.1}],
        "seconds": 12.0, "timings": {"import": 1.0, "eval float": 5.0},
    }


def test_schema_check_accepts_a_report_and_names_what_is_missing():
    check_schema(report())
    for path in (("model",), ("bytes", "quantized"), ("evals", "perplexity", "kl"), ("evals", "arc_easy", "n")):
        r = copy.deepcopy(report())
        d = r
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
        with pytest.raises(ValueError, match=path[-1]):
            check_schema(r)
    r = report()
    del r["tensors"][0]["rel_error"]
    with pytest.raises(ValueError, match=r"tensors\[0\].rel_error"):
        check_schema(r)


def test_evals_table_baseline_quantized_and_standalone():
    base = {"perplexity": {"perplexity": 20.0, "tokens": 10, "protocol": {"p": 1}},
            "piqa": {"acc": 0.6, "acc_per_char": 0.61, "stderr": 0.05, "n": 50}}
    quant = {"similarity": {"perplexity": 22.0, "kl": 0.1, "top1": 0.9},
             "perplexity": {"perplexity": 22.0, "tokens": 10, "protocol": {"p": 1}},
             "piqa": {"acc": 0.55, "acc_per_char": 0.5, "stderr": 0.05, "n": 50}}
    t = evals_table(base, quant)
    assert t["perplexity"] == {"baseline": 20.0, "quantized": 22.0, "kl": 0.1, "top1": 0.9, "tokens": 10,
                               "protocol": {"p": 1}}
    assert (t["piqa"]["baseline"], t["piqa"]["quantized"], t["piqa"]["n"]) == (0.6, 0.55, 50)
    alone = evals_table(None, {k: v for k, v in quant.items() if k != "similarity"})
    assert alone["perplexity"]["baseline"] is None and alone["perplexity"]["quantized"] == 22.0
    assert alone["perplexity"]["kl"] is None and alone["piqa"]["baseline"] is None


def test_markdown_has_the_quality_table_and_worst_tensors():
    md = markdown({**report(), "plots": ["metrics.png"]})
    assert "| perplexity (lower is better) | 20.000 | 25.000 | +25.0% |" in md
    assert "| arc_easy accuracy | 0.500 | 0.450 | -0.050 | ±0.050 (stderr), n=100 documents |" in md
    assert md.index("layers/2/mlp/up_proj/kernel") < md.index("layers/0/mlp/up_proj/kernel")
    assert "![metrics.png](metrics.png)" in md and "wikipedia" in md


def test_plots_are_pngs(tmp_path):
    names = report_plots(report(), tmp_path)
    assert names == ["metrics.png", "tensor_errors.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:4] == b"\x89PNG"
    empty = {**report(), "evals": {}, "tensors": []}
    assert report_plots(empty, tmp_path) == []


def test_sweep_summary_and_pareto(tmp_path):
    import json

    jobs = [report("cq", 2, 2.6, 100.0, 2.0), report("cq", 4, 4.2, 22.0, 0.2),
            report("rtn", 2, 2.7, 300.0, 3.0), report("rtn", 4, 4.3, 24.0, 0.3)]
    for i, r in enumerate(jobs):
        r["overrides"] = ["+model=tiny", f"quant.bits={r['config']['quant']['bits']}", f"pipeline={r['pipeline_name']}"]
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps(r))
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0: quant.bits=2 pipeline=cq", "1: quant.bits=4 pipeline=cq",
                                        "2: quant.bits=2 pipeline=rtn", "3: quant.bits=4 pipeline=rtn"]
    table = summary_table(rows)
    assert table.count("\n| ") == 5 and "arc_easy acc (float → quantized)" in table
    assert "| 0.500 → 0.450 |" in table
    written = write_summary(tmp_path)
    assert [p.name for p in written] == ["summary.md", "pareto.png"]
    assert pareto([{**jobs[0], "bits_per_weight": {"quantized_tensors": None, "model": None}}], tmp_path / "x.png") is None


def test_pareto_front_keeps_only_undominated_points():
    pts = [(4.2, 22.0), (2.6, 100.0), (3.0, 150.0), (3.4, 40.0), (4.0, 45.0)]
    assert _front(pts) == [(2.6, 100.0), (3.4, 40.0), (4.2, 22.0)]


def test_sweep_with_allocated_budgets(tmp_path):
    jobs = [report("cq", 2, 2.6, 100.0, 2.0), report("cq", 3, 3.4, 40.0, 0.9), report("cq", 3, 3.0, 60.0, 1.2),
            report("rtn", 2, 2.7, 300.0, 3.0), report("rtn", 3, 3.5, 80.0, 1.5)]
    jobs[2]["config"]["quant"]["bpw"] = 3.0
    table = summary_table(jobs)
    assert "allocated to 3" in table
    png = pareto(jobs, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def encoder_report(bits=4, bpw=4.1, acc=0.74, cos=0.98):
    r = report(bits=bits, bpw=bpw)
    r["evals"] = {"retrieval": {"baseline": 0.75, "quantized": acc, "stderr": 0.015, "n": 803,
                                "protocol": {"source": "squad", "max_length": 256, "pooling": "mean"}},
                  "cosine": {"quantized": cos, "min": cos - 0.02, "n": 1606}}
    return r


def test_encoder_reports_tables_and_plots(tmp_path):
    r = encoder_report()
    check_schema(r)
    bad = copy.deepcopy(r)
    del bad["evals"]["cosine"]["min"]
    with pytest.raises(ValueError, match="cosine.min"):
        check_schema(bad)
    md = markdown({**r, "plots": []})
    assert "| retrieval accuracy (top-1) | 0.750 | 0.740 | -0.010 | ±0.015 (stderr), n=803 questions |" in md
    assert "| cosine to float embeddings (mean) | 1 | 0.9800 | -0.0200 | least 0.9600, n=1606 texts |" in md
    assert evals_table({"retrieval": {"acc": 0.75, "stderr": 0.01, "n": 3}},
                       {"retrieval": {"acc": 0.7, "stderr": 0.01, "n": 3}, "cosine": {"mean": 0.9, "min": 0.8, "n": 6}}
                       ) == {"retrieval": {"baseline": 0.75, "quantized": 0.7, "stderr": 0.01, "n": 3, "protocol": None},
                             "cosine": {"quantized": 0.9, "min": 0.8, "n": 6}}
    assert report_plots(r, tmp_path) == ["metrics.png", "tensor_errors.png"]
    jobs = [{**encoder_report(b, b + 0.1, 0.6 + 0.04 * b, 1 - 0.2 / b), "job": str(b)} for b in (2, 3, 4)]
    table = summary_table(jobs)
    assert "perplexity" not in table and "| 0.9500 (0.930) | 0.750 → 0.760 |" in table
    assert pareto(jobs, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bits_and_error_per_tower():
    from cqjax.quant_stats import by_tower

    rows = [{"tower": "text", "params": 100, "bytes": 50, "rel_error": 0.02},
            {"tower": "text", "params": 300, "bytes": 150, "rel_error": 0.04},
            {"tower": "text", "params": 10, "bytes": 20},  # a float norm: no error
            {"tower": "vision", "params": 200, "bytes": 50, "rel_error": 0.1}]
    towers = by_tower(rows)
    assert list(towers) == ["text", "vision"]
    assert towers["text"]["params"] == 410 and towers["text"]["bits_per_weight"] == 8 * 220 / 410
    assert towers["text"]["rel_error"] == (0.02 * 100 + 0.04 * 300) / 400
    assert towers["vision"] == {"params": 200, "bytes": 50, "bits_per_weight": 2.0, "rel_error": 0.1}
    md = markdown({**report(), "towers": towers})
    assert "| vision | 200 | 2.000 | 0.1000 |" in md
    assert "## Per tower" not in markdown({**report(), "towers": {"text": towers["text"]}})
