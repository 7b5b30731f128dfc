"""Recovery fine-tuning on SmolLM2-135M-Instruct: quality at 15/25/35% with and without it.

Starts from the sorted float checkpoint of benchmarks/sorting_quality.py (``smollm2-uniql``,
rates 0/.15/.25/.35) and compares, each with the same training tokens (steps x batch x seqlen of
C4):
- ``sort``: no fine-tuning (the start checkpoint itself);
- ``nested``: nested LoRA, one offered rate drawn per step;
- ``nested+distill``: the same, with the full-width pass teaching the masked one;
- ``lorashear``: LoRAShear to 25% (offers rates 0 and 0.25 only).
Each is evaluated through the elastic torch model at its rates: WikiText-2 perplexity and the
five zero-shot tasks. It also times single training steps in float32 and bf16 autocast at the
chosen batch x seqlen, nested and nested+distill, to plan runs. Writes
benchmarks/results/recovery.{json,md}.

    nice python benchmarks/recovery.py --steps 300 --batch 4 --seqlen 256 --windows 10 --items 200
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.recover import RecoverOptions, recover, recover_checkpoint
from elastiq.evaluation.suite import ALL_MEASURES, run_suite
from elastiq.paths import cache_dir, data_dir
from elastiq.modeling.model import Transformer

from sorting_quality import dense_subset, row  # the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.15, 0.25, 0.35)
VARIANTS = {"nested": dict(method="nested", distill=0.0, lm_weight=1.0),
            "nested+distill": dict(method="nested", distill=1.0, lm_weight=1.0, teacher="self", temperature=2.0),
            "lorashear": dict(method="lorashear", rate=0.25, distill=0.0, lm_weight=1.0)}


def time_steps(start: Path, base: dict, steps: int) -> dict:
    """Median seconds per training step (first step dropped) for nested and nested+distill, in
    float32 and in bf16 autocast, at the benchmark's batch x seqlen."""
    ckpt, out = Checkpoint(start), {}
    for name in ("nested", "nested+distill"):
        for bf16 in (False, True):
            options = RecoverOptions(**{**base, **VARIANTS[name], "steps": steps + 1, "bf16": bf16})
            recover(ckpt, options, data_dir(), progress=False)
            seconds = options.timings["step_seconds"][1:]
            out[f"{name} {'bf16' if bf16 else 'float32'}"] = {"median_s": statistics.median(seconds),
                                                              "steps": seconds}
            print(f"step time {name} bf16={bf16}: {statistics.median(seconds):.2f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", default=str(cache_dir() / "bench" / "smollm2-uniql.elastiq"),
                        help="the sorted float checkpoint to recover (from benchmarks/sorting_quality.py)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=512, help="C4 windows in the training pool")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")
    parser.add_argument("--time-steps", type=int, default=3, help="steps timed per setting (0: skip timing)")
    parser.add_argument("--windows", type=int, default=10, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--items", type=int, default=200, help="first N items per task")
    parser.add_argument("--dense", default=str(RESULTS / "dense_reference.json"))
    parser.add_argument("--output", default=str(RESULTS / "recovery.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = Path(args.start)
    base = dict(steps=args.steps, batch=args.batch, seqlen=args.seqlen, lr=args.lr, rank=args.rank,
                alpha=2.0 * args.rank, samples=args.samples, bf16=not args.no_bf16)
    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "start": str(start),
               "windows": args.windows, "items": args.items, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), "tokens_per_variant": args.steps * args.batch * args.seqlen,
               "settings": base, "variants": {}}
    results["dense"] = dense_subset(Path(args.dense), args.windows, args.items)
    if args.time_steps:
        results["step_seconds"] = time_steps(start, base, args.time_steps)

    checkpoints = {"sort": (start, 0.0, RATES)}
    for name, extra in VARIANTS.items():
        options = RecoverOptions(**{**base, **extra})
        path = recover_checkpoint(start, cache_dir() / "bench" / f"smollm2-recover-{name.replace('+', '-')}.elastiq",
                                  options, overwrite=True)
        rates = (options.rate,) if options.method == "lorashear" else RATES
        checkpoints[name] = (path, options.timings["train"], rates)
        print(f"{name}: trained {options.timings['train']:.0f} s", flush=True)

    for name, (path, train_seconds, rates) in checkpoints.items():
        ckpt = Checkpoint(path)
        config, tokenizer = ckpt.config, ckpt.tokenizer()
        variant = {"checkpoint": str(path), "train_seconds": train_seconds,
                   "tokens": 0 if name == "sort" else results["tokens_per_variant"], "rates": {}}
        for rate in rates:
            t = time.perf_counter()
            model = Transformer.from_weights(ckpt.read_rate(rate), config).eval()
            with torch.inference_mode():
                r = run_suite(model, tokenizer, f"{name}@{rate}", windows=args.windows, limit=args.items)
            r["seconds"] = time.perf_counter() - t
            variant["rates"][str(rate)] = r
            print(f"{name} @ {rate}: ppl {r['wikitext2']['ppl']:.2f}", flush=True)
        results["variants"][name] = variant
        write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop

    header = ("| variant | rate | WikiText-2 ppl | " + " | ".join(
        f"{t} ({results['dense']['tasks'][t]['metric']})" for t in ALL_MEASURES[1:]) + " | mean acc |")
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct from `{start.name}`. Each fine-tuned variant trained on "
             f"{results['tokens_per_variant']:,} C4 tokens ({args.steps} steps x {args.batch} x {args.seqlen}), "
             f"LoRA rank {args.rank}, lr {args.lr}, {'float32' if args.no_bf16 else 'bf16 autocast'}, "
             f"{results['threads']} threads (load average at start {results['load_average'][0]:.1f}). Perplexity "
             f"over the first {args.windows} WikiText-2 windows of 2048 tokens; accuracy ± standard error on the "
             f"first {args.items} items of each task.", "", header, "|---" * 9 + "|",
             row("dense", 0, results["dense"])]
    for rate in RATES:
        for name, variant in results["variants"].items():
            if str(rate) in variant["rates"]:
                lines.append(row(name, rate, variant["rates"][str(rate)]))
    lines += ["", "| variant | training tokens | training wall time (s) |", "|---|---|---|"]
    lines += [f"| {name} | {v['tokens']:,} | {v['train_seconds']:.0f} |" for name, v in results["variants"].items()]
    if "step_seconds" in results:
        lines += ["", f"Seconds per training step at batch {args.batch} x {args.seqlen} tokens (median of "
                      f"{args.time_steps} steps after the first):", "", "| setting | s / step |", "|---|---|"]
        lines += [f"| {k} | {v['median_s']:.2f} |" for k, v in results["step_seconds"].items()]
    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    write_text(Path(args.output).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
