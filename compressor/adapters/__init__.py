"""Model families, one adapter each; ``ADAPTERS`` is the one list of supported model types."""

from __future__ import annotations

from torch import nn

from ... import ElastiqError
from .base import ModelAdapter
from .llama import LlamaAdapter
from .qwen2 import Qwen2Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {"llama": LlamaAdapter, "mistral": LlamaAdapter, "qwen2": Qwen2Adapter}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, or an error naming the supported ones."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ElastiqError(f"model_type {model_type!r} is not supported; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "LlamaAdapter", "ModelAdapter", "Qwen2Adapter", "adapter_for"]
