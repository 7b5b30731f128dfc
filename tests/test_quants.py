"""Q4_0 and Q8_0 codes: the GGUF grids and packing bit for bit, and every backend's view of the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from elastiq import ElastiqError
from elastiq.kernels.q4 import int4pack_scales, pack_int4
from elastiq.quants import (dequantize, gguf_blocks, gguf_q8_0_blocks, matmulnbits, matmulnbits_q8, pack, q4_0_codes,
                            q4_0_scales, quantize_q8_0, quantize_rtn, unpack)


def _weights(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :32] = 0  # an all-zero block: scale 0, codes 8
    w[5, 40] = -1.0  # a block dominated by one negative outlier
    return w


def test_blocks_read_by_gguf_equal_our_dequantization():
    packed, scales = quantize_rtn(_weights())
    raw = gguf_blocks(packed, scales).numpy().reshape(48, -1)
    ours = dequantize(packed, scales)
    theirs = gguf_dequantize(raw, GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours.numpy(), theirs)


def test_bytes_match_gguf_quantize_when_the_scale_is_exact_in_fp16():
    """gguf-py picks codes with the fp32 scale and rounds it to fp16 after; where the scale is
    exact in fp16 (here powers of two) both rules must give the same bytes."""
    g = torch.Generator().manual_seed(1)
    d = 2.0 ** -torch.randint(4, 9, (16, 4, 1), generator=g).float()  # one scale per block
    codes = torch.randint(0, 16, (16, 4, 32), generator=g).float()
    codes[..., 7] = 0  # every block's extreme: -8 d
    noise = (torch.rand(16, 4, 32, generator=g) - 0.5) * 0.8  # stay 0.1 d away from rounding ties
    noise = torch.where(codes == 0, noise.abs(), noise)  # nothing beyond -8 d: it stays the extreme
    noise[..., 7] = 0
    w = (d * (codes - 8 + noise)).flatten(1)
    raw = gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(16, 4, 18)
    assert np.array_equal(gguf_blocks(*quantize_rtn(w)).numpy(), raw)


def test_codes_round_to_the_nearest_grid_point():
    w = _weights()
    scales = q4_0_scales(w)
    codes = q4_0_codes(w, scales)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    grid = (torch.arange(16).float() - 8)[None, :] * scales.float().repeat_interleave(32, -1).reshape(-1, 1)
    nearest_err = (w.reshape(-1, 1) - grid).abs().min(-1).values
    ours_err = (w - dequantize(pack(codes), scales)).abs().reshape(-1)
    assert torch.all(ours_err <= nearest_err + 1e-7)
    assert torch.all(codes[3, :32] == 8) and scales[3, 0] == 0
    assert codes[5, 40] == 0  # the outlier is the block's extreme: code 0, exact


def test_pack_unpack_round_trip_and_layout():
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    packed = pack(codes)
    assert packed.shape == (4, 2, 16)
    assert torch.equal(unpack(packed), codes)
    assert packed[0, 0, 0] == codes[0, 0] | (codes[0, 16] << 4)  # GGUF: code j low, code j + 16 high


def test_matmulnbits_is_a_repack_of_the_same_codes():
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    nbits = matmulnbits(pack(codes))
    assert nbits.shape == (4, 2, 16)
    assert torch.equal(torch.stack((nbits & 0x0F, nbits >> 4), -1).flatten(-3), codes)


def test_torch_int4_matmul_uses_the_same_grid():
    w = _weights(64, 128)
    packed, scales = quantize_rtn(w)
    weight, scales_zeros = pack_int4(packed, 64), int4pack_scales(scales)
    x = torch.randn(5, 128).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, 32, scales_zeros).float()
    ref = x.float() @ (dequantize(packed, scales.to(torch.bfloat16).half())).T
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 activations and accumulation


def test_input_axis_must_hold_whole_blocks():
    with pytest.raises(ElastiqError, match="an input axis of 40 is not a multiple of the Q4_0 block of 32"):
        quantize_rtn(torch.zeros(2, 40))


def test_q8_0_codes_fit_their_fp16_scale_and_gguf_reads_them_back():
    w = _weights()
    t = quantize_q8_0(w)
    assert t.codes.dtype == torch.int8 and t.codes.shape == (48, 8, 32) and t.scales.dtype == torch.float16
    assert t.shape == (48, 256)
    d = t.scales.float()[..., None]
    error = (t.dequantize() - w).view(48, 8, 32).abs()
    assert (error <= d / 2 + 1e-7).all()  # round to nearest on the stored scale's grid
    assert (t.scales[3, 0] == 0) and (t.codes[3, 0] == 0).all()  # an all-zero block
    assert t.codes[5, 1, 8] == -127  # the outlier is the block's extreme
    raw = gguf_q8_0_blocks(t.codes, t.scales).numpy().reshape(48, -1)
    assert raw.shape == (48, 8 * 34)
    assert np.array_equal(gguf_dequantize(raw, GGMLQuantizationType.Q8_0), t.dequantize().numpy())


def test_q8_0_bytes_match_gguf_quantize_when_the_scale_is_exact_in_fp16():
    g = torch.Generator().manual_seed(2)
    d = 2.0 ** -torch.randint(4, 9, (16, 4, 1), generator=g).float()
    codes = torch.randint(-126, 127, (16, 4, 32), generator=g).float()
    codes[..., 5] = 127  # every block's extreme: 127 d, so gguf's d = max / 127 is exact
    noise = (torch.rand(16, 4, 32, generator=g) - 0.5) * 0.8
    w = ((codes + noise) * d).flatten(-2)
    w[..., 5::32] = (127 * d).squeeze(-1)
    t = quantize_q8_0(w)
    theirs = gguf_quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    assert np.array_equal(gguf_q8_0_blocks(t.codes, t.scales).numpy().reshape(16, -1), theirs)


def test_matmulnbits_q8_is_the_codes_plus_128():
    t = quantize_q8_0(_weights())
    assert torch.equal(matmulnbits_q8(t.codes).int() - 128, t.codes.int())
