"""Qwen2 blocks: Llama's structure with biases on the q, k and v projections."""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """transformers' ``Qwen2ForCausalLM``: each bias follows its projection's output channels."""

    def _biases(self, prefix: str, *projections: str) -> tuple[tuple[str, str], ...]:
        return tuple((f"{prefix}self_attn.{p}_proj.bias", p) for p in projections)
