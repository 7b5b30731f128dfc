"""Time the fused RoPE gather on an NVIDIA GPU: the Triton kernel against the torch path, eager and compiled.

Shapes are the runtime's for SmolLM2-135M (9 query heads on 3 KV heads, head size d = 64,
rope_theta 100000) at u = 32, 28 and 20 kept rotary pairs per KV head: decode (B=1, T=1 at
position 8191, the last of its 8192-token context) and prefill (B=1, T=512 from position 0).
Each implementation rotates the same q [B, T, 9, 2u] and k [B, T, 3, 2u] in place; a run is timed
with CUDA events around one call, and the median (with the 10th and 90th percentiles) of
``--runs`` runs after ``--warmup`` calls is reported, so launch overhead counts, as it does in
decoding. Before timing, the kernel's output is compared with the torch path's.
Writes benchmarks/results/rope_kernel.{json,md}. Without a CUDA GPU it measures and estimates
nothing: the results files say that no GPU was available, and it exits 0.

    python benchmarks/rope_kernel.py [--runs 500] [--warmup 50] [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from elastiq.atomic import write_text
from elastiq.kernels import rope_gather_torch_

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD_DIM, ROPE_THETA = 9, 3, 64, 100000.0
WIDTHS = (32, 28, 20)
PHASES = {"decode": (1, 1, 8191), "prefill": (1, 512, 0)}  # B, T, first position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--output", default=str(RESULTS / "rope_kernel.json"))
    args = parser.parse_args()
    out = Path(args.output)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpus": os.cpu_count()},
              "torch": torch.__version__, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    if not torch.cuda.is_available():
        write_no_gpu(out, header)
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it to time the GPU kernel")
    import triton

    from elastiq.kernels.rope_triton import rope_gather_

    rows = [measure(phase, u, getattr(torch, name), rope_gather_, args.runs, args.warmup)
            for name in args.dtypes.split(",") for phase in PHASES for u in WIDTHS]
    props = torch.cuda.get_device_properties(0)
    result = {**header, "gpu": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
              "cuda": torch.version.cuda, "triton": triton.__version__, "runs": args.runs, "warmup": args.warmup,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rope_theta": ROPE_THETA, "results": rows}
    write_text(out, json.dumps(result, indent=2) + "\n")
    table = ("| phase | B×T | u | dtype | max abs diff vs torch | Triton µs | torch eager µs | torch.compile µs "
             "| vs eager | vs compile |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        table += (f"| {r['phase']} (pos {r['first_position']}) | {r['B']}×{r['T']} | {r['u']} | {r['dtype']} "
                  f"| {r['max_abs_diff']:.2e} | {r['triton_us']['median']:.1f} | {r['torch_eager_us']['median']:.1f} "
                  f"| {r['torch_compile_us']['median']:.1f} "
                  f"| {r['torch_eager_us']['median'] / r['triton_us']['median']:.1f}x "
                  f"| {r['torch_compile_us']['median'] / r['triton_us']['median']:.1f}x |\n")
    write_text(out.with_suffix(".md"), (
        f"GPU: {result['gpu']} (compute capability {result['capability']}); torch {result['torch']}, CUDA "
        f"{result['cuda']}, Triton {result['triton']}; {result['date']}.\n\n"
        f"Command: `{result['command']}`\n\n"
        f"Median of {args.runs} runs (CUDA events around one in-place call on q and k; launch overhead "
        f"included) after {args.warmup} warm-up calls. SmolLM2-135M heads: {HEADS} query, {KV_HEADS} KV, d = "
        f"{HEAD_DIM}. The last two columns are the torch path's median over the kernel's. Max abs diff is the "
        f"largest |kernel - torch path| over q and k; in bfloat16 one bf16 ulp (up to 2^-7 of a value) is "
        f"expected where the two paths' float32 cos/sin differ in the last bit.\n\n{table}"))
    print(table)


def measure(phase: str, u: int, dtype: torch.dtype, kernel: Callable[..., None], runs: int, warmup: int) -> dict:
    """One shape: check the kernel against the torch path, then time the kernel, eager torch and torch.compile."""
    B, T, first = PHASES[phase]
    gen = torch.Generator().manual_seed(u)
    q = torch.randn(B, T, HEADS, 2 * u, generator=gen).to("cuda", dtype)
    k = torch.randn(B, T, KV_HEADS, 2 * u, generator=gen).to("cuda", dtype)
    pairs = torch.stack([torch.randperm(HEAD_DIM // 2, generator=gen)[:u] for _ in range(KV_HEADS)]).cuda()
    positions = torch.arange(first, first + T, device="cuda")
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    q_ref, k_ref = q.clone(), k.clone()
    rope_gather_torch_(q_ref, k_ref, positions, inv_freq, pairs)
    q_out, k_out = q.clone(), k.clone()
    kernel(q_out, k_out, positions, inv_freq, pairs)
    diff = max((q_out.float() - q_ref.float()).abs().max().item(), (k_out.float() - k_ref.float()).abs().max().item())
    torch._dynamo.reset()
    compiled = torch.compile(rope_gather_torch_, fullgraph=True)
    timings = {name: time_cuda(lambda f=f: f(q, k, positions, inv_freq, pairs), runs, warmup)
               for name, f in (("triton_us", kernel), ("torch_eager_us", rope_gather_torch_),
                               ("torch_compile_us", compiled))}
    return {"phase": phase, "B": B, "T": T, "first_position": first, "u": u, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": diff, **timings}


def time_cuda(fn: Callable[[], None], runs: int, warmup: int) -> dict:
    """Median, 10th and 90th percentile in microseconds of ``runs`` calls, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    us = sorted(start.elapsed_time(end) * 1000 for start, end in events)
    return {"median": statistics.median(us), "p10": us[len(us) // 10], "p90": us[(9 * len(us)) // 10]}


def write_no_gpu(out: Path, header: dict) -> None:
    """Say plainly that nothing was measured: no timings are estimated without a GPU."""
    status = "no CUDA GPU was available on this machine: nothing was measured"
    write_text(out, json.dumps({**header, "gpu": None, "status": status, "results": []}, indent=2) + "\n")
    machine = header["machine"]
    write_text(out.with_suffix(".md"), (
        f"**No CUDA GPU was available: nothing was measured, and no timings are estimated.**\n\n"
        f"Run on {header['date']} on {machine['platform']} ({machine['arch']}, {machine['cpus']} CPUs), "
        f"torch {header['torch']}.\n\nCommand: `{header['command']}`\n\n"
        f"Run it again on a machine with an NVIDIA GPU and Triton to time the kernel.\n"))
    print(status)


if __name__ == "__main__":
    main()
