"""Quality of sorting without fine-tuning: SmolLM2-135M-Instruct at 15/25/35% pruning.

Three nested checkpoints, each evaluated at every rate through the elastic torch model:
- ``uniql``: elastiq's sort (ridge leverage, Q/K pair scores, whitened V/O SVD) + block-influence allocation;
- ``magnitude``: the same widths (same influence allocation), channels ordered by weight L2 norm;
- ``uniform``: elastiq's sort with the same ratio in every block.
The dense row is the dense reference (benchmarks/results/dense_reference.json) restricted to the
same first windows and items. Writes benchmarks/results/sorting_quality.{json,md}.

    python benchmarks/sorting_quality.py --windows 10 --items 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.evaluation.suite import ALL_MEASURES, run_suite
from elastiq.evaluation.zeroshot import mean_stderr
from elastiq.paths import cache_dir
from elastiq.modeling.model import Transformer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"uniql": ("uniql", "influence"), "magnitude": ("magnitude", "influence"), "uniform": ("uniql", "uniform")}
RATES = (0.15, 0.25, 0.35)


def dense_subset(path: Path, windows: int, items: int) -> dict:
    """The dense reference's numbers on its first ``windows`` windows and ``items`` items."""
    ref = json.loads(path.read_text())
    nll = ref["wikitext2"]["window_nll"][:windows]
    out = {"wikitext2": {"ppl": math.exp(sum(nll) / len(nll)), "nll_stderr": mean_stderr(nll), "windows": len(nll)},
           "tasks": {}}
    for name, t in ref["tasks"].items():
        values = t["per_item"][t["metric"]][:items]
        out["tasks"][name] = {"metric": t["metric"], "n": len(values), t["metric"]: sum(values) / len(values),
                              t["metric"] + "_stderr": mean_stderr(values)}
    return out


def row(name: str, rate: float | str, r: dict) -> str:
    cells = [f"{r['wikitext2']['ppl']:.2f}"]
    accs = []
    for task in ALL_MEASURES[1:]:
        t = r["tasks"][task]
        accs.append(t[t["metric"]])
        cells.append(f"{100 * t[t['metric']]:.1f} ± {100 * t[t['metric'] + '_stderr']:.1f}")
    return f"| {name} | {rate} | " + " | ".join(cells) + f" | {100 * sum(accs) / len(accs):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=10, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--items", type=int, default=200, help="first N items per task")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--dense", default=str(RESULTS / "dense_reference.json"),
                        help="the dense reference results (from benchmarks/dense_reference.py)")
    parser.add_argument("--output", default=str(RESULTS / "sorting_quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "windows": args.windows,
               "items": args.items, "threads": torch.get_num_threads(), "variants": {}}
    results["dense"] = dense_subset(Path(args.dense), args.windows, args.items)
    for name, (method, allocation) in VARIANTS.items():
        options = CompressOptions(rates=(0.0, *RATES), method=method, allocation=allocation,
                                  calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
        path = compress("smollm2-135m", cache_dir() / "bench" / f"smollm2-{name}.elastiq", options, overwrite=True)
        ckpt = Checkpoint(path)
        config, tokenizer = ckpt.config, ckpt.tokenizer()
        variant = {"timings": dict(options.timings), "rates": {}}
        for rate in RATES:
            start = time.perf_counter()
            model = Transformer.from_weights(ckpt.read_rate(rate), config).eval()
            with torch.inference_mode():
                r = run_suite(model, tokenizer, f"{name}@{rate}", windows=args.windows, limit=args.items)
            r["weight_bytes"] = ckpt.rate_entry(rate)["weight_bytes"]
            r["seconds"] = time.perf_counter() - start
            variant["rates"][str(rate)] = r
            print(f"{name} @ {rate}: ppl {r['wikitext2']['ppl']:.2f} ({r['seconds']:.0f} s)", flush=True)
        results["variants"][name] = variant
        write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop

    header = ("| variant | rate | WikiText-2 ppl | " + " | ".join(
        f"{t} ({results['dense']['tasks'][t]['metric']})" for t in ALL_MEASURES[1:]) + " | mean acc |")
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), no fine-tuning. Perplexity over the "
             f"first {args.windows} WikiText-2 windows of 2048 tokens; accuracy ± standard error on the first "
             f"{args.items} items of each task.", "", header, "|---" * 9 + "|",
             row("dense", 0, results["dense"])]
    for rate in RATES:
        for name in VARIANTS:
            lines.append(row(name, rate, results["variants"][name]["rates"][str(rate)]))
    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    write_text(Path(args.output).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
