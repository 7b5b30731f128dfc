"""What each rate of the default model costs in quality, on every backend: `elastiq eval` per rate.

Resolves ``smollm2-135m`` to the 4-bit nested checkpoint that ``elastiq run`` builds on first use
(made here if the cache lacks it), then measures every offered rate with ``evaluate_rates`` (what
``elastiq eval CKPT --backend B`` runs) on torch, llama.cpp and onnxruntime: WikiText-2 perplexity
over the first ``--windows`` windows of 2048 tokens and the five zero-shot tasks on their first
``--items`` items. The backends see the same windows and items, so each is compared with torch
paired: per window for the NLL, per item pooled over the five tasks for accuracy. Writes
benchmarks/results/eval_rates.{json,md}.

    python benchmarks/eval_rates.py --windows 8 --items 100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from elastiq.checkpoint import Checkpoint
from elastiq.evaluation.rates import evaluate_rates
from elastiq.evaluation.suite import ALL_MEASURES
from elastiq.runtime.resolve import resolve_checkpoint

from measure import command_line, paired, save_results  # the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "llama.cpp", "onnxruntime")
TASKS = ALL_MEASURES[1:]


def to_markdown(results: dict) -> str:
    """Per backend and rate: bytes, perplexity, each task; then each backend paired against torch."""
    first = results["backends"]["torch"]["rates"]["0.0"]
    lines = [f"Command: `{results['command']}`", "",
             f"`{results['checkpoint']}`: SmolLM2-135M-Instruct as `elastiq run` builds it (sort + influence "
             f"allocation, GPTQ Q4_0, 4-bit embedding), every offered rate. WikiText-2 perplexity over the first "
             f"{results['windows']} windows of 2048 tokens (NLL ± standard error over windows); accuracy % ± "
             f"standard error on the first {results['items']} items of each task (ARC-Challenge and HellaSwag "
             f"acc_norm, the others acc). torch runs the checkpoint itself (int4 weights, bfloat16 activations); "
             f"llama.cpp runs each rate's GGUF export (Q4_0 bit for bit, f16 KV cache); onnxruntime each rate's "
             f"ONNX export (MatMulNBits on the same codes, float32). {results['threads']} threads; load average "
             f"{results['load_before']:.1f} before, {results['load_after']:.1f} after.", "",
             "| backend | rate | weights MB | WikiText-2 ppl | " + " | ".join(
                 f"{t} ({first['tasks'][t]['metric']})" for t in TASKS) + " | mean | seconds |",
             "|---" * (len(TASKS) + 6) + "|"]
    for backend, res in results["backends"].items():
        for rate, r in res["rates"].items():
            accs = [100 * r["tasks"][t][r["tasks"][t]["metric"]] for t in TASKS]
            cells = [f"{a:.1f} ± {100 * r['tasks'][t][r['tasks'][t]['metric'] + '_stderr']:.1f}"
                     for a, t in zip(accs, TASKS)]
            seconds = r["seconds"]
            lines.append(f"| {backend} | {rate} | {r['weight_bytes'] / 1e6:.1f} | {r['wikitext2']['ppl']:.2f} "
                         f"(± {r['wikitext2']['nll_stderr']:.3f}) | " + " | ".join(cells)
                         + f" | {sum(accs) / len(accs):.1f} | {seconds:.0f} |")
    lines += ["", "Each backend against torch, paired (a − b): Δ NLL per window, Δ accuracy per item over the "
              f"five tasks ({5 * results['items']} items).", "",
              "| backend | rate | Δ WikiText-2 NLL | Δ acc (points) |", "|---|---|---|---|"]
    for backend in BACKENDS[1:]:
        if backend not in results["backends"]:
            continue
        for rate in results["backends"][backend]["rates"]:
            d = paired(results["backends"][backend]["rates"][rate], results["backends"]["torch"]["rates"][rate])
            lines.append(f"| {backend} | {rate} | {d['nll']:+.4f} ± {d['nll_stderr']:.4f} | "
                         f"{100 * d['acc']:+.2f} ± {100 * d['acc_stderr']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--items", type=int, default=100, help="first items of each task")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--output", type=Path, default=RESULTS / "eval_rates.json")
    args = parser.parse_args()
    ckpt = Checkpoint(resolve_checkpoint("smollm2-135m"))
    results = {"command": command_line(), "checkpoint": ckpt.path.name, "windows": args.windows,
               "items": args.items, "load_before": os.getloadavg()[0], "backends": {}}
    for backend in args.backends.split(","):
        print(f"{backend} ...", flush=True)
        results["backends"][backend] = evaluate_rates(ckpt, ckpt.rates, backend, windows=args.windows,
                                                      limit=args.items)
    results["threads"] = results["backends"]["torch"]["threads"]
    results["load_after"] = os.getloadavg()[0]
    save_results(args.output, results, to_markdown(results))


if __name__ == "__main__":
    main()
