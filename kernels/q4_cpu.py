"""elastiq's 4-bit CPU matmul (``cpu_ops``' ``q4_matmul``): the checkpoint's Q4_0 blocks by bfloat16 activations.

The weight stays the checkpoint's GGUF blocks, row-major (``Q4Weight`` path "cpu"): a narrower rate
is a prefix of rows or of each row's blocks, so a resize is a slice, never a repack, and a tied
head multiplies by the embedding's own blocks. Where the CPU ops are not built, ``kernels.q4_path``
says "torch" and torch's int4 op (``q4.py``) runs instead.
"""

from __future__ import annotations

import torch

from ..quants import BLOCK
from .q4 import Q4Weight


def prepare_cpu_blocks(codes: torch.Tensor, scales: torch.Tensor, zero: int = 0) -> Q4Weight:
    """The "cpu" path's ``Q4Weight`` of checked GGUF-packed ``codes`` [N, K/32, 16] and fp16
    ``scales`` [N, K/32]: the same bytes, contiguous on the CPU."""
    N, blocks, _ = codes.shape
    return Q4Weight(N, blocks * BLOCK, "cpu", codes.cpu().contiguous(), scales.cpu().contiguous(), zero)


def cpu_blocks_matmul(x: torch.Tensor, bias: torch.Tensor | None, *, weight: Q4Weight,
                      in_index: torch.Tensor | None = None, out_index: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (bfloat16, CPU; with ``in_index``, its columns ``in_index``) times the "cpu"
    path's ``weight`` transposed, plus ``bias`` (bf16, added in bf16), then with ``out_index`` the
    output's columns ``out_index``: [..., N] bfloat16, in one call of the op, without argument
    checks here."""
    return torch.ops.elastiq.q4_matmul(x, weight.packed, weight.scales, weight.zero, bias, in_index, out_index)
