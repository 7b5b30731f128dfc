"""RoPE on pruned heads: cos/sin gathered by each KV group's stored rotary pair indices.

Sorting permutes the rotary pairs of every KV group, and pruning keeps a prefix of them, so kept
pair ``i`` of group ``g`` rotates at the frequency of original pair ``pairs[g, i]``. A head with
``u`` kept pairs has ``2u`` channels in the rotate-half layout: channel ``i`` pairs with ``i + u``.
This is the torch path of the fused gather; it computes in float32.
"""

from __future__ import annotations

import torch


def rope_tables(inv_freq: torch.Tensor, pairs: torch.Tensor, positions: torch.Tensor,
                attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [G, T, 2u] for ``inv_freq`` [d/2] (original head size d), ``pairs``
    [G, u] and ``positions`` [T]: each group's u gathered frequencies, repeated for the two halves."""
    freqs = inv_freq.float()[pairs.long()]  # [G, u]
    angles = positions.float()[None, :, None] * freqs[:, None, :]  # [G, T, u]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, 2u], whose heads come in groups of ``heads_per_group`` (the query
    heads of one KV head, or 1 for keys), with group g's tables ``cos[g]``, ``sin[g]``."""
    xg = x.float().unflatten(1, (-1, heads_per_group))  # [B, G, heads_per_group, T, 2u]
    x1, x2 = xg.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xg * cos[:, None] + rotated * sin[:, None]
    return out.flatten(1, 2).to(x.dtype)
