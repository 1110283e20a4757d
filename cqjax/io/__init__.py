"""Importers and exporters: checkpoints in (Hugging Face safetensors, GGUF) and artifacts out."""
