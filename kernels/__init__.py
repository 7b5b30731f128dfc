"""Kernels: Triton GPU kernels, elastiq's CPU ops and their torch paths, and the one place that
picks between them.

``apply_rope_gather`` rotates pruned q/k heads in place with RoPE gathered by each KV group's
stored pair indices. It runs the fused Triton kernel (``rope_triton``) on CUDA tensors when Triton
is importable, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests),
elastiq's CPU op (``cpu_ops``) on other CPU tensors where it is built, and the torch path built
from ``rope.py`` otherwise; ``rms_norm_for`` likewise. Triton is imported only when it is used.

``prepare_q4`` repacks a checkpoint's Q4_0 matrix once for the device that will multiply by it,
and ``q4_linear`` multiplies activations by it: with the Triton kernel (``w4a16_triton``) where
``apply_rope_gather`` would use Triton (CUDA, or CPU under the interpreter); on CPU with elastiq's
own kernel (``q4_cpu`` on ``cpu_ops``, path "cpu", compiled once per machine) where it builds,
with torch's int4 matmul (``q4.py``, path "torch") where it does not. The path is chosen when the
weight is prepared (``q4_path``), since each path holds the weight in its own layout, and
``q4_linear`` follows the weight. ``prepare_q8_matrix`` holds an 8-bit block matrix for the same
path: two 4-bit halves on the CPU paths (``q8.Q8Pair``), dequantized where Triton runs.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable

import torch

from ..quants import dequantize_q8_0
from .cpu_ops import cpu_ops_built
from .q4 import Q4Weight, check_q4_args, check_q4_linear_args, gathered_matmul, int4pack_matmul, prepare_int4pack
from .q4_cpu import cpu_blocks_matmul, prepare_cpu_blocks
from .q8 import Q8Pair, prepare_q8_pair, q8_pair_matmul
from .rope import CpuRope, TorchRope, check_rope_gather_args

if TYPE_CHECKING:
    from .rope_triton import TritonRope

Q4Matmul = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def apply_rope_gather(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """Rotate ``q`` [B, T, H, 2u] and ``k`` [B, T, G, 2u] in place: kept pair i of KV group g
    (query heads g*H/G .. (g+1)*H/G - 1, key head g) turns at ``inv_freq[pairs[g, i]]`` times the
    token's position (``positions`` [T] or [B, T]), with cos/sin scaled by ``attention_scaling``.
    The arguments are checked on every call; the elastic model uses ``rope_for``."""
    check_rope_gather_args(q, k, positions, inv_freq, pairs)
    _rotate(rope_for(q.device), q, k, positions, inv_freq, pairs, attention_scaling)


def rope_for(device: torch.device | str) -> "TorchRope | CpuRope | TritonRope":
    """How the elastic model rotates q and k on ``device``, chosen once: the Triton kernel (CUDA,
    or the CPU under Triton's interpreter), elastiq's CPU op (``CpuRope``, where the CPU ops are
    built) or the torch path. They take the same three calls:
    ``tables(positions, inv_freq, scaling)`` once per forward pass and set of frequencies,
    ``prepare(pairs)`` once per block, ``rotate_(q, k, tables, prepared)`` per block and pass. They
    do not check their arguments: the model's blocks check their shapes when they are built."""
    if _use_triton_on(torch.device(device)):
        from .rope_triton import TritonRope

        return TritonRope()
    if torch.device(device).type == "cpu" and cpu_ops_built():
        return CpuRope()
    return TorchRope()


def rope_gather_torch_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                       pairs: torch.Tensor, attention_scaling: float = 1.0) -> None:
    """The torch path of ``apply_rope_gather`` (``rope.position_tables``, then ``rope.rotate_gathered_``)."""
    check_rope_gather_args(q, k, positions, inv_freq, pairs)
    _rotate(TorchRope(), q, k, positions, inv_freq, pairs, attention_scaling)


def _rotate(rope: "TorchRope | CpuRope | TritonRope", q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
            inv_freq: torch.Tensor, pairs: torch.Tensor, attention_scaling: float) -> None:
    """One block's rotation by ``rope``'s three calls, for a caller without a model around it."""
    rope.rotate_(q, k, rope.tables(positions, inv_freq, attention_scaling), rope.prepare(pairs))


