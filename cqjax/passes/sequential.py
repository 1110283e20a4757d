"""Error feedback block by block, through the already-quantized prefix (GPTQ's sequential order).

:class:`SequentialErrorFeedbackPack` is a drop-in for the ``pack`` step of ``cq-ef`` (after
Rotate → FitCodebook) that quantizes the model one decoder block at a time instead of from
Hessians of the float model:

=================  ==============================================================================
what               how
=================  ==============================================================================
streams            the calibration rows (``ctx.rows``) go through the float model (``x_f``) and
                   through the model quantized so far (``x_q``), one block at a time
stages             inside a block, the linears that read one activation (q/k/v; o; gate/up;
                   down) form a stage, in call order; a stage's inputs ``X_q`` are recorded with
                   the earlier stages already quantized ("true sequential")
target             ``asymmetric = a``: each linear quantizes ``W' = W + a·W (C − H) H_d⁻¹``, with
                   ``H = E[x_q x_qᵀ]``, ``C = E[x_f x_qᵀ]`` and ``H_d`` damped: at ``a = 1`` the least-squares
                   weight that maps the quantized stream's input to the float layer's output on
                   the float stream, ``‖W x_f − W' x_q‖²``, so each layer also corrects the error
                   that reaches it; ``a = 0`` is plain sequential GPTQ
quantizer          :func:`cqjax.passes.gptq.cq_rotated` (coordinate-wise feedback in the rotated
                   basis) with ``H``
output head        the tied table or ``lm_head`` last, on the final norm of both streams
other tensors      (untied embedding tables, anything outside the blocks) the plain ``Pack``
=================  ==============================================================================

Measured (SmolLM2-135M, 3-bit linears, 16 self-generated rows, ``eval=quick``, float 20.10):
``asymmetric=0`` 30.58 against 30.84 for :class:`~cqjax.passes.gptq.ErrorFeedbackPack` from the
float model's Hessians, at ~3.6x its packing time (223 s against 62 s on 2 cores);
``asymmetric=1`` 33.39 — on so few rows the correction fits their noise — hence the default 0.

Memory: the float reference model, one working float copy whose quantized layers hold their
dequantized weights, two activation streams ``[rows, length, D]`` and one block's recorded
inputs. ``meta.info`` records what :class:`~cqjax.passes.gptq.ErrorFeedbackPack` records, with
``error_feedback: "sequential"`` and ``asymmetric``.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from cqjax.calib.stats import KernelProbe, Tape
from cqjax.formats import cq as fmt
from cqjax.formats.rotation import rotate_rows
from cqjax.ir import IR, KERNEL_ROLES
from cqjax.passes import gptq_core
from cqjax.passes.common import rows_of
from cqjax.passes.cq import Pack, require_rotated
from cqjax.passes.gptq import cq_rotated
from cqjax.passes.blockwise import chunks, embed, take_rows
from cqjax.pipeline import Context, Needs, Pass
from cqjax.quant_stats import ELIGIBLE, dequantizer



@dataclasses.dataclass(frozen=True, kw_only=True)
class SequentialErrorFeedbackPack(Pass):
    """Pack with error feedback block by block through the quantized prefix (module docstring).

    Attributes:
      asymmetric: how far each layer's target moves toward the weight that maps the quantized
        stream onto the float layer's output (0: plain sequential GPTQ, 1: all the way).
      percdamp: Hessian damping, a fraction of its mean diagonal.
      rows: calibration rows used (calibration draws ``max(calib.rows, rows)``).
    """

    default_where = ELIGIBLE
    asymmetric: float = 0.0
    percdamp: float = 0.01
    rows: int = 16

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(rows=self.rows, reference=True)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.asymmetric <= 1:
            raise ValueError(f"{self.name}.asymmetric={self.asymmetric!r}: must be in [0, 1]")
        if not self.percdamp > 0:
            raise ValueError(f"{self.name}.percdamp={self.percdamp!r}: must be > 0")
        if not (isinstance(self.rows, int) and self.rows >= 1):
            raise ValueError(f"{self.name}.rows={self.rows!r}: must be an int >= 1")

    def __call__(self, ir: IR, ctx: Context | None = None) -> IR:
        ctx = Context() if ctx is None else ctx
        if ctx.reference is None or ctx.rows is None:
            raise ValueError(f"{self.name}: sequential error feedback needs the float reference and calibration "
                             "rows (pipeline.run provides the reference, calibration the rows)")
        from cqjax.io import hf

        selected = self.selected(ir)
        todo = set(selected)
        tokens = np.asarray(ctx.rows, np.int32)[: self.rows]
        fmodel, qmodel = hf.to_model(ctx.reference), hf.to_model(ctx.reference)
        dequantize = dequantizer()
        out_params, out_meta = {}, {}
        t0 = time.perf_counter()

        def quantize(path, stats, set_value):
            leaf, meta = ir.params[path], ir.meta[path]
            q, info = self._quantize(path, require_rotated(leaf, path, self.name, need_codebooks=True),
                                     ctx.reference.params[path], ctx.reference.meta[path], *stats,
                                     asymmetric=self.asymmetric if meta.role in KERNEL_ROLES else 0.0)
            out_params[path], out_meta[path] = q, meta.replace(info={**meta.info, **info})
            set_value(dequantize(q))
            todo.discard(path)

        capture = _Capture(fmodel)
        xf, side = embed(fmodel, tokens)
        xq = xf
        n = len(fmodel.layers)
        for i in range(n):
            prefix = f"layers/{i}/"
            mine = [p for p in selected if p.startswith(prefix) and ir.meta[p].role in KERNEL_ROLES]
            rel = {p[len(prefix):] for p in mine}
            yf, ins_f, stages = capture(fmodel.layers[i], xf, side, i, rel)
            qvars = _kernel_vars(qmodel.layers[i])
            for s, group in enumerate(stages):
                _, ins_q, _ = capture(qmodel.layers[i], xq, side, i, rel)
                stats = self._moments(ins_f[s], ins_q[s])
                for r in group:
                    quantize(prefix + r, stats, qvars[r].set_value)
            xq = capture.forward(qmodel.layers[i], xq, side, i)
            xf = yf
            if ctx.progress:
                left = (time.perf_counter() - t0) / (i + 1) * (n - i - 1)
                ctx.log(f"{ctx.step or self.name}: block {i + 1}/{n} ({len(mine)} tensors), "
                        f"~{left:.0f} s left")
        for path, var in _head(qmodel, selected):
            quantize(path, self._moments(_flat(fmodel.norm(xf)), _flat(qmodel.norm(xq))), var.set_value)
        for path in sorted(todo):  # no stream reaches them: the plain recipe
            q, m = Pack(gain="none").rewrite(path, ir.params[path], ir.meta[path], ctx)
            out_params[path], out_meta[path] = q, m.replace(info={**m.info, "error_feedback": "none"})
        if todo:
            ctx.log(f"{self.name}: {len(todo)} tensors outside the blocks and the head: plain recipe "
                    f"({', '.join(sorted(todo)[:4])}{', ...' if len(todo) > 4 else ''})")
        return ir.replace(params=out_params, meta=out_meta)

    def _moments(self, xf, xq):
        """``(H, C)`` = ``(E[x_q x_qᵀ], E[x_f x_qᵀ])`` float64 ``[K, K]`` of a stage's inputs
        ``[n, K]`` (``C`` None when ``asymmetric`` is 0)."""
        n = xq.shape[0]
        H = np.asarray(_gram(xq, xq), np.float64) / n
        C = np.asarray(_gram(xf, xq), np.float64) / n if self.asymmetric > 0 else None
        return H, C

    def _quantize(self, path, r, float_leaf, float_meta, H, C, asymmetric):
        """``(CQArray, info)`` of one tensor from its stage's moments (:meth:`_moments`)."""
        if C is not None and asymmetric > 0:
            w, _ = rows_of(float_leaf, float_meta)
            w = w.astype(np.float64)
            Hd, _ = gptq_core.damped(H, self.percdamp)
            # W C H⁻¹ = W + W (C − H) H⁻¹; damping only the correction keeps W' = W where the
            # streams agree (damping W C itself would shrink every low-variance direction)
            fix = scipy.linalg.solve(Hd, (w @ (C - H)).T, assume_a="pos", check_finite=False).T
            w = w + asymmetric * fix
            r = dataclasses.replace(r, rows=rotate_rows(w.astype(np.float32), r.rotation))
        codes, norms, res = cq_rotated(r, H, self.percdamp, path)
        info = {"gain": "none", "format": "cq", "layout_version": fmt.LAYOUT_VERSION,
                "error_feedback": "sequential", "asymmetric": asymmetric, "percdamp": self.percdamp,
                "ef_rel_error": res.relative_error}
        return r.pack(codes, norms), info


