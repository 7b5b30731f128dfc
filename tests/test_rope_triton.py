"""The fused RoPE gather's Triton kernel, run on CPU through Triton's interpreter, against the torch path.

``triton.jit`` chooses the interpreter when the kernel is decorated, so ``TRITON_INTERPRET=1`` is
set before ``elastiq.kernels.rope_triton`` is imported, and set again around each test (the
interpreter reads it at launch too). It is restored right after the import so that it does not
leak into other test modules, which would then send every CPU RoPE through the slow interpreter.

Tolerances: float32 within 1e-5 absolute. The kernel takes cos/sin from numpy here (libdevice on
a GPU) and the torch path from torch's vectorised CPU math; both are within about one ulp, so on
outputs of magnitude below ~6 (ulp 4.8e-7) the two differ by a few ulps. A wrong pair index,
group or position would be off by O(1). float16 within one fp16 ulp (relative 2^-10): a one-ulp
float32 difference can flip the final rounding. bfloat16 within one bf16 ulp (relative 2^-7):
the interpreter converts float32 to bfloat16 by truncation, where a GPU rounds to nearest even.
"""

from __future__ import annotations

import os

import pytest
import torch

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed; the kernel's CPU tests need its interpreter")
    from elastiq import kernels
    from elastiq.kernels import apply_rope_gather, rope_gather_torch_
    from elastiq.kernels import rope_triton
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

HALF_D = 32  # SmolLM2's head size d = 64
TOLERANCE = {torch.float32: dict(rtol=0, atol=1e-5), torch.float16: dict(rtol=2 ** -10, atol=1e-5),
             torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def inv_freq() -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, 2 * HALF_D, 2, dtype=torch.float32) / (2 * HALF_D))


