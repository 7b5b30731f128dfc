"""Kernels: Triton GPU kernels and their torch paths, and the one place that picks between them.

``apply_rope_gather`` rotates pruned q/k heads in place with RoPE gathered by each KV group's
stored pair indices. It runs the fused Triton kernel (``rope_triton``) on CUDA tensors when Triton
is importable, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests),
and the torch path built from ``rope.py`` otherwise. Triton is imported only when it is used.

``prepare_q4`` repacks a checkpoint's Q4_0 matrix once for the device that will multiply by it,
and ``q4_linear`` multiplies activations by it (W4A16): with the Triton kernel (``w4a16_triton``)
where ``apply_rope_gather`` would use Triton (CUDA, or CPU under the interpreter), with torch's int4
CPU matmul (``q4.py``) otherwise. The path is chosen when the weight is prepared, since each path
holds the weight in its own layout, and ``q4_linear`` follows the weight.
"""

from __future__ import annotations

import functools
import os

import torch

from .q4 import Q4Weight, check_q4_args, prepare_int4pack, q4_linear_torch
from .rope import apply_rope, rope_tables

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDICES = (torch.int32, torch.int64)


def apply_rope_gather(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """Rotate ``q`` [B, T, H, 2u] and ``k`` [B, T, G, 2u] in place: kept pair i of KV group g
    (query heads g*H/G .. (g+1)*H/G - 1, key head g) turns at ``inv_freq[pairs[g, i]]`` times the
    token's position (``positions`` [T] or [B, T]), with cos/sin scaled by ``attention_scaling``."""
    if _use_triton(q):
        from .rope_triton import rope_gather_

        rope_gather_(q, k, positions, inv_freq, pairs, attention_scaling)
    else:
        rope_gather_torch_(q, k, positions, inv_freq, pairs, attention_scaling)


def rope_gather_torch_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                       pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """The torch path of ``apply_rope_gather``: ``rope_tables`` and ``apply_rope`` over the B*T
    tokens taken as one sequence (so [B, T] positions need no loop), copied back into q and k."""
    check_rope_gather_args(q, k, positions, inv_freq, pairs)
    B, T, H, width = q.shape
    G = k.shape[2]
    cos, sin = rope_tables(inv_freq, pairs, positions.expand(B, T).reshape(-1), attention_scaling)
    for x, heads_per_group in ((q, H // G), (k, 1)):
        tokens = x.reshape(B * T, x.shape[2], width).transpose(0, 1)[None]  # [1, heads, B*T, 2u]
        x.copy_(apply_rope(tokens, cos, sin, heads_per_group)[0].transpose(0, 1).unflatten(0, (B, T)))


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


def prepare_q4(codes: torch.Tensor, scales: torch.Tensor, device: torch.device | str = "cpu") -> Q4Weight:
    """The Q4_0 matrix [N, K] of GGUF-packed ``codes`` [N, K/32, 16] (uint8) and ``scales``
    [N, K/32] (float16), repacked for ``q4_linear`` on ``device``; the codes are never re-quantized.
    This is the one place that picks a path, and so the layout the weight is held in."""
    check_q4_args(codes, scales)
    device = torch.device(device)
    if _use_triton_on(device):
        from .w4a16_triton import prepare_w4a16

        return prepare_w4a16(codes, scales, device)
    if device.type != "cpu":
        raise ValueError(f"the 4-bit matmul runs on cpu (torch int4), or on cuda when Triton is importable; "
                         f"got device {device}")
    return prepare_int4pack(codes, scales)


def q4_linear(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] times ``weight`` [N, K] transposed, plus ``bias`` [N]: [..., N] in x's dtype,
    by the path ``weight`` was prepared for (Triton: float16 or bfloat16; torch on CPU: bfloat16)."""
    if weight.path == "triton":
        from .w4a16_triton import w4a16_linear

        return w4a16_linear(x, weight, bias)
    return q4_linear_torch(x, weight, bias)


def _use_triton_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on the CPU under Triton's interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and _triton_importable()


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA tensors, or anywhere under Triton's interpreter."""
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
