"""Reports of ``python -m cqjax``: report.json (a stable schema), report.md, plots, sweep summaries.

``report.json`` schema (these keys are stable: scripts read them; other keys may be added):

========================================  =====================================================
key                                       value
========================================  =====================================================
``model``                                 str, the model config's name (``+model=<name>``)
``bits_per_weight.quantized_tensors``     float, stored bits/weight of the eligible tensors
                                          (:mod:`cqjax.quant_stats`); null without a pipeline
``bits_per_weight.model``                 float, stored bits/weight of the whole model
``bytes.float``                           int, the whole model at 16 bits per parameter
``bytes.quantized``                       int, the whole model as stored; null without pipeline
``evals.perplexity.baseline``             float, float model's perplexity (null: no float model)
``evals.perplexity.quantized``            float, quantized model's perplexity (or null)
``evals.perplexity.kl``                   float, mean KL(float ‖ quantized) in nats per token
``evals.perplexity.top1``                 float, top-1 agreement with the float model, 0..1
``evals.perplexity.protocol``             dict: text and its sha256, tokenizer, context,
                                          stride, max_tokens, windows, scored tokens
``evals.<task>.baseline`` / ``quantized``  float, accuracy 0..1 (argmax summed log-likelihood)
``evals.<task>.stderr``                   float, binomial standard error of the accuracy
``evals.<task>.n``                        int, documents scored
``evals.retrieval.baseline`` / ``quantized``  float, sentence encoders: top-1 question → paragraph
                                          accuracy 0..1 (:mod:`cqjax.eval.embeddings`), ``n`` pairs
``evals.cosine.quantized`` / ``min``      float, sentence encoders: mean / least cosine of each
                                          text's quantized and float embeddings; ``n`` texts
``tensors[]``                             ``{"path", "role", "bits", "rel_error"}`` per tensor;
                                          ``rel_error = ‖w − ŵ‖² / ‖w‖²`` (null for float
                                          tensors or without the float model)
``towers``                                ``{tower: {"params", "bytes", "bits_per_weight",
                                          "rel_error"}}`` (text, vision, audio; ``rel_error`` the
                                          parameter-weighted mean); null without a pipeline
``passes[]``                              ``{"name", "seconds"}`` per pass, in order
========================================  =====================================================

Extra keys: ``mode``, ``pipeline`` (pass names), ``pipeline_name`` (``cq``/``rtn``/...),
``config`` (the composed config), ``checkpoint``, ``artifact``, ``family``, ``parameters``,
``seconds`` (wall time), ``timings`` (``{step: seconds}``), ``plots`` (PNG file names),
``evals.perplexity.tokens``, ``evals.<task>.protocol`` and ``..._per_char`` accuracies.

Modules: :mod:`cqjax.report.build` (the dict), :mod:`cqjax.report.markdown` (report.md and a
sweep's summary.md), :mod:`cqjax.report.plots` (PNGs, matplotlib Agg backend),
:mod:`cqjax.report.sweep` (the Hydra callback that writes summary.md and pareto.png).
"""

from __future__ import annotations

from cqjax.report.build import SCHEMA_KEYS, check_schema, evals_table
from cqjax.report.markdown import markdown, summary_table

__all__ = ["SCHEMA_KEYS", "check_schema", "evals_table", "markdown", "summary_table"]
