"""Where each 4-bit path keeps a prepared weight's codes: its size, and its codes back.

The runtime predicts its memory from the checkpoint's shapes before it loads anything
(``q4_nbytes``), and changes rate while running by cutting or growing held weights without
the file (``unprepare_q4``, then ``prepare_q4`` again). Both must agree with ``prepare_q4``
(``q4.py``, ``w4a16_triton.py``) exactly; the tests check them against it.

torch's int4pack layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, ``weight_to_int4pack_kernel``)
depends on the CPU build: rows are cut into blocks of BLOCK_N (64 with AVX-512, 32 otherwise), each
block stored as [K, rows/2] bytes; byte j of a full block holds rows lo[j] (low nibble) and hi[j]
(high nibble); a shorter last block pairs adjacent rows. Which layout this torch uses is found once
by packing a probe; an unknown one is an error, never a guess.
"""

from __future__ import annotations

import functools

import torch

from ..quants import BLOCK, PACKED, pack
from .q4 import INT4PACK_N, Q4Weight

_LAYOUTS = {  # BLOCK_N, and the rows of a full block in the low and in the high nibbles of its bytes
    "avx512": (64, slice(0, 32), slice(32, 64)),
    "avx2": (32, slice(0, 16), slice(16, 32)),
    "scalar": (32, slice(0, None, 2), slice(1, None, 2)),
}


def q4_nbytes(out_features: int, in_features: int, path: str) -> int:
    """Bytes a weight [out_features, in_features] prepared for ``path`` holds: "triton" keeps the
    codes and fp16 scales as stored; "torch" pads N to a multiple of 16 and keeps bf16 scales with
    a zero beside each."""
    blocks = in_features // BLOCK
    if path == "triton":
        return out_features * blocks * (PACKED + 2)
    padded = out_features + (-out_features % INT4PACK_N)
    return padded * blocks * (PACKED + 2 * 2)


def unprepare_q4(weight: Q4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The GGUF-packed codes [N, K/32, 16] and fp16 scales [N, K/32] of a prepared ``weight``,
    such that preparing them again gives the same bytes. The torch path holds bf16 scales that
    were rounded from fp16 ones; turning them back to fp16 is exact (a bf16 rounding of an fp16
    value only drops low mantissa bits, which fp16 keeps), so nothing drifts across switches."""
    if weight.path == "triton":
        return weight.packed.transpose(0, 1).contiguous(), weight.scales.T.contiguous()
    padded = weight.scales.shape[1]
    codes = _unpack_int4pack(weight.packed, padded, weight.in_features, int4pack_layout())
    scales = weight.scales[:, :weight.out_features, 0].T.to(torch.float16)
    return pack(codes[:weight.out_features]), scales.contiguous()


def _unpack_int4pack(packed: torch.Tensor, n: int, k: int, layout: str) -> torch.Tensor:
    """Codes [n, k] (uint8) of a torch int4pack weight of ``n`` rows in ``layout``."""
    block_n, lo, hi = _LAYOUTS[layout]
    flat = packed.reshape(-1)
    codes = torch.empty(n, k, dtype=torch.uint8)
    full = n // block_n * block_n
    if full:  # all full blocks at once: [blocks, K, block_n/2] bytes
        chunk = flat[:full * k // 2].view(full // block_n, k, block_n // 2).transpose(1, 2)
        rows = codes[:full].view(full // block_n, block_n, k)
        rows[:, lo] = chunk & 0x0F
        rows[:, hi] = chunk >> 4
    if full < n:  # the short last block pairs adjacent rows
        chunk = flat[full * k // 2:].view(k, (n - full) // 2).T
        codes[full:][0::2] = chunk & 0x0F
        codes[full:][1::2] = chunk >> 4
    return codes


@functools.cache
def int4pack_layout() -> str:
    """The int4pack layout of this torch build: a probe of one full block of 64 rows and a short
    one of 16 is packed by torch and unpacked with each known layout."""
    probe = torch.randint(0, 16, (80, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for layout in _LAYOUTS:
        if torch.equal(_unpack_int4pack(packed, 80, 64, layout), probe.to(torch.uint8)):
            return layout
    raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout elastiq does not know, so "
                       "4-bit weights cannot change rate in memory; reload the checkpoint at the new rate")
