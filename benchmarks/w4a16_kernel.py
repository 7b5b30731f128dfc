"""Time the 4-bit matmul (W4A16): the Triton kernel on an NVIDIA GPU, and torch's int4 CPU path.

Matrices [N, K] of SmolLM2-135M (hidden 576, MLP 1536, vocab 49152, 3 KV heads of 64) and of a
~1B Llama (Llama-3.2-1B: hidden 2048, MLP 8192, 8 KV heads of 64, vocab 128256), plus a q_proj
pruned to 27 rotary pairs per head (N = 9 * 54 = 486, not a multiple of 16), at decode (M = 1)
and prefill (M = ``--prefill`` tokens). Weights are random Q4_0 codes and fp16 scales (the
kernels' speed does not depend on the values); every implementation multiplies the same x.

GPU (when CUDA is available): ``q4_linear`` (Triton) against the torch reference (dequantize to
x's dtype, then ``F.linear``), eager and ``torch.compile``d, and a plain ``F.linear`` on the
dequantized float16 weight; CUDA events around one call, median and 10th/90th percentiles of
``--runs`` runs after ``--warmup``. Without a GPU nothing is estimated: the results say so.
CPU (always): ``q4_linear`` (bf16 activations, torch int4) against ``F.linear`` in float32 and in
bfloat16 on the dequantized weight, the three timed side by side in one loop (one call each per
round, so a busy shared CPU slows them alike); median of as many rounds as fit ``--budget``
seconds per shape (at least 3, at most 100). Also the padding of N to a multiple of 16: the
486-row q_proj through ``q4_linear`` (496 rows multiplied, output sliced back) against the same
call on a 496-row weight (the same work, nothing padded or sliced). On a shared, busy CPU pass
``--threads 1``: with more threads than free cores, an OpenMP thread that is descheduled holds
the others at the next barrier, and the medians time the neighbours.
Writes benchmarks/results/w4a16_kernel.{json,md}.

    nice python benchmarks/w4a16_kernel.py [--prefill 512] [--budget 2] [--threads 0] [--runs 200] [--warmup 20]
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
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from elastiq.atomic import write_text
from elastiq.kernels import prepare_q4, q4_linear
from elastiq.quants import BLOCK, PACKED, dequantize

RESULTS = Path(__file__).resolve().parent / "results"
MATRICES = [  # model, matrix, N, K
    ("SmolLM2-135M", "q_proj / o_proj", 576, 576),
    ("SmolLM2-135M", "q_proj, 27 of 32 pairs", 486, 576),
    ("SmolLM2-135M", "k_proj / v_proj", 192, 576),
    ("SmolLM2-135M", "gate_proj / up_proj", 1536, 576),
    ("SmolLM2-135M", "down_proj", 576, 1536),
    ("SmolLM2-135M", "lm_head", 49152, 576),
    ("Llama-1B", "q_proj / o_proj", 2048, 2048),
    ("Llama-1B", "k_proj / v_proj", 512, 2048),
    ("Llama-1B", "gate_proj / up_proj", 8192, 2048),
    ("Llama-1B", "down_proj", 2048, 8192),
    ("Llama-1B", "lm_head", 128256, 2048),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, default=512, help="tokens of the prefill shape")
    parser.add_argument("--budget", type=float, default=2.0, help="CPU: seconds of timing per shape")
    parser.add_argument("--runs", type=int, default=200, help="GPU: timed runs per implementation")
    parser.add_argument("--warmup", type=int, default=20, help="GPU: warm-up calls per implementation")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    parser.add_argument("--output", default=str(RESULTS / "w4a16_kernel.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it")
    out = Path(args.output)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]},
              "torch": torch.__version__, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "prefill_tokens": args.prefill}
    phases = {"decode": 1, "prefill": args.prefill}
    with torch.inference_mode():
        if torch.cuda.is_available():
            result["gpu"] = gpu_benchmark(phases, args.runs, args.warmup)
        else:
            result["gpu"] = {"name": None, "status": "no CUDA GPU was available on this machine: the Triton "
                                                     "kernel was not timed, and no GPU timings are estimated",
                             "results": []}
        result["cpu"] = [cpu_measure(model, matrix, N, K, phase, M, args.budget)
                         for phase, M in phases.items() for model, matrix, N, K in MATRICES]
        result["padding"] = [padding_measure(M, args.budget) for M in phases.values()]
    write_text(out, json.dumps(result, indent=2) + "\n")
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


def random_q4(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random GGUF-packed codes [N, K/32, 16] and fp16 scales [N, K/32] of a Q4_0 matrix."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (N, K // BLOCK, PACKED), generator=gen, dtype=torch.uint8)
    return codes, (0.01 * torch.randn(N, K // BLOCK, generator=gen)).to(torch.float16)


def cpu_measure(model: str, matrix: str, N: int, K: int, phase: str, M: int, budget: float) -> dict:
    """One shape on the CPU: q4_linear (bf16 x, int4 weight) vs F.linear fp32 and bf16, side by side."""
    codes, scales = random_q4(N, K)
    weight = prepare_q4(codes, scales)
    w32 = dequantize(codes, scales)
    w16 = w32.to(torch.bfloat16)
    x32 = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    x16 = x32.to(torch.bfloat16)
    ref = x16.float() @ w32.T
    error = ((q4_linear(x16, weight).float() - ref).abs().max() / ref.abs().max()).item()
    timings = time_cpu({"q4_linear_bf16_ms": lambda: q4_linear(x16, weight),
                        "linear_fp32_ms": lambda: F.linear(x32, w32),
                        "linear_bf16_ms": lambda: F.linear(x16, w16)}, budget)
    return {"model": model, "matrix": matrix, "N": N, "K": K, "phase": phase, "M": M,
            "q4_bytes": weight.nbytes, "fp32_bytes": w32.nbytes, "bf16_bytes": w16.nbytes,
            "max_abs_diff_over_max_abs": error, **timings}


def padding_measure(M: int, budget: float) -> dict:
    """The q_proj of 486 rows through q4_linear (padded to 496, sliced) vs 496 rows (no padding, no slice)."""
    codes, scales = random_q4(496, 576)
    padded = prepare_q4(codes[:486], scales[:486])
    full = prepare_q4(codes, scales)
    x = torch.randn(M, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    timings = time_cpu({"q4_linear_486_ms": lambda: q4_linear(x, padded),
                        "q4_linear_496_ms": lambda: q4_linear(x, full)}, budget)
    return {"M": M, **timings}


def time_cpu(fns: dict[str, Callable[[], object]], budget: float) -> dict:
    """Median, 10th and 90th percentile (ms) of each function, called once per round in turn,
    after one warm-up call each; as many rounds as fit ``budget`` seconds (3 to 100)."""
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = max(3, min(100, int(budget / max(time.perf_counter() - start, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1000)
    return {name: summary(s) for name, s in samples.items()}


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median": statistics.median(s), "p10": s[len(s) // 10], "p90": s[(9 * len(s)) // 10], "runs": len(s)}


def gpu_benchmark(phases: dict[str, int], runs: int, warmup: int) -> dict:
    """Every matrix and phase on the GPU in float16: Triton vs torch reference (eager, compiled) vs F.linear."""
    import triton

    props = torch.cuda.get_device_properties(0)
    rows = [gpu_measure(model, matrix, N, K, phase, M, runs, warmup)
            for phase, M in phases.items() for model, matrix, N, K in MATRICES]
    return {"name": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
            "triton": triton.__version__, "runs": runs, "warmup": warmup, "dtype": "float16", "results": rows}


def dequantize_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The torch reference: dequantize the Q4_0 weight to x's dtype on every call, then F.linear."""
    return F.linear(x, dequantize(codes, scales).to(x.dtype))


