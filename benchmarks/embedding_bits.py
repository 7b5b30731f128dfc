"""What 8-bit (Q8_0) matrices cost the torch runtime, against 4-bit (Q4_0).

Runs the torch runtime on two checkpoints that differ only in their precision, each rate in a
fresh process (``runtime.py``'s child), alternating the two ``--rounds`` times so that the ratio
is measured side by side: prefill and decode tokens/s, weights held, peak RSS against the
prediction. By default they are SmolLM2-135M-Instruct with the token embedding and head in Q4_0
or Q8_0 (GPTQ least-important-first, from ``benchmarks/quantization.py``'s cache; quality in
``quantization.md``), written to benchmarks/results/embedding_bits.{json,md}; ``--checkpoints``
compares any two (the second is the reference of the ratio) under ``--name``.

    python benchmarks/embedding_bits.py --rounds 3
    python benchmarks/embedding_bits.py --checkpoints q8-v=A.elastiq all-q4=B.elastiq --name q8_matrices
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from elastiq.paths import cache_dir
from measure import add_generation_args, command_line, generation_spec, mib, run_child, save_results

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIME = str(Path(__file__).resolve().parent / "runtime.py")
CHECKPOINTS = {"Q8_0": "smollm2-q4-gptq-least-important-first-8.elastiq",
               "Q4_0": "smollm2-q4-gptq-least-important-first.elastiq"}  # embedding and head


def to_markdown(results: dict) -> str:
    labels = list(results["checkpoints"])
    what = (f"SmolLM2-135M-Instruct, GPTQ least-important-first Q4_0 blocks; the token embedding (tied to the "
            f"head) in Q4_0 or Q8_0" if labels == list(CHECKPOINTS) else
            "; ".join(f"{label}: `{path}`" for label, path in results["checkpoints"].items()))
    lines = [f"Command: `{results['command']}`", "",
             f"{what}. torch runtime, {results['threads']} threads, prompt {results['prompt_tokens']} "
             f"tokens, {results['decode_tokens']} greedy tokens, ctx {results['ctx']}; each cell is the median of "
             f"{results['rounds']} processes run alternately (each the median of {results['repeats']} generations). Load average at "
             f"start {results['load_average']:.1f}.", "",
             "| rate | checkpoint | decode tok/s | prefill tok/s | weights held MiB | weights read MB | peak RSS MiB "
             "| predicted / measured |", "|---|---|---|---|---|---|---|---|"]
    for rate, by_label in results["rates"].items():
        for label, runs in by_label.items():
            r = runs[0]
            peak = statistics.median(x["peak_rss"] for x in runs)
            lines.append(f"| {rate} | {label} | {statistics.median(x['decode_tok_s'] for x in runs):.1f} | "
                         f"{statistics.median(x['prefill_tok_s'] for x in runs):.0f} | {mib(r['held_weights'])} | "
                         f"{r['bytes_read'] / 1e6:.1f} | {mib(peak)} | {r['predicted'] / peak:.2f} |")
    first, second = labels
    lines += ["", f"Decode ratio {first} / {second} per round (same round, back to back): " + "; ".join(
        f"rate {rate}: " + ", ".join(f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}"
                                     for a, b in zip(by_label[first], by_label[second]))
        for rate, by_label in results["rates"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.0,0.35", help="comma-separated offered rates")
    parser.add_argument("--rounds", type=int, default=3, help="processes per checkpoint and rate, alternated")
    add_generation_args(parser, prompt_tokens=256)
    parser.add_argument("--checkpoints", nargs=2, metavar="LABEL=PATH",
                        help="two checkpoints to compare (default: the cached 8- and 4-bit embedding ones)")
    parser.add_argument("--name", default="embedding_bits", help="results/NAME.{json,md}")
    args = parser.parse_args()
    if args.checkpoints:
        paths = {label: Path(path) for label, _, path in (c.partition("=") for c in args.checkpoints)}
    else:
        paths = {label: cache_dir() / "bench" / name for label, name in CHECKPOINTS.items()}
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}" + ("" if args.checkpoints else
                                                    ": run benchmarks/quantization.py first, which writes them"))

    results = {"command": command_line(), **generation_spec(args), "rounds": args.rounds,
               "load_average": os.getloadavg()[0], "checkpoints": {k: str(v) for k, v in paths.items()}, "rates": {}}
    for rate in (float(r) for r in args.rates.split(",")):
        runs: dict[str, list] = {label: [] for label in paths}
        for _ in range(args.rounds):
            for label, path in paths.items():
                spec = {**generation_spec(args), "checkpoint": str(path), "rate": rate}
                runs[label].append(run_child(RUNTIME, "elastiq", spec))
                print(rate, label, f"{runs[label][-1]['decode_tok_s']:.1f} tok/s", flush=True)
        results["rates"][str(rate)] = runs
    save_results(RESULTS / f"{args.name}.json", results, to_markdown(results))


if __name__ == "__main__":
    main()
