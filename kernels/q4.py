"""4-bit weight-only matmul: the prepared weight shared by every path, and the torch path for CPU.

A checkpoint's Q4_0 matrix [N, K] (GGUF-packed codes [N, K/32, 16], fp16 scales [N, K/32], see
``elastiq.quants``) is repacked once, at load time, into the layout of the path that will multiply
by it, and held as a ``Q4Weight``. The torch path (this module) uses torch's int4 CPU matmul,
``aten._weight_int4pack_mm_for_cpu``: bfloat16 activations, bf16 scales, fp32 accumulation. That
op wants N to be a multiple of 16, and pruned q/k projections have N = heads * 2u (e.g. 486), so
the weight is padded with zero rows to whole tiles of torch's layout (32 or 64 rows, found by
``int4pack_tile``) and the output is sliced back; whole tiles let a held weight be cut and grown
in place when the rate changes (``q4_layout.q4_resize``).
``kernels.prepare_q4`` / ``kernels.q4_linear`` pick the path; the Triton path is ``w4a16_triton``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..quants import BLOCK, PACKED

INT4PACK_N = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
REPACK_BYTES = 16 << 20  # int32 codes repacked at a time
TILES = (16, 32, 64, 128)  # row tiles torch's int4pack could use (BLOCK_N: 32 with AVX2, 64 with AVX-512)


@dataclass(frozen=True)
class Q4Weight:
    """A Q4_0 matrix [N, K] prepared for one path's matmul on one device.

    ``path`` is "torch" (``packed``: torch's int4pack tiles of the matrix padded to whole tiles,
    ``int4pack_rows``; ``scales``: bf16 scales-and-zeros [K/32, padded N, 2]; the padding rows hold
    zeros, or the codes of rows a wider rate had there) or "triton" (``packed``: the
    GGUF-packed codes block-major [K/32, N, 16]; ``scales``: fp16 [K/32, N]).
    """

    out_features: int  # N (unpadded)
    in_features: int  # K
    path: str
    packed: torch.Tensor
    scales: torch.Tensor
    zero: int = 0  # torch path: w = (q - 8 + zero) * d (0 for Q4_0; the low half of a Q8_0 matrix has 8)

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


def prepare_int4pack(codes: torch.Tensor, scales: torch.Tensor, zero: int = 0) -> Q4Weight:
    """The torch path's ``Q4Weight`` (CPU) of checked codes and scales, w = (q - 8 + ``zero``) * d:
    N padded with zero rows (codes 0, scale 0) to whole tiles of torch's layout (``int4pack_rows``),
    then repacked by torch."""
    N, blocks, _ = codes.shape
    rows = int4pack_rows(N)
    packed = pack_int4(codes.cpu(), rows)
    return Q4Weight(N, blocks * BLOCK, "torch", packed,
                    int4pack_scales(F.pad(scales.cpu(), (0, 0, 0, rows - N)), zero), zero)


def pack_int4(codes: torch.Tensor, rows: int, offset: int = 0) -> torch.Tensor:
    """torch's int4pack [rows, K/2] of a matrix of ``rows`` rows (whole tiles) that holds the
    GGUF-packed ``codes`` [R, K/32, 16] at rows offset..offset+R and zero codes elsewhere. torch's
    repack takes the codes as int32, 8x their packed bytes, so a large matrix is repacked in row
    blocks of at most ``REPACK_BYTES`` of int32 codes, each a whole number of tiles, whose bytes
    concatenate to the whole matrix's (``int4pack_tile`` checks that torch's layout does; without
    a known tile, the matrix is repacked whole)."""
    R, blocks, _ = codes.shape
    k = blocks * BLOCK
    tile = int4pack_tile()
    step = rows if tile is None else max(tile, REPACK_BYTES // (k * 4) // tile * tile)
    parts = []
    for start in range(0, rows, step):
        end = min(start + step, rows)
        chunk = torch.zeros(end - start, blocks, BLOCK, dtype=torch.int32)
        lo, hi = max(start, offset), min(end, offset + R)
        if lo < hi:  # GGUF order: byte j of a block holds codes j (low nibble) and j + 16 (high)
            part = codes[lo - offset:hi - offset]
            chunk[lo - start:hi - start, :, :PACKED] = part & 0x0F
            chunk[lo - start:hi - start, :, PACKED:] = part >> 4
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk.view(end - start, k), 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def int4pack_scales(scales: torch.Tensor, zero: int = 0) -> torch.Tensor:
    """The int4 op's bf16 scales-and-zeros [K/32, N, 2] of fp16 ``scales`` [N, K/32]: the op computes
    w = (q - 8) * d + z, so z = ``zero`` * d (0: exactly Q4_0)."""
    s = scales.float().T
    return torch.stack((s, zero * s), dim=-1).to(torch.bfloat16)


def int4pack_rows(n: int) -> int:
    """Rows a matrix of ``n`` rows holds in the torch path: whole tiles (or whole 16s without a known tile)."""
    step = int4pack_tile() or INT4PACK_N
    return -(-n // step) * step


@functools.cache
def int4pack_tile() -> int | None:
    """Rows of one tile of this torch build's int4pack layout, found by probing torch's own repack:
    the smallest of ``TILES`` such that (1) a matrix's bytes are its tiles' bytes one after another,
    (2) each tile is laid out input-channel-major, so the first k channels of every tile are the
    repack of the first k channels, and (3) matrices whose nonzero codes lie apart repack to bytes
    that combine by OR. A held weight is cut and grown on these three facts alone, never by
    decoding torch's bytes; None when the layout has no such tile (then rates are changed by
    repacking from the checkpoint's codes)."""
    gen = torch.Generator().manual_seed(0)
    rows, k = 2 * TILES[-1], 4 * BLOCK
    probe = torch.randint(0, 16, (rows, k), generator=gen, dtype=torch.int32)
    repack = lambda w: torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.contiguous(), 1)  # noqa: E731
    whole = repack(probe)
    apart = torch.rand(rows, k, generator=gen) < 0.5
    combined = torch.equal(repack(probe * apart) | repack(probe * ~apart), whole)
    for tile in TILES:
        tiles = torch.cat([repack(probe[i:i + tile]) for i in range(0, rows, tile)])
        prefix = whole.reshape(rows // tile, k, tile // 2)[:, :2 * BLOCK].reshape(rows, BLOCK)
        if combined and torch.equal(tiles, whole) and torch.equal(repack(probe[:, :2 * BLOCK]), prefix):
            return tile
    return None


def q4_linear_torch(x: torch.Tensor, weight: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (bfloat16, CPU) times the torch path's ``weight`` transposed, plus ``bias``:
    [..., N] bfloat16, contiguous. The int4 op accumulates in fp32 and rounds its output to bf16;
    the bias is added to that in bf16."""
    check_q4_linear_args(x, weight, bias, (torch.bfloat16,))
    return int4pack_matmul(x, bias, weight=weight)


def gathered_matmul(x: torch.Tensor, bias: torch.Tensor | None, *, matmul: Callable[..., torch.Tensor],
                    in_index: torch.Tensor | None, out_index: torch.Tensor | None) -> torch.Tensor:
    """``matmul(x[..., in_index], bias)[..., out_index]`` (either index None: not taken), for the
    paths whose kernel does not gather itself."""
    y = matmul(x if in_index is None else x.index_select(-1, in_index), bias)
    return y if out_index is None else y.index_select(-1, out_index)


def int4pack_matmul(x: torch.Tensor, bias: torch.Tensor | None, *, weight: Q4Weight) -> torch.Tensor:
    """``q4_linear_torch`` without its argument checks (the hot path of a model that checked them)."""
    rows = x.reshape(-1, weight.in_features).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, BLOCK, weight.scales)
    if out.shape[1] != weight.out_features:
        out = out[:, :weight.out_features].contiguous()
    out = out.unflatten(0, x.shape[:-1])
    return out if bias is None else out + bias
