"""What an 8-bit (Q8_0) token embedding and LM head costs the runtime, against 4-bit (Q4_0).

Runs the torch runtime on two SmolLM2-135M-Instruct checkpoints that differ only in the embedding
and head (GPTQ least-important-first, from ``benchmarks/quantization.py``'s cache), each rate in a
fresh process (``runtime.py``'s child), alternating the two checkpoints ``--rounds`` times so that
the ratio is measured side by side: prefill and decode tokens/s, weights held, peak RSS against
the prediction. Quality is in ``quantization.md``. Writes benchmarks/results/embedding_bits.{json,md}.

    python benchmarks/embedding_bits.py --rounds 3
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
CHECKPOINTS = {4: "smollm2-q4-gptq-least-important-first.elastiq",
               8: "smollm2-q4-gptq-least-important-first-8.elastiq"}


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct, GPTQ least-important-first Q4_0 blocks; the token embedding (tied to the "
             f"head) in Q4_0 or Q8_0. torch runtime, {results['threads']} threads, prompt {results['prompt_tokens']} "
             f"tokens, {results['decode_tokens']} greedy tokens, ctx {results['ctx']}; each cell is the median of "
             f"{results['rounds']} processes run alternately (each the median of {results['repeats']} generations). Load average at "
             f"start {results['load_average']:.1f}.", "",
             "| rate | embedding | decode tok/s | prefill tok/s | weights held MiB | weights read MB | peak RSS MiB "
             "| predicted / measured |", "|---|---|---|---|---|---|---|---|"]
    for rate, by_bits in results["rates"].items():
        for bits, runs in by_bits.items():
            r = runs[0]
            peak = statistics.median(x["peak_rss"] for x in runs)
            lines.append(f"| {rate} | Q{bits}_0 | {statistics.median(x['decode_tok_s'] for x in runs):.1f} | "
                         f"{statistics.median(x['prefill_tok_s'] for x in runs):.0f} | {mib(r['held_weights'])} | "
                         f"{r['bytes_read'] / 1e6:.1f} | {mib(peak)} | {r['predicted'] / peak:.2f} |")
    lines += ["", "Decode ratio Q8_0 / Q4_0 per round (same round, back to back): " + "; ".join(
        f"rate {rate}: " + ", ".join(f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}"
                                     for a, b in zip(by_bits["8"], by_bits["4"]))
        for rate, by_bits in results["rates"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.0,0.35", help="comma-separated offered rates")
    parser.add_argument("--rounds", type=int, default=3, help="processes per checkpoint and rate, alternated")
    add_generation_args(parser, prompt_tokens=256)
    parser.add_argument("--output", default=str(RESULTS / "embedding_bits.json"))
    args = parser.parse_args()
    paths = {bits: cache_dir() / "bench" / name for bits, name in CHECKPOINTS.items()}
    missing = [str(p) for p in paths.values() if not p.is_dir()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run benchmarks/quantization.py first, which writes them")

    results = {"command": command_line(), **generation_spec(args), "rounds": args.rounds, "load_average": os.getloadavg()[0], "rates": {}}
    for rate in (float(r) for r in args.rates.split(",")):
        runs: dict[str, list] = {"4": [], "8": []}
        for _ in range(args.rounds):
            for bits, path in paths.items():
                spec = {**generation_spec(args), "checkpoint": str(path), "rate": rate}
                runs[str(bits)].append(run_child(RUNTIME, "elastiq", spec))
                print(rate, bits, f"{runs[str(bits)][-1]['decode_tok_s']:.1f} tok/s", flush=True)
        results["rates"][str(rate)] = runs
    save_results(Path(args.output), results, to_markdown(results))


if __name__ == "__main__":
    main()