def rms_norm_for(device: torch.device | str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """How an RMSNorm on ``device`` computes, chosen once (a module holds the choice, so that
    ``torch.compile`` traces no environment or build check): elastiq's CPU op where it is built,
    the torch ops otherwise. Both take ``(x [..., D], weight [D] float32, eps)`` and compute in
    float32 with one rounding to x's dtype (transformers' arithmetic)."""
    return _rms_norm_op if torch.device(device).type == "cpu" and cpu_ops_built() else rms_norm_torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The CPU op for a contiguous CPU tensor that needs no gradient; the torch ops for any other."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (x.device.type == "cpu" and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)
            and weight.dtype == torch.float32 and not grad):
        return torch.ops.elastiq.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def prepare_q4(codes: torch.Tensor, scales: torch.Tensor, device: torch.device | str = "cpu") -> Q4Weight:
    """The Q4_0 matrix [N, K] of GGUF-packed ``codes`` [N, K/32, 16] (uint8) and ``scales``
    [N, K/32] (float16), repacked for ``q4_linear`` on ``device``; the codes are never re-quantized.
    This is the one place that picks a path, and so the layout the weight is held in."""
    check_q4_args(codes, scales)
    device = torch.device(device)
    path = q4_path(device)
    if path == "triton":
        from .w4a16_triton import prepare_w4a16

        return prepare_w4a16(codes, scales, device)
    return CPU_PREPARE[path](codes, scales, 0)


def q4_path(device: torch.device | str) -> str:
    """The path ``prepare_q4`` takes on ``device``: "triton", "cpu" (elastiq's kernel) or "torch"
    (torch's int4 op). The memory planner asks it too, since each path holds its own layout."""
    device = torch.device(device)
    if _use_triton_on(device):
        return "triton"
    if device.type != "cpu":
        raise ValueError(f"the 4-bit matmul runs on cpu, or on cuda when Triton is importable; got device {device}")
    return "cpu" if cpu_ops_built() else "torch"


# How each CPU path prepares checked codes and scales, w = (q - 8 + zero) * d.
CPU_PREPARE = {"cpu": prepare_cpu_blocks, "torch": prepare_int4pack}


def prepare_q8_matrix(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> Q8Pair | torch.Tensor:
    """A Q8_0 block matrix (``codes`` [N, K/32, 32] int8, ``scales`` [N, K/32] float16) held for the
    path ``prepare_q4`` would pick on ``device``: as two 4-bit halves for a CPU path's matmul
    (``q8.Q8Pair``), or dequantized to ``dtype`` where the Triton path runs (its kernel is 4-bit only)."""
    device = torch.device(device)
    if device.type == "cpu" and not _use_triton_on(device):
        return prepare_q8_pair(codes, scales, CPU_PREPARE[q4_path(device)])
    return dequantize_q8_0(codes, scales).to(device, dtype)


def q4_linear(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] times ``weight`` [N, K] transposed, plus ``bias`` [N]: [..., N] in x's dtype,
    by the path ``weight`` was prepared for (Triton: float16 or bfloat16; the CPU paths: bfloat16).
    The arguments are checked on every call; a caller that checked them once uses ``q4_matmul``."""
    check_q4_linear_args(x, weight, bias, q4_activation_dtypes(weight))
    return q4_matmul(weight)(x, bias)


def q4_activation_dtypes(weight: Q4Weight) -> tuple[torch.dtype, ...]:
    """The activation dtypes the path ``weight`` was prepared for multiplies."""
    return (torch.float16, torch.bfloat16) if weight.path == "triton" else (torch.bfloat16,)


def q4_matmul(weight: Q4Weight | Q8Pair, in_index: torch.Tensor | None = None,
              out_index: torch.Tensor | None = None) -> Q4Matmul:
    """``(x, bias) -> x weight^T + bias`` by the path ``weight`` (4-bit, or an 8-bit pair) was
    prepared for, without argument checks (a ``Q4Linear`` checks its activations' dtype once, when
    its model is built). A matrix held in unit order (``modeling.model.UnitOrdered``) multiplies
    ``x[..., in_index]``, or returns the output's columns ``out_index``: elastiq's CPU op gathers
    in the same call, the other paths around their kernel."""
    if isinstance(weight, Q8Pair):
        return functools.partial(q8_pair_matmul, weight=weight, in_index=in_index, out_index=out_index)
    if weight.path == "cpu":
        return functools.partial(cpu_blocks_matmul, weight=weight, in_index=in_index, out_index=out_index)
    if weight.path == "triton":
        from .w4a16_triton import launch_w4a16

        matmul = functools.partial(launch_w4a16, weight=weight)
    else:
        matmul = functools.partial(int4pack_matmul, weight=weight)
    if in_index is None and out_index is None:
        return matmul
    return functools.partial(gathered_matmul, matmul=matmul, in_index=in_index, out_index=out_index)


def _use_triton_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on the CPU under Triton's interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
