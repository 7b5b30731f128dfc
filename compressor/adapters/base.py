"""What the compressor needs to know about a model family, and nothing else.

An adapter answers *where* things are (blocks, embeddings, norms, head, rotary settings) and
*which* prunable groups a block has (``elastiq.checkpoint.Group``); the algorithms never ask which
family they hold (as SliceGPT's ``ModelAdapter``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ...checkpoint import Group, Heads


class ModelAdapter(ABC):
    """A causal LM of one family, seen by the compressor."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The transformer blocks, in order."""

    @property
    @abstractmethod
    def embed_tokens(self) -> nn.Embedding: ...

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abstractmethod
    def lm_head(self) -> nn.Linear: ...

    @property
    @abstractmethod
    def heads(self) -> Heads: ...

    @abstractmethod
    def groups(self, index: int) -> list[Group]:
        """The prunable groups of block ``index``."""

    @abstractmethod
    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [len(positions), head_dim] in the rotate-half convention."""
