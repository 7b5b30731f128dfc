"""elastiq's 4-bit CPU matmul (``kernels/cpu_ops.cpp``) against torch's int4 op, per shape and row count.

Random Q4_0 matrices of SmolLM2's and Qwen2.5-Coder-1.5B's shapes, bfloat16 activations of 1
(decoding), 8 and 64 rows (prompts); each of elastiq's SIMD loops that this CPU runs (AVX-512
VNNI, AVX2) and torch's op timed on the same weights, one after another, medians of --repeats
calls after a warm-up (hot caches for the small matrices, memory-bound for the large); the
relative error of each against float64 arithmetic on the same codes.

    python benchmarks/cpu_kernel.py      # writes benchmarks/results/cpu_kernel.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from elastiq.atomic import write_text
from elastiq.kernels.cpu_ops import cpu_ops_built
from elastiq.kernels.q4 import int4pack_matmul, prepare_int4pack
from elastiq.kernels.q4_cpu import prepare_cpu_blocks
from elastiq.quants import dequantize, quantize_rtn

RESULTS = Path(__file__).parent / "results"
SHAPES = {"SmolLM2 q/o": (576, 576), "SmolLM2 k/v": (192, 576), "SmolLM2 gate/up": (1536, 576),
          "SmolLM2 down": (576, 1536), "SmolLM2 head": (49152, 576), "Qwen 1.5B gate/up": (8960, 1536),
          "Qwen 1.5B down": (1536, 8960)}
COLD_BYTES = 96 << 20  # more than this machine's caches (32 MB of L3)


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold_us(codes: torch.Tensor, scales: torch.Tensor, isas: list[str], K: int, repeats: int) -> dict[str, float]:
    """Microseconds of a one-row call on a matrix that is not in any cache, as in a decode step
    (each layer's matrices are read once a token): the calls cycle through copies of the matrix
    that together exceed COLD_BYTES, best of a few passes."""
    copies = max(2, -(-COLD_BYTES // (codes.nbytes + scales.nbytes)))
    ours = [prepare_cpu_blocks(codes.clone(), scales.clone()) for _ in range(copies)]
    theirs = [prepare_int4pack(codes.clone(), scales.clone()) for _ in range(copies)]
    x = torch.randn(1, K).bfloat16()
    calls = {isa: [lambda w=w, isa=isa: torch.ops.elastiq.q4_matmul(x, w.packed, w.scales, 0, isa=isa) for w in ours]
             for isa in isas}
    calls["torch"] = [lambda w=w: int4pack_matmul(x, None, weight=w) for w in theirs]
    best = {}
    for name, fns in calls.items():
        times = []
        for _ in range(max(3, repeats // 10)):
            start = time.perf_counter()
            for fn in fns:
                fn()
            times.append((time.perf_counter() - start) / len(fns))
        best[name] = min(times) * 1e6
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    assert cpu_ops_built(), "elastiq's CPU ops did not build"
    torch.set_num_threads(args.threads)
    from elastiq.runtime.fastest import cpu_signature

    isas = [isa for isa in torch.ops.elastiq.cpu_isas() if isa != "portable"]

    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, (N, K) in SHAPES.items():
        codes, scales = quantize_rtn(torch.randn(N, K, generator=gen))
        exact = dequantize(codes, scales).double()
        ours, theirs = prepare_cpu_blocks(codes, scales), prepare_int4pack(codes, scales)
        ops = {isa: (lambda x, isa=isa: torch.ops.elastiq.q4_matmul(x, ours.packed, ours.scales, 0, isa=isa))
               for isa in isas}
        ops["torch"] = lambda x: int4pack_matmul(x, None, weight=theirs)
        cold = cold_us(codes, scales, isas, K, args.repeats)
        for M in (1, 8, 64):
            x = torch.randn(M, K, generator=gen).bfloat16()
            y = x.double() @ exact.T
            err = {name: float((op(x).double() - y).norm() / y.norm()) for name, op in ops.items()}
            us = {name: timed(lambda: op(x), args.repeats) * 1e6 for name, op in ops.items()}
            rows.append({"shape": label, "N": N, "K": K, "M": M, "us": us, "rel_err": err,
                         "weight_gb_s": {isa: N * K // 32 * 18 / us[isa] / 1e3 for isa in isas},
                         "cold_us": cold if M == 1 else None})
            print(rows[-1], file=sys.stderr, flush=True)
    results = {"command": "python benchmarks/cpu_kernel.py " + " ".join(sys.argv[1:]), "threads": args.threads,
               "repeats": args.repeats, "cpu": cpu_signature(), "torch": torch.__version__, "isas": isas, "rows": rows}
    names = [*isas, "torch"]
    lines = [f"# elastiq's 4-bit CPU matmul against torch's int4 op", "", f"Command: `{results['command']}`", "",
             f"CPU: {results['cpu']}; torch {results['torch']}, {args.threads} threads; medians of {args.repeats} "
             "calls after 5 warm-up calls, the ops one after another per shape. Speed-up: torch's time over "
             f"elastiq's {isas[0]} loop's. Weight GB/s: the Q4_0 bytes (18 per 32 weights) over that loop's "
             "time. Error: relative Frobenius error against float64 arithmetic on the same codes and bf16 "
             "activations.", "",
             "| shape | N x K | rows | " + " | ".join(f"{n} us" for n in names) + " | speed-up | weight GB/s | "
             "error " + " / ".join(names) + " |",
             "|---|---|---|" + "---|" * (len(names) + 3)]
    for r in rows:
        best = isas[0]
        lines.append(f"| {r['shape']} | {r['N']} x {r['K']} | {r['M']} | "
                     + " | ".join(f"{r['us'][n]:.0f}" for n in names)
                     + f" | {r['us']['torch'] / r['us'][best]:.2f} | {r['weight_gb_s'][best]:.1f} | "
                     + " / ".join(f"{r['rel_err'][n]:.4f}" for n in names) + " |")
    lines += ["", f"One row on a matrix in no cache, as a decode step reads it (the calls cycle through copies "
              f"of the matrix, {COLD_BYTES >> 20} MB in all; best of the passes):", "",
              "| shape | N x K | " + " | ".join(f"{n} us" for n in names) + " | speed-up | weight GB/s |",
              "|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        if r["cold_us"]:
            cold, best = r["cold_us"], isas[0]
            lines.append(f"| {r['shape']} | {r['N']} x {r['K']} | " + " | ".join(f"{cold[n]:.0f}" for n in names)
                         + f" | {cold['torch'] / cold[best]:.2f} | {r['N'] * r['K'] // 32 * 18 / cold[best] / 1e3:.1f} |")
    write_text(RESULTS / "cpu_kernel.json", json.dumps(results, indent=1))
    write_text(RESULTS / "cpu_kernel.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
