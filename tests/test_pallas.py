"""The Pallas lookup-matmul in interpret mode (CPU) against the plain reference, odd sizes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.kernels.pallas import cq_matmul
from test_kernel_support import make_cq, rel_rms


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("M,N,K,tile", [(1, 37, 200, 16), (2, 5, 40, 128)])  # ragged tiles; tile > N
def test_pallas_matmul_matches_the_reference(bits, M, N, K, tile):
    rng = np.random.default_rng(bits * 10 + N)
    q = make_cq(rng, N, K, bits)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    xr = q.rotate_activation(x)
    y = cq_matmul(xr, q.codes.T, q.norms.T, q.codebooks, bits=bits, blocks=q.blocks, tile_n=tile, interpret=True)
    assert y.shape == (M, N)
    assert rel_rms(np.asarray(y), np.asarray(q.reference_dot(x))) < 1e-5
