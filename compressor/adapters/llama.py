"""Llama-family blocks (Llama, SmolLM, Mistral): pre-norm attention with GQA and RoPE, SwiGLU MLP."""

from __future__ import annotations

import torch

from ...checkpoint import MLP, QK, VO, Group, Heads
from ...quants import BLOCK
from .base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """transformers' ``LlamaForCausalLM`` and the families that share its module names."""

    @property
    def layers(self):
        return self.model.model.layers

    @property
    def embed_tokens(self):
        return self.model.model.embed_tokens

    @property
    def final_norm(self):
        return self.model.model.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def heads(self) -> Heads:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Heads(c.num_attention_heads, c.num_key_value_heads, head_dim)

    def groups(self, index: int) -> list[Group]:
        p = f"model.layers.{index}."
        d = self.heads.head_dim
        return [
            # down_proj's input axis is pruned: whole quantization blocks.
            Group(MLP, index, self.config.intermediate_size, BLOCK,
                  ((p + "mlp.gate_proj.weight", "rows"), (p + "mlp.up_proj.weight", "rows"),
                   (p + "mlp.down_proj.weight", "cols"))),
            # Whole rotary pairs (channel j with j + d/2), shared by a KV head and its query heads.
            Group(QK, index, d // 2, 1,
                  ((p + "self_attn.q_proj.weight", "q"), (p + "self_attn.k_proj.weight", "k"),
                   *self._biases(p, "q", "k"))),
            # V rank per KV head; o_proj's input axis is pruned: whole quantization blocks.
            Group(VO, index, d, BLOCK,
                  ((p + "self_attn.v_proj.weight", "v"), (p + "self_attn.o_proj.weight", "o"),
                   *self._biases(p, "v"))),
        ]

    def _biases(self, prefix: str, *projections: str) -> tuple[tuple[str, str], ...]:
        """Bias members of the given projections (none in Llama)."""
        return ()

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.model.model.rotary_emb
        cos, sin = rope(torch.zeros(1, dtype=rope.inv_freq.dtype), positions[None])
        return cos[0], sin[0]
