"""Fused RoPE gather in Triton: rotate a token's pruned q and k heads in place, in one launch.

The torch path (``rope.py``) builds cos/sin tables [G, T, 2u] and then rotates q and k with
several elementwise kernels. Here one program per token loads the token's position, gathers each
head's u frequencies ``inv_freq[pairs[g, i]]`` (query head h belongs to KV group h // (H / G)),
computes cos/sin in float32, and rotates every query and key head of that token where it lies:
no tables, no intermediate tensors. Channel i pairs with channel i + u (rotate-half layout), so
the two halves are loaded as two [heads, u] blocks padded to powers of two and masked.

With ``TRITON_INTERPRET=1`` set before this module is imported, the kernel runs on CPU tensors
through Triton's interpreter (numpy), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import check_rope_gather_args


@triton.jit
def _rotate_heads(base, head_stride, heads, n_heads, heads_per_group, pos, inv_freq_ptr, freq_stride,
                  pairs_ptr, pairs_sg, pairs_su, u, scaling, i):
    """Rotate rows ``heads`` [BLOCK, 1] x channels ``i`` [1, BLOCK_U] of one token's heads at ``base``."""
    mask = (heads < n_heads) & (i < u)
    pair = tl.load(pairs_ptr + (heads // heads_per_group) * pairs_sg + i * pairs_su, mask=mask, other=0)
    angle = pos * tl.load(inv_freq_ptr + pair * freq_stride, mask=mask, other=0.0).to(tl.float32)
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling
    first = base + heads * head_stride + i
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + u, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(first + u, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rope_gather_kernel(q_ptr, k_ptr, pos_ptr, inv_freq_ptr, pairs_ptr,
                        T, H, G, u, heads_per_group, scaling,
                        q_sb, q_st, q_sh, k_sb, k_st, k_sh, pos_sb, pos_st, freq_stride, pairs_sg, pairs_su,
                        BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_U: tl.constexpr):
    """One program per token (b, t): all H query heads and all G key heads of that token."""
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    pos = tl.load(pos_ptr + b * pos_sb + t * pos_st).to(tl.float32)
    i = tl.arange(0, BLOCK_U)[None, :]
    _rotate_heads(q_ptr + b * q_sb + t * q_st, q_sh, tl.arange(0, BLOCK_H)[:, None], H, heads_per_group, pos,
                  inv_freq_ptr, freq_stride, pairs_ptr, pairs_sg, pairs_su, u, scaling, i)
    _rotate_heads(k_ptr + b * k_sb + t * k_st, k_sh, tl.arange(0, BLOCK_G)[:, None], G, 1, pos,
                  inv_freq_ptr, freq_stride, pairs_ptr, pairs_sg, pairs_su, u, scaling, i)


def rope_gather_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """Rotate ``q`` [B, T, H, 2u] and ``k`` [B, T, G, 2u] in place with one Triton launch.

    ``positions`` is [T] (shared by the batch) or [B, T]; ``inv_freq`` [d/2] holds the original
    head's rotary frequencies; ``pairs`` [G, u] the original pair index of each kept pair; cos and
    sin are multiplied by ``attention_scaling``. Computes in float32 and stores in q's dtype
    (float32, float16 or bfloat16). q and k may be strided views (a fused qkv output) as long as
    their last dimension is contiguous. Same result as ``kernels.rope`` up to float32 rounding of
    cos/sin. Pair index values are not range-checked (that would sync the GPU on every call):
    they must lie in [0, d/2), or the gather reads out of bounds.
    """
    check_rope_gather_args(q, k, positions, inv_freq, pairs)
    launch_rope_gather(q, k, positions, inv_freq, pairs, attention_scaling)


def launch_rope_gather(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                       pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """``rope_gather_`` without its argument checks (the hot path of a model that checked them)."""
    B, T, H, _ = q.shape
    G, u = pairs.shape
    if q.numel() == 0:  # no tokens, or no kept pairs
        return
    pos_sb, pos_st = positions.stride() if positions.dim() == 2 else (0, positions.stride(0))
    _rope_gather_kernel[(B * T,)](
        q, k, positions, inv_freq, pairs,
        T, H, G, u, H // G, float(attention_scaling),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        pos_sb, pos_st, inv_freq.stride(0), pairs.stride(0), pairs.stride(1),
        BLOCK_H=triton.next_power_of_2(H), BLOCK_G=triton.next_power_of_2(G), BLOCK_U=triton.next_power_of_2(u),
    )


class TritonRope:
    """The kernel as the elastic model runs it, behind ``rope.TorchRope``'s interface: the kernel
    computes cos/sin itself, so a forward pass's ``tables`` are just its positions and frequencies."""

    @staticmethod
    def tables(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> tuple:
        return positions, inv_freq, attention_scaling

    @staticmethod
    def prepare(pairs: torch.Tensor) -> torch.Tensor:
        return pairs

    @staticmethod
    def rotate_(q: torch.Tensor, k: torch.Tensor, tables: tuple, pairs: torch.Tensor) -> None:
        positions, inv_freq, scaling = tables
        launch_rope_gather(q, k, positions, inv_freq, pairs, scaling)
