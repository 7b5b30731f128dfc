"""4-bit weight-only matmul: the prepared weight shared by every path, and the torch path for CPU.

A checkpoint's Q4_0 matrix [N, K] (GGUF-packed codes [N, K/32, 16], fp16 scales [N, K/32], see
``elastiq.quants``) is repacked once, at load time, into the layout of the path that will multiply
by it, and held as a ``Q4Weight``. The torch path (this module) uses torch's int4 CPU matmul,
``aten._weight_int4pack_mm_for_cpu``: bfloat16 activations, bf16 scales, fp32 accumulation. That
op wants N to be a multiple of 16, and pruned q/k projections have N = heads * 2u (e.g. 486), so
the weight is padded with zero rows to the next multiple of 16 and the output is sliced back.
``kernels.prepare_q4`` / ``kernels.q4_linear`` pick the path; the Triton path is ``w4a16_triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quants import BLOCK, PACKED, torch_int4

INT4PACK_N = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
REPACK_TILE = 64  # rows of the widest int4pack tile (AVX-512); smaller tiles divide it
REPACK_BYTES = 16 << 20  # int32 codes repacked at a time


@dataclass(frozen=True)
class Q4Weight:
    """A Q4_0 matrix [N, K] prepared for one path's matmul on one device.

    ``path`` is "torch" (``packed``: torch's int4pack tiles of the matrix padded to N a multiple
    of 16; ``scales``: bf16 scales-and-zeros [K/32, padded N, 2]) or "triton" (``packed``: the
    GGUF-packed codes block-major [K/32, N, 16]; ``scales``: fp16 [K/32, N]).
    """

    out_features: int  # N (unpadded)
    in_features: int  # K
    path: str
    packed: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes the prepared tensors hold in memory (what the runtime's memory prediction counts)."""
        return self.packed.nbytes + self.scales.nbytes


def check_q4_args(codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise ValueError (shapes) or TypeError (dtypes) unless ``codes`` [N, K/32, 16] uint8 and
    ``scales`` [N, K/32] float16 are one Q4_0 matrix as ``elastiq.quants`` stores it."""
    if codes.dim() != 3 or codes.shape[-1] != PACKED or scales.shape != codes.shape[:2]:
        raise ValueError(f"expected GGUF-packed codes [N, K/32, {PACKED}] and scales [N, K/32] (K a multiple of "
                         f"{BLOCK}); got codes {tuple(codes.shape)}, scales {tuple(scales.shape)}")
    if codes.dtype != torch.uint8 or scales.dtype != torch.float16:
        raise TypeError(f"codes must be uint8 and scales float16; got {codes.dtype} and {scales.dtype}")
    if codes.device != scales.device:
        raise ValueError(f"codes and scales must be on one device; got {codes.device} and {scales.device}")


def check_q4_linear_args(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None,
                         dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise ValueError or TypeError unless ``x`` [..., K] in one of ``dtypes`` and ``bias`` [N]
    (or None) in x's dtype are on ``weight``'s device, K being ``weight``'s in_features."""
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x must be [..., {weight.in_features}] for a [{weight.out_features}, "
                         f"{weight.in_features}] weight; got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"the {weight.path} 4-bit path takes {names} activations; got {x.dtype}")
    if bias is not None and bias.shape != (weight.out_features,):
        raise ValueError(f"bias must be [{weight.out_features}]; got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have x's dtype {x.dtype}; got {bias.dtype}")
    devices = {t.device for t in (x, weight.packed, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, the weight and the bias must be on one device; got {sorted(map(str, devices))}")


def prepare_int4pack(codes: torch.Tensor, scales: torch.Tensor) -> Q4Weight:
    """The torch path's ``Q4Weight`` (CPU) of checked codes and scales: N padded with zero rows
    (codes 0, scale 0) to a multiple of 16, then ``quants.torch_int4``. torch's repack takes the
    codes as int32, 8x their packed bytes, so a large matrix is repacked in row blocks of at most
    ``REPACK_BYTES`` of int32 codes: each a whole number of the layout's 64-row tiles, so that the
    blocks' bytes concatenate to the whole matrix's."""
    N, blocks, _ = codes.shape
    pad = -N % INT4PACK_N
    codes = F.pad(codes.cpu(), (0, 0, 0, 0, 0, pad))
    scales = F.pad(scales.cpu(), (0, 0, 0, pad))
    rows = max(REPACK_TILE, REPACK_BYTES // (blocks * BLOCK * 4) // REPACK_TILE * REPACK_TILE)
    parts = [torch_int4(codes[i:i + rows], scales[i:i + rows]) for i in range(0, N + pad, rows)]
    packed = parts[0][0] if len(parts) == 1 else torch.cat([p for p, _ in parts])
    scales_and_zeros = parts[0][1] if len(parts) == 1 else torch.cat([z for _, z in parts], dim=1)
    return Q4Weight(N, blocks * BLOCK, "torch", packed, scales_and_zeros)


def q4_linear_torch(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (bfloat16, CPU) times the torch path's ``weight`` transposed, plus ``bias``:
    [..., N] bfloat16, contiguous. The int4 op accumulates in fp32 and rounds its output to bf16;
    the bias is added to that in bf16."""
    check_q4_linear_args(x, weight, bias, (torch.bfloat16,))
    return int4pack_matmul(x, bias, weight=weight)


def int4pack_matmul(x: torch.Tensor, bias: torch.Tensor | None, *, weight: Q4Weight) -> torch.Tensor:
    """``q4_linear_torch`` without its argument checks (the hot path of a model that checked them)."""
    rows = x.reshape(-1, weight.in_features).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, BLOCK, weight.scales)
    if out.shape[1] != weight.out_features:
        out = out[:, :weight.out_features].contiguous()
    out = out.unflatten(0, x.shape[:-1])
    return out if bias is None else out + bias
