"""RoPE on pruned heads: cos/sin gathered by each KV group's stored rotary pair indices.

Sorting permutes the rotary pairs of every KV group, and pruning keeps a prefix of them, so kept
pair ``i`` of group ``g`` rotates at the frequency of original pair ``pairs[g, i]``. A head with
``u`` kept pairs has ``2u`` channels in the rotate-half layout: channel ``i`` pairs with ``i + u``.
This is the torch path of the fused gather; it computes in float32.
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDICES = (torch.int32, torch.int64)


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


def check_rope_gather_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                           pairs: torch.Tensor) -> None:
    """Raise ValueError (shapes, layout, devices) or TypeError (dtypes) saying what the RoPE
    gather expects, so that both paths accept exactly the same arguments."""
    if q.dim() != 4 or k.dim() != 4 or pairs.dim() != 2:
        raise ValueError(f"expected q [B, T, H, 2u], k [B, T, G, 2u] and pairs [G, u]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, pairs {tuple(pairs.shape)}")
    B, T, H, width = q.shape
    G, u = pairs.shape
    if G == 0 or k.shape != (B, T, G, 2 * u) or width != 2 * u:
        raise ValueError(f"pairs {tuple(pairs.shape)} means G={G} KV heads of u={u} kept pairs, so k must be "
                         f"{(B, T, G, 2 * u)} and q [B, T, H, {2 * u}]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % G:
        raise ValueError(f"q has {H} heads, not a multiple of the {G} KV heads of k")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"positions must be [T] = {(T,)} or [B, T] = {(B, T)}; got {tuple(positions.shape)}")
    if inv_freq.dim() != 1 or inv_freq.shape[0] < u:
        raise ValueError(f"inv_freq must be [d/2] with d/2 >= u = {u} (the original head's frequencies); "
                         f"got {tuple(inv_freq.shape)}")
    if q.dtype not in _FLOATS or k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype of float32, float16, bfloat16; got {q.dtype} and {k.dtype}")
    if positions.dtype not in _INDICES or pairs.dtype not in _INDICES:
        raise TypeError(f"positions and pairs must be int32 or int64; got {positions.dtype} and {pairs.dtype}")
    if not inv_freq.dtype.is_floating_point:
        raise TypeError(f"inv_freq must be floating point; got {inv_freq.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"the last dimension of q and k must be contiguous (stride 1); got strides "
                         f"{q.stride()} and {k.stride()}")
    devices = {t.device for t in (q, k, positions, inv_freq, pairs)}
    if len(devices) > 1:
        raise ValueError(f"q, k, positions, inv_freq and pairs must be on one device; got {sorted(map(str, devices))}")
