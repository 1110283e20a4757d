"""A causal LM evaluated one block at a time, so that only one block's weights are loaded at once.

The scorers (:mod:`cqjax.eval.scoring`) hand a :class:`StreamedLM` all the batches of an
evaluation at once; it embeds a group of them, loads block 0 (from the lazy checkpoint or the
quantized IR), runs every batch of the group through it, drops it, loads block 1, ... and
returns the final-norm hidden states, which the scorers put through the output head batch by
batch. The same function as the resident model (up to float rounding of sums), at about the
same speed, in a fraction of the memory:

=========================  =====================================================================
resident at once           size
=========================  =====================================================================
the rest of the model      token embedding, final norm, output head (and Gemma's per-layer
                           tables): everything outside ``layers/`` (quantized tables packed)
one block's weights        loaded from the memory-mapped checkpoint / quantized IR, then dropped
a group's activations      ``x`` and the side inputs of the group's batches: groups are cut so
                           that they stay under ``activation_bytes`` (each group re-reads the
                           blocks)
=========================  =====================================================================

Example:
  >>> model = StreamedLM(hf.import_checkpoint(directory))               # doctest: +SKIP
  >>> evaluate_model(model, data, reference=StreamedLM(float_ir))       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.memory import trim_heap
from cqjax.progress import Progress
from cqjax.sharding import place_batch


class StreamedLM:
    """A causal LM of an IR, run block by block (see the module docstring).

    Args:
      ir: a float IR (lazy leaves read as needed) or a quantized one.
      dtype: float leaves' dtype on the device; None keeps each one's stored dtype (the layers
        compute in float32 either way).
      packed: quantized leaves of the blocks run packed (the runtime's kernels); False decodes
        each block's quantized leaves to float32 while that block is loaded. Quantized leaves
        outside the blocks (embedding tables, an untied head) always stay packed, as deployed:
        gathered rows are decoded as they are gathered and the head runs through the kernel
        (a float32 copy of a large vocabulary's table would be the biggest thing in memory).
      activation_bytes: the most bytes of activations (a group of batches' ``x`` and side
        inputs) held at once.
      name: for progress lines.
    """

    def __init__(self, ir, *, dtype=None, packed: bool = False, activation_bytes: int = 32 << 20,
                 name: str = "model"):
        from cqjax.io import hf
        from cqjax.models import registry

        self.ir, self.dtype, self.packed, self.name = ir, dtype, packed, name
        self.activation_bytes = int(activation_bytes)
        self.shell = hf.abstract_model(registry.FAMILIES[ir.family], ir.config)
        self.num_layers = len(self.shell.layers)
        graphdef, blocks, rest = nnx.split(self.shell, lambda path, _: len(path) > 0 and path[0] == "layers", ...)
        rest = _fresh(rest)
        for key, var in nnx.to_flat_state(rest):
            var.set_value(self._leaf("/".join(map(str, key)), packed=True))
        #: The leaves outside ``layers/`` (embedding, final norm, head), loaded: the head's params.
        self.params = rest
        shell = self.shell

        def whole(rest):  # the blocks stay abstract: embed and logits never read them
            return nnx.merge(graphdef, blocks, rest)

        self._embed = jax.jit(lambda rest, tokens, mask: whole(rest).embed(tokens, mask))
        self._norm = jax.jit(lambda rest, x: whole(rest).norm(x))
        self._block = jax.jit(lambda g, state, x, side, i: shell.block(i, x, side, layer=nnx.merge(g, state))[:2],
                              static_argnums=0)
        #: ``(params, ...)`` functions of the model outside its blocks (differentiable in ``params``).
        self.head_fn = lambda rest, h: whole(rest).logits(h)
        self.norm_fn = lambda rest, x: whole(rest).norm(x)
        self.embed_fn = lambda rest, tokens, mask: whole(rest).embed(tokens, mask)
        trim_heap()

    def _leaf(self, path: str, packed: bool) -> Any:
        from cqjax.io import hf
        from cqjax.runtime import evaluation_leaf

        return evaluation_leaf(hf.load_leaf(self.ir, path, self.dtype), packed=packed)

    def load_block(self, i: int) -> tuple[Any, Any]:
        """``(graphdef, state)`` of block ``i`` loaded as this model evaluates it."""
        return self.block_state(i, lambda path: self._leaf(path, packed=self.packed))

    def block_state(self, i: int, leaf) -> tuple[Any, Any]:
        """``(graphdef, state)`` of block ``i`` whose every leaf is ``leaf(IR path)``."""
        graphdef, state = nnx.split(self.shell.layers[i])
        state = _fresh(state)
        for key, var in nnx.to_flat_state(state):
            var.set_value(leaf("/".join(map(str, ("layers", i, *key)))))
        return graphdef, state

    def embed(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, Any]:
        """``(x, side)``: the first block's input of one batch."""
        return self._embed(self.params, place_batch(jnp.asarray(tokens, jnp.int32)), place_batch(jnp.asarray(mask, bool)))

    def run_block(self, graphdef, state, i: int, acts: list) -> list:
        """Each ``(x, side)`` of ``acts`` through block ``i`` (its ``(graphdef, state)``), waited for."""
        out = [self._block(graphdef, state, x, side, np.int32(i)) for x, side in acts]
        # Wait for the block: dispatch is asynchronous, and running ahead would load the next
        # blocks (and hold every block's activations) before this one is done.
        return jax.block_until_ready(out)

    def final_norm(self, x: jax.Array) -> jax.Array:
        """The final norm of the last block's output (the head's input)."""
        return self._norm(self.params, x)

    def groups(self, shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
        """Batch indices cut into consecutive groups whose activations fit ``activation_bytes``
        (a batch larger than that is a group of its own).

        Args:
          shapes: each batch's ``(rows, tokens per row)``.
        """
        out, size = [], 0
        for j, shape in enumerate(shapes):
            need = self._activation_bytes(shape)
            if not out or size + need > self.activation_bytes:
                out.append([])
                size = 0
            out[-1].append(j)
            size += need
        return out

    def _activation_bytes(self, shape: tuple[int, int]) -> int:
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
        out = jax.eval_shape(self._embed, self.params, tokens, jax.ShapeDtypeStruct(shape, bool))
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(out))

    def hidden_states(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], *,
                      progress: bool = False) -> list[jax.Array]:
        """Final-norm hidden states ``[B, T, D]`` of each ``(tokens, mask)`` batch (one group:
        every batch's activations are held until the last block; see :meth:`groups`)."""
        acts = [self.embed(t, m) for t, m in batches]
        prog = Progress(f"{self.name} blocks", self.num_layers, unit="block", enabled=progress)
        for i in range(self.num_layers):
            graphdef, state = self.load_block(i)
            acts = self.run_block(graphdef, state, i, acts)
            del state
            trim_heap()
            prog.update(1)
        prog.close()
        return [self.final_norm(x) for x, _ in acts]


def _fresh(state: nnx.State) -> nnx.State:
    """A copy of ``state`` with new Variables: :func:`nnx.split` shares the module's own, so
    setting values on them would fill the abstract shell (and keep every loaded block alive)."""
    return jax.tree.map(lambda x: x, state)

