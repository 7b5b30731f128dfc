"""Exporters of one rate of a nested checkpoint to GGUF, ONNX and Hugging Face (not built yet)."""