def make(B: int, T: int, G: int, per_group: int, u: int, dtype=torch.float32, seed: int = 0):
    """Random q [B, T, H, 2u], k [B, T, G, 2u] and a random choice of u pairs per KV group."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G * per_group, 2 * u, generator=gen).to(dtype)
    k = torch.randn(B, T, G, 2 * u, generator=gen).to(dtype)
    pairs = torch.stack([torch.randperm(HALF_D, generator=gen)[:u] for _ in range(G)])
    return q, k, pairs


def check_against_torch(q, k, positions, pairs, scaling):
    q_ref, k_ref = q.clone(), k.clone()
    rope_gather_torch_(q_ref, k_ref, positions, inv_freq(), pairs, scaling)
    rope_triton.rope_gather_(q, k, positions, inv_freq(), pairs, scaling)
    torch.testing.assert_close(q, q_ref, **TOLERANCE[q.dtype])
    torch.testing.assert_close(k, k_ref, **TOLERANCE[k.dtype])


POSITIONS = {
    "prefill": lambda B, T: torch.arange(T),
    "decode at 500": lambda B, T: torch.arange(500, 500 + T),
    "per row [B, T]": lambda B, T: torch.randint(0, 4096, (B, T), generator=torch.Generator().manual_seed(1)),
}
CASES = [(1, 7, "prefill", 1.0), (2, 1, "decode at 500", 0.8), (2, 16, "per row [B, T]", 1.25)]


@pytest.mark.parametrize("B,T,where,scaling", CASES)
@pytest.mark.parametrize("per_group", [1, 3, 4])
@pytest.mark.parametrize("u", [1, 20, 28, 32])
def test_kernel_matches_torch_path_fp32(u, per_group, B, T, where, scaling):
    q, k, pairs = make(B, T, 2, per_group, u)
    check_against_torch(q, k, POSITIONS[where](B, T), pairs, scaling)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,where,scaling", CASES[1:])
def test_kernel_matches_torch_path_half(dtype, B, T, where, scaling):
    q, k, pairs = make(B, T, 3, 3, 28, dtype)
    check_against_torch(q, k, POSITIONS[where](B, T), pairs, scaling)


@pytest.mark.parametrize("u", [32, 28, 20])
def test_smollm2_heads(u):
    """SmolLM2-135M: 9 query heads on 3 KV heads, d = 64, at the widths its rates keep."""
    q, k, pairs = make(1, 5, 3, 3, u)
    check_against_torch(q, k, torch.arange(5), pairs, 1.0)


def test_strided_views_of_a_fused_projection():
    """q and k as views into one [B, T, (H + 2G) * 2u] qkv output: only their channels change."""
    B, T, H, G, u = 2, 3, 6, 2, 20
    qkv = torch.randn(B, T, (H + 2 * G) * 2 * u)
    before = qkv.clone()
    q = qkv[..., :H * 2 * u].view(B, T, H, 2 * u)
    k = qkv[..., H * 2 * u:(H + G) * 2 * u].view(B, T, G, 2 * u)
    _, _, pairs = make(B, T, G, H // G, u)
    q_ref, k_ref = q.clone(), k.clone()
    rope_gather_torch_(q_ref, k_ref, torch.arange(T), inv_freq(), pairs)
    rope_triton.rope_gather_(q, k, torch.arange(T), inv_freq(), pairs)
    torch.testing.assert_close(q, q_ref, **TOLERANCE[torch.float32])
    torch.testing.assert_close(k, k_ref, **TOLERANCE[torch.float32])
    assert torch.equal(qkv[..., (H + G) * 2 * u:], before[..., (H + G) * 2 * u:])


def test_torch_path_takes_the_triton_kernels_arguments(monkeypatch):
    """Without Triton in play, apply_rope_gather is the torch path, which takes [B, T] positions
    as the kernel does: each batch row rotates at its own positions."""
    monkeypatch.delenv("TRITON_INTERPRET")
    B, T, G, per_group, u = 2, 6, 3, 3, 20
    q, k, pairs = make(B, T, G, per_group, u)
    positions = torch.stack((torch.arange(10, 10 + T), torch.arange(3, 3 + T)))
    rows = [(q[b:b + 1].clone(), k[b:b + 1].clone()) for b in range(B)]
    for (q_row, k_row), at in zip(rows, positions):
        rope_gather_torch_(q_row, k_row, at, inv_freq(), pairs, 0.9)
    apply_rope_gather(q, k, positions, inv_freq(), pairs, 0.9)
    assert torch.equal(q, torch.cat([r[0] for r in rows])) and torch.equal(k, torch.cat([r[1] for r in rows]))


def test_dispatch(monkeypatch):
    """CPU tensors take the Triton kernel only under TRITON_INTERPRET=1; else elastiq's CPU op, or
    the torch path under ELASTIQ_CPU_KERNEL=torch."""
    calls = []
    monkeypatch.setattr(rope_triton, "launch_rope_gather", lambda *args: calls.append("triton"))
    monkeypatch.setattr(kernels.rope, "rotate_gathered_", lambda *args: calls.append("torch"))
    monkeypatch.setattr(kernels.rope.CpuRope, "rotate_", staticmethod(lambda *args: calls.append("cpu")))
    q, k, pairs = make(1, 2, 1, 1, 4)
    apply_rope_gather(q, k, torch.arange(2), inv_freq(), pairs)
    monkeypatch.delenv("TRITON_INTERPRET")
    apply_rope_gather(q, k, torch.arange(2), inv_freq(), pairs)
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    apply_rope_gather(q, k, torch.arange(2), inv_freq(), pairs)
    assert calls == ["triton", "cpu", "torch"]


def _bad_arguments():
    q, k, pairs = make(1, 4, 2, 3, 8)
    pos, freq = torch.arange(4), inv_freq()
    return {
        "q not 4-D": ((q[0], k, pos, freq, pairs), ValueError, "expected q"),
        "k heads != pairs groups": ((q, k[:, :, :1], pos, freq, pairs), ValueError, "k must be"),
        "q width != 2u": ((q[..., :8], k, pos, freq, pairs), ValueError, "k must be"),
        "H not a multiple of G": ((q[:, :, :5], k, pos, freq, pairs), ValueError, "not a multiple"),
        "positions shape": ((q, k, torch.arange(3), freq, pairs), ValueError, "positions must be"),
        "inv_freq too short": ((q, k, pos, freq[:4], pairs), ValueError, "inv_freq must be"),
        "integer q": ((q.long(), k.long(), pos, freq, pairs), TypeError, "share one dtype"),
        "q and k dtypes differ": ((q, k.half(), pos, freq, pairs), TypeError, "share one dtype"),
        "float positions": ((q, k, pos.float(), freq, pairs), TypeError, "int32 or int64"),
        "strided last dim": ((q.transpose(2, 3).contiguous().transpose(2, 3), k, pos, freq, pairs), ValueError,
                             "contiguous"),
    }


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("case", list(_bad_arguments()))
def test_invalid_input_is_refused(case, path):
    args, error, message = _bad_arguments()[case]
    function = rope_triton.rope_gather_ if path == "triton" else rope_gather_torch_
    with pytest.raises(error, match=message):
        function(*args)
