"""Quantized leaves and the ops the model runs on them.

=====================  ==========================================================================
module                 what
=====================  ==========================================================================
``qarrays``            :class:`CQArray` / :class:`RTNArray` (matmul, take_rows, attend; the
                       pure-JAX reference in ``_dot_rows_jnp`` / ``_take_rows_jnp``)
``backend``            which implementation CQ leaves run: the C++ FFI kernel on CPU or pure JAX
                       (``CQJAX_KERNEL=auto|ffi|jax``, :func:`backend.use_kernel`)
``cqjax._ffi``         the FFI wrappers ``cq_matmul`` / ``cq_gather`` and kernel path/thread control
=====================  ==========================================================================
"""
