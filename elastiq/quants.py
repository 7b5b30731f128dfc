"""The code formats of the nested checkpoint: GGUF ``Q4_0`` (most quantized matrices) and ``Q8_0``
(the matrices a quantization keeps at 8 bits: by default every value projection, and the token
embedding and LM head when asked for), and their views for each backend.

One ``Q4_0`` block holds 32 consecutive weights along a matrix's input axis, one fp16 scale ``d`` and
codes ``q`` in 0..15 with w = d * (q - 8). The checkpoint stores the codes packed as GGUF packs
them (byte j of a block: code j in the low nibble, code j + 16 in the high nibble), so a GGUF
export copies bytes. onnxruntime's ``MatMulNBits`` packs codes 2i and 2i + 1 in one byte and torch's
int4 CPU matmul wants its own tile layout with bf16 scales: both are repacks of the same codes,
never a re-quantization. A ``Q8_0`` block holds 32 weights as int8 codes ``q`` and one fp16
scale, w = d * q, stored as GGUF stores them (the scale, then the 32 codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ElastiqError

BLOCK = 32
PACKED = BLOCK // 2  # bytes of codes per block


@dataclass(frozen=True)
class _Blocks:
    """A matrix [out, in] quantized in blocks of 32 along its input axis: codes [out, in/32, ...]
    and fp16 scales [out, in/32]."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * BLOCK

    def to(self, device: torch.device | str):
        """The same matrix with its codes and scales on ``device``."""
        return type(self)(self.codes.to(device), self.scales.to(device))


class QuantizedTensor(_Blocks):
    """A Q4_0 matrix [out, in]: GGUF-packed codes [out, in/32, 16] (uint8), fp16 scales [out, in/32]."""

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales)


class Q8Tensor(_Blocks):
    """A Q8_0 matrix [out, in]: int8 codes [out, in/32, 32], fp16 scales [out, in/32]."""

    def dequantize(self) -> torch.Tensor:
        return dequantize_q8_0(self.codes, self.scales)


Quantized = QuantizedTensor | Q8Tensor
FORMATS = {"q4_0": QuantizedTensor, "q8_0": Q8Tensor}  # the manifest's name of each format
FORMAT_NAMES = {cls: name for name, cls in FORMATS.items()}
BLOCK_BYTES = {"q4_0": PACKED + 2, "q8_0": BLOCK + 2}  # codes and the fp16 scale of one block


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.shape[-1] % BLOCK:
        raise ElastiqError(f"an input axis of {w.shape[-1]} is not a multiple of the Q4_0 block of {BLOCK}")
    return w.unflatten(-1, (w.shape[-1] // BLOCK, BLOCK))


def q4_0_scales(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest scales [..., K/32] (fp16) of ``w`` [..., K]: the block's largest-magnitude
    weight maps to code 0 (d = that weight / -8), as ggml chooses them."""
    blocks = _blocks(w.float())
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return (extreme / -8).to(torch.float16)


def round_to_grid(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes (float, 0..15) of ``w`` on the grid d * (q - 8), ``d`` broadcast against ``w``
    (ggml's rule: truncate w / d + 8.5; a zero scale gives code 8)."""
    d = d.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.trunc(w.float() * inv + 8.5).clamp(0, 15)


def q4_0_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (uint8, 0..15) of ``w`` [..., K] on the grid of fp16 ``scales`` [..., K/32]:
    the scale is already fp16, so the codes fit the scale that is stored (ggml rounds after)."""
    return round_to_grid(_blocks(w), scales[..., None]).to(torch.uint8).flatten(-2)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """GGUF packing: codes [..., K] -> bytes [..., K/32, 16]."""
    blocks = _blocks(codes)
    return blocks[..., :PACKED] | (blocks[..., PACKED:] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] from GGUF-packed bytes [..., K/32, 16]."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weights [..., K] of GGUF-packed codes [..., K/32, 16] and fp16 scales [..., K/32]."""
    codes = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float() - 8
    return (codes * scales.float()[..., None]).flatten(-2)


def quantize_rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest Q4_0 of ``w`` [..., K]: (GGUF-packed codes, fp16 scales)."""
    scales = q4_0_scales(w)
    return pack(q4_0_codes(w, scales)), scales


def gguf_blocks(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The raw GGUF ``Q4_0`` tensor data [..., K/32, 18]: each block's fp16 scale, then its codes."""
    return torch.cat((scales[..., None].view(torch.uint8), packed), dim=-1)


def matmulnbits(packed: torch.Tensor) -> torch.Tensor:
    """onnxruntime ``MatMulNBits`` (bits 4, block 32) weight bytes [N, K/32, 16] of the same codes:
    byte i of a block holds codes 2i (low nibble) and 2i + 1 (high nibble); zero point 8."""
    codes = torch.cat((packed & 0x0F, packed >> 4), dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def q8_0_scales(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest scales [..., K/32] (fp16) of ``w`` [..., K]: d = max |w| / 127 per block."""
    return (_blocks(w.float()).abs().amax(-1) / 127).to(torch.float16)


def q8_0_round(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes (float, -128..127) of ``w`` on the grid d * q, ``d`` broadcast against ``w`` (a zero scale gives 0)."""
    d = d.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(w.float() * inv).clamp(-128, 127)


def q8_0_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes [..., K/32, 32] (int8) of ``w`` [..., K] on the grid of fp16 ``scales`` [..., K/32]."""
    return q8_0_round(_blocks(w), scales[..., None]).to(torch.int8)


def quantize_q8_0(w: torch.Tensor) -> Q8Tensor:
    """Round-to-nearest Q8_0 of ``w`` [..., K]: d = max |w| / 127 per block, rounded to fp16
    before the codes round(w / d) are chosen (so they fit the stored scale)."""
    scales = q8_0_scales(w)
    return Q8Tensor(q8_0_codes(w, scales), scales)


def dequantize_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weights [..., K] of Q8_0 codes [..., K/32, 32] and fp16 scales [..., K/32]."""
    return (codes.float() * scales.float()[..., None]).flatten(-2)


def gguf_q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The raw GGUF ``Q8_0`` tensor data [..., K/32, 34]: each block's fp16 scale, then its codes."""
    return torch.cat((scales[..., None].view(torch.uint8), codes.view(torch.uint8)), dim=-1)


def matmulnbits_q8(codes: torch.Tensor) -> torch.Tensor:
    """onnxruntime ``MatMulNBits`` / ``GatherBlockQuantized`` (bits 8, block 32) weight bytes
    [N, K/32, 32] of Q8_0 codes: q + 128 (the top bit flipped), for the default zero point 128."""
    return codes.view(torch.uint8) ^ 0x80


def q8_0_halves(codes: torch.Tensor, scales: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                        tuple[torch.Tensor, torch.Tensor]]:
    """A Q8_0 matrix as two 4-bit ones for torch's int4 matmul: with u = q + 128 = 16 a + b,
    d q = 16 d (a - 8) + d (b - 8) + 8 d. Returns (GGUF-packed codes, fp16 scales) of the high half
    (codes a, scales 16 d: a Q4_0 matrix) and of the low half (codes b, scales d), whose grid needs
    a zero point of 8 scales (``Q4Weight.zero``). 16 d is exact in fp16, so nothing is rounded."""
    u = codes.to(torch.int16) + 128
    return ((pack((u >> 4).to(torch.uint8).flatten(-2)), scales * 16),
            (pack((u & 0x0F).to(torch.uint8).flatten(-2)), scales))