@jax.jit
def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ b`` (float32)."""
    return a.T @ b


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])





def _kernel_vars(layer) -> dict[str, nnx.Variable]:
    """``{path inside the layer: Variable}`` of every parameter of ``layer`` (the layer's own
    variables: setting one changes the layer)."""
    _, state = nnx.split(layer)
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def _head(qmodel, selected) -> list[tuple[str, nnx.Variable]]:
    """The output head's weight (the tied table or ``lm_head``'s kernel), if selected (none for
    an encoder, which has no output head)."""
    if getattr(qmodel, "lm_head", None) is None and getattr(qmodel, "embed_tokens", None) is None:
        return []
    if getattr(qmodel, "lm_head", None) is None:
        path, var = "embed_tokens/embedding", _kernel_vars(qmodel.embed_tokens).get("embedding")
    else:
        path, var = "lm_head/kernel", _kernel_vars(qmodel.lm_head).get("kernel")
    return [(path, var)] if var is not None and path in selected else []


class _Capture:
    """Runs one block over all rows (a few at a time) and records the inputs of its kernels.

    ``capture(layer, x, side, i, paths) -> (y, inputs, stages)``: ``inputs[s]`` is the ``s``-th
    distinct activation read by the kernels ``paths`` (paths inside the layer) in call order,
    flattened to ``[rows · length, K]``; ``stages[s]`` the paths that read it. One compile per
    layer structure (the block index is traced).
    """

    def __init__(self, model):
        self.model, self.tape = model, Tape()
        self.layouts: dict = {}

        @functools.partial(jax.jit, static_argnums=(0, 1))
        def run(graphdef, key, state, x, side, i):
            self.tape.clear()
            y = model.block(i, x, side, layer=nnx.merge(graphdef, state))[0]
            xs, self.layouts[key] = self.tape.distinct()
            return y, xs

        @functools.partial(jax.jit, static_argnums=0)
        def fwd(graphdef, state, x, side, i):
            return model.block(i, x, side, layer=nnx.merge(graphdef, state))[0]

        self._run, self._fwd = run, fwd

    def __call__(self, layer, x, side, i, paths):
        g, state = nnx.split(nnx.clone(layer))  # the probes go into a copy: the layer keeps its leaves
        for key, var in nnx.to_flat_state(state):
            rel = "/".join(map(str, key))
            if rel in paths:
                var.set_value(KernelProbe(var.get_value(), rel, self.tape))
        key = (g, tuple(sorted(paths)))
        parts = [self._run(g, key, state, x[c], take_rows(side, c), np.int32(i)) for c in chunks(x.shape[0])]
        y = jnp.concatenate([p[0] for p in parts])
        xs = [_flat(jnp.concatenate([p[1][s] for p in parts])) for s in range(len(parts[0][1]))]
        layout = self.layouts[key]
        stages = [sorted(p for p, s in layout.items() if s == k) for k in range(len(xs))]
        return y, xs, stages

    def forward(self, layer, x, side, i):
        g, state = nnx.split(layer)
        return jnp.concatenate([self._fwd(g, state, x[c], take_rows(side, c), np.int32(i)) for c in chunks(x.shape[0])])
