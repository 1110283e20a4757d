"""cqjax: compiler-style post-training quantization for JAX."""