def gpu_measure(model: str, matrix: str, N: int, K: int, phase: str, M: int, runs: int, warmup: int) -> dict:
    codes, scales = (t.cuda() for t in random_q4(N, K))
    weight = prepare_q4(codes, scales, "cuda")
    x = torch.randn(M, K, device="cuda").to(torch.float16)
    w16 = dequantize(codes, scales).to(torch.float16)
    ref = x.float() @ w16.float().T
    error = ((q4_linear(x, weight).float() - ref).abs().max() / ref.abs().max()).item()
    torch._dynamo.reset()
    compiled = torch.compile(dequantize_linear, dynamic=False)
    timings = {name: time_cuda(fn, runs, warmup) for name, fn in (
        ("triton_us", lambda: q4_linear(x, weight)),
        ("torch_eager_us", lambda: dequantize_linear(x, codes, scales)),
        ("torch_compile_us", lambda: compiled(x, codes, scales)),
        ("linear_fp16_us", lambda: F.linear(x, w16)))}
    return {"model": model, "matrix": matrix, "N": N, "K": K, "phase": phase, "M": M,
            "max_abs_diff_over_max_abs": error, **timings}


def time_cuda(fn: Callable[[], object], runs: int, warmup: int) -> dict:
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


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def markdown(r: dict) -> str:
    """The results as Markdown: GPU table (or the statement that there was none), CPU table, padding."""
    machine = r["machine"]
    text = f"Command: `{r['command']}` ({r['date']}), torch {r['torch']}.\n\n## GPU\n\n"
    gpu = r["gpu"]
    if gpu["name"] is None:
        text += f"**{gpu['status'][0].upper() + gpu['status'][1:]}.** Run this script on a machine with an NVIDIA GPU.\n\n"
    else:
        text += (f"{gpu['name']} (compute capability {gpu['capability']}, {gpu['multiprocessors']} SMs), CUDA "
                 f"{gpu['cuda']}, Triton {gpu['triton']}; float16 activations. Median µs of {gpu['runs']} runs "
                 f"(CUDA events around one call) after {gpu['warmup']} warm-up calls. Torch reference: dequantize "
                 "to float16, then F.linear, on every call; F.linear: the dequantized float16 weight, held.\n\n"
                 "| model | matrix | N×K | M | rel. diff | Triton | torch eager | torch.compile | F.linear fp16 "
                 "| vs compile | vs fp16 |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for x in gpu["results"]:
            t = x["triton_us"]["median"]
            text += (f"| {x['model']} | {x['matrix']} | {x['N']}×{x['K']} | {x['M']} "
                     f"| {x['max_abs_diff_over_max_abs']:.1e} | {t:.1f} | {x['torch_eager_us']['median']:.1f} "
                     f"| {x['torch_compile_us']['median']:.1f} | {x['linear_fp16_us']['median']:.1f} "
                     f"| {x['torch_compile_us']['median'] / t:.2f}x | {x['linear_fp16_us']['median'] / t:.2f}x |\n")
        text += "\n"
    text += (f"## CPU\n\n{machine['cpu']} ({machine['cpus']} CPUs, torch using {machine['torch_threads']} threads, "
             f"load average {machine['load_average_1min']:.1f} when it started), {machine['platform']}. Median ms; the three run side by side, one call each per round. "
             "q4_linear: bfloat16 activations times the int4 weight (torch's `_weight_int4pack_mm_for_cpu`); "
             "F.linear: the dequantized weight held in float32 or bfloat16. Rel. diff: max |q4_linear - "
             "float32 reference| / max |reference| (bf16 activations and output, bf16 scales). Memory: the "
             "weight as each holds it.\n\n"
             "| model | matrix | N×K | M | rel. diff | q4_linear bf16 | F.linear fp32 | F.linear bf16 "
             "| fp32 / q4 | bf16 / q4 | MB int4 / fp32 / bf16 |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for x in r["cpu"]:
        q = x["q4_linear_bf16_ms"]["median"]
        text += (f"| {x['model']} | {x['matrix']} | {x['N']}×{x['K']} | {x['M']} "
                 f"| {x['max_abs_diff_over_max_abs']:.1e} | {q:.3f} | {x['linear_fp32_ms']['median']:.3f} "
                 f"| {x['linear_bf16_ms']['median']:.3f} | {x['linear_fp32_ms']['median'] / q:.2f}x "
                 f"| {x['linear_bf16_ms']['median'] / q:.2f}x | {x['q4_bytes'] / 1e6:.2f} / "
                 f"{x['fp32_bytes'] / 1e6:.2f} / {x['bf16_bytes'] / 1e6:.2f} |\n")
    text += ("\n### Padding N to a multiple of 16\n\nThe pruned q_proj of 486 rows through `q4_linear` (held as "
             "496 rows, output sliced back to 486 and made contiguous) against `q4_linear` on a 496-row weight "
             "(the same work, nothing padded or sliced), in ms; the overhead compares the 10th percentiles, the "
             "runs least disturbed by other work on the machine.\n\n"
             "| M | 486 rows (padded): median, p10 | 496 rows: median, p10 | overhead |\n|---|---|---|---|\n")
    for x in r["padding"]:
        a, b = x["q4_linear_486_ms"], x["q4_linear_496_ms"]
        text += (f"| {x['M']} | {a['median']:.4f}, {a['p10']:.4f} | {b['median']:.4f}, {b['p10']:.4f} "
                 f"| {100 * (a['p10'] / b['p10'] - 1):+.1f}% |\n")
    return text


if __name__ == "__main__":
    main()
