"""8-bit matmuls and lookup for matrices stored as GGUF ``Q8_0``.

A ``Q8_0`` matrix [N, K] (int8 codes [N, K/32, 32], fp16 scales [N, K/32], w = d * q; see
``elastiq.quants``) is held block-major, codes [K/32, N, 32] and scales [K/32, N], so that block b
of every row is one contiguous [N, 32] matrix. A tied embedding and head share that one copy: the
lookup gathers rows of every block, the matmul multiplies block by block.

On CPU, a few rows of activations (decoding, the last position of a prefill) go through torch's
int8 weight-only matmul ``aten._weight_int8pack_mm`` once per block (its scales are per output
row, which is what one block's scales are) and accumulate in float32: 1 byte a weight read once,
about 3x faster than a bfloat16 ``F.linear`` of the dequantized head on SmolLM2's 49152 x 576.
That op takes its scales in the activations' dtype, so they are held in it (bfloat16 on CPU, as
torch's int4 path holds the Q4_0 scales). More rows, or other devices, dequantize the weight a
slice of rows at a time and use ``F.linear``.

A block matrix kept at 8 bits (a value projection, by default) is multiplied as two 4-bit halves
by torch's int4 CPU matmul (``Q8Pair``, ``elastiq.quants.q8_0_halves``): 1 byte a weight read in
two calls, the int4 kernels' speed, and a pruned axis cut and grown as a Q4_0 one is
(``q4_layout``). Holding it dequantized in bf16 instead, the first version, costs 2 bytes a
weight and decoded SmolLM2 0.78-0.88x as fast as the all-4-bit model (``benchmarks/embedding_bits.py``
on that version; the torch profiler put oneDNN's bf16 matmul of [1, 576] x [576, 192] at about
130 us a call between the int4 calls, 20 us alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..quants import BLOCK, q8_0_halves
from .q4 import Q4Weight, gathered_matmul, int4pack_matmul, prepare_int4pack
from .q4_cpu import cpu_blocks_matmul

INT8PACK_ROWS = 8  # activation rows up to which the blockwise int8 matmul beats dequantizing
DEQUANT_ROWS = 8192  # output rows dequantized at a time otherwise


@dataclass(frozen=True)
class Q8Weight:
    """A Q8_0 matrix [N, K] held block-major: codes [K/32, N, 32] (int8), scales [K/32, N]."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    @property
    def in_features(self) -> int:
        return self.codes.shape[0] * BLOCK

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def prepare_q8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> Q8Weight:
    """The Q8_0 matrix of ``codes`` [N, K/32, 32] (int8) and ``scales`` [N, K/32] (float16), held
    block-major on ``device`` with its scales in ``dtype`` (the activations')."""
    if codes.dim() != 3 or codes.shape[-1] != BLOCK or scales.shape != codes.shape[:2]:
        raise ValueError(f"expected Q8_0 codes [N, K/32, {BLOCK}] and scales [N, K/32]; got codes "
                         f"{tuple(codes.shape)}, scales {tuple(scales.shape)}")
    if codes.dtype != torch.int8 or scales.dtype != torch.float16:
        raise TypeError(f"Q8_0 codes must be int8 and scales float16; got {codes.dtype} and {scales.dtype}")
    return Q8Weight(codes.to(device).movedim(1, 0).contiguous(), scales.to(device, dtype).T.contiguous())


def q8_embedding(ids: torch.Tensor, weight: Q8Weight) -> torch.Tensor:
    """Rows ``ids`` [...] of the matrix, dequantized: [..., K] in the scales' dtype."""
    codes = weight.codes[:, ids].movedim(0, -2)  # [..., K/32, 32]
    scales = weight.scales[:, ids].movedim(0, -1)  # [..., K/32]
    return (codes.to(scales.dtype) * scales[..., None]).flatten(-2)


def q8_linear(x: torch.Tensor, weight: Q8Weight) -> torch.Tensor:
    """``x`` [..., K] times the matrix [N, K] transposed: [..., N] in x's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x must be [..., {weight.in_features}] for a [{weight.out_features}, "
                         f"{weight.in_features}] weight; got {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.device.type == "cpu" and rows.shape[0] <= INT8PACK_ROWS and x.dtype == weight.scales.dtype:
        out = torch.zeros(rows.shape[0], weight.out_features, dtype=torch.float32)
        for b in range(weight.codes.shape[0]):
            out += torch.ops.aten._weight_int8pack_mm(rows[:, b * BLOCK:(b + 1) * BLOCK].contiguous(),
                                                      weight.codes[b], weight.scales[b])
        return out.to(x.dtype).view(*x.shape[:-1], -1)
    parts = []
    for start in range(0, weight.out_features, DEQUANT_ROWS):
        codes = weight.codes[:, start:start + DEQUANT_ROWS]
        w = (codes.to(x.dtype) * weight.scales[:, start:start + DEQUANT_ROWS, None].to(x.dtype))
        parts.append(F.linear(rows, w.movedim(0, 1).flatten(1)))
    return torch.cat(parts, dim=-1).view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class Q8Pair:
    """A Q8_0 matrix [N, K] as its two 4-bit halves prepared for torch's int4 CPU matmul: ``high``
    (codes (q + 128) >> 4, scales 16 d) and ``low`` (codes (q + 128) & 15, scales d, zero point 8),
    so that w = high + low exactly (``elastiq.quants.q8_0_halves``)."""

    high: Q4Weight
    low: Q4Weight

    @property
    def out_features(self) -> int:
        return self.high.out_features

    @property
    def in_features(self) -> int:
        return self.high.in_features

    @property
    def nbytes(self) -> int:
        return self.high.nbytes + self.low.nbytes


def prepare_q8_pair(codes: torch.Tensor, scales: torch.Tensor,
                    prepare: Callable[[torch.Tensor, torch.Tensor, int], Q4Weight] = prepare_int4pack) -> Q8Pair:
    """The ``Q8Pair`` (CPU) of Q8_0 ``codes`` [N, K/32, 32] (int8) and ``scales`` [N, K/32] (float16),
    each half held by ``prepare(codes, scales, zero)`` (a CPU path's, torch's int4pack by default)."""
    (high_codes, high_scales), (low_codes, low_scales) = q8_0_halves(codes.cpu(), scales.cpu())
    return Q8Pair(prepare(high_codes, high_scales, 0), prepare(low_codes, low_scales, 8))


def q8_pair_matmul(x: torch.Tensor, bias: torch.Tensor | None, *, weight: Q8Pair,
                   in_index: torch.Tensor | None = None, out_index: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (bfloat16, CPU) times ``weight`` transposed, plus ``bias``: [..., N] bfloat16,
    the halves' products (fp32 accumulation, each rounded to bf16) added in bf16, by the CPU path
    the halves were prepared for; ``in_index`` / ``out_index`` gather as ``kernels.q4_matmul`` does."""
    if weight.high.path == "cpu":
        def half(w: Q4Weight, b: torch.Tensor | None) -> torch.Tensor:
            return cpu_blocks_matmul(x, b, weight=w, in_index=in_index, out_index=out_index)

        return half(weight.high, None) + half(weight.low, bias)
    def pair(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4pack_matmul(x, None, weight=weight.high) + int4pack_matmul(x, bias, weight=weight.low)

    return gathered_matmul(x, bias, matmul=pair, in_index=in_index, out_index=out_index)
