"""Reference (pure-JAX) ops on quantized leaves; the CPU FFI kernels join them here."""
