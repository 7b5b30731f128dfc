"""RoPE on pruned heads: cos/sin gathered by each KV group's stored rotary pair indices.

Sorting permutes the rotary pairs of every KV group, and pruning keeps a prefix of them, so kept
pair ``i`` of group ``g`` rotates at the frequency of original pair ``pairs[g, i]``. A head with
``u`` kept pairs has ``2u`` channels in the rotate-half layout: channel ``i`` pairs with ``i + u``.
This is the torch path of the fused gather (``TorchRope``, as the elastic model runs it; ``CpuRope``
does its rotation in one op of elastiq's CPU ops): cos/sin
of every original pair are computed once per forward pass for all the blocks that share the
frequencies (``position_tables``), and each block gathers its own pairs' columns from them
(``rotate_gathered_``), rotating q and k in float32 where they lie, [B, T, heads, 2u].
"""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDICES = (torch.int32, torch.int64)
_OP_FLOATS = (torch.float32, torch.bfloat16)  # what elastiq's CPU op rotates


def position_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                    attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., d/2] (float32, times ``attention_scaling``) of every original pair of
    ``inv_freq`` [d/2] at ``positions`` ([T] or [B, T]): each block's kept pairs are
    gathered from it, so that blocks with different kept pairs share one table."""
    angles = positions.float()[..., None] * inv_freq.float()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def pair_channels(pairs: torch.Tensor) -> torch.Tensor:
    """The original pair of each of a block's rotated channels [G * 2u], from ``pairs`` [G, u]
    (rotate-half layout: channels i and i + u of a head turn at the same frequency)."""
    return torch.cat((pairs, pairs), dim=1).flatten().long()


def rotate_gathered_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     channels: torch.Tensor) -> None:
    """Rotate ``q`` [B, T, H, 2u] and ``k`` [B, T, G, 2u] in place with the columns ``channels``
    (``pair_channels``) of ``position_tables``' cos and sin ([T, d/2] or [B, T, d/2]); query head
    h uses the columns of KV group h // (H/G). Computes in float32, rounds once to q's dtype."""
    B, T, H, width = q.shape
    G = k.shape[2]
    cos = cos.index_select(-1, channels).unflatten(-1, (G, 1, width))  # [.., T, G, 1, 2u]
    sin = sin.index_select(-1, channels).unflatten(-1, (G, 1, width))
    for x, per_group in ((q, H // G), (k, 1)):
        xf = x.float().unflatten(2, (G, per_group))
        x1, x2 = xf.chunk(2, dim=-1)
        x.copy_((xf * cos + torch.cat((-x2, x1), dim=-1) * sin).flatten(2, 3))


class CpuRope:
    """``TorchRope``'s three calls with the rotation in one op of elastiq's CPU ops
    (``cpu_ops.cpp``'s ``rope_gather_``: the same float32 arithmetic, one rounding) for bfloat16
    or float32 heads that no gradient has to flow through (recovery fine-tuning trains through the
    torch path)."""

    tables = staticmethod(position_tables)
    prepare = staticmethod(pair_channels)

    @staticmethod
    def rotate_(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                channels: torch.Tensor) -> None:
        cos, sin = tables
        if q.dtype in _OP_FLOATS and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            torch.ops.elastiq.rope_gather_(q, k, cos, sin, channels)
        else:
            rotate_gathered_(q, k, cos, sin, channels)


class TorchRope:
    """The torch path as the elastic model runs it: ``tables`` once per forward pass and set of
    frequencies, ``prepare`` once per block, ``rotate_`` per block and pass."""

    tables = staticmethod(position_tables)
    prepare = staticmethod(pair_channels)

    @staticmethod
    def rotate_(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                channels: torch.Tensor) -> None:
        rotate_gathered_(q, k, *tables, channels)


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
