"""4-bit quantization of SmolLM2-135M-Instruct's nested checkpoint: size, quality, wall time.

Quantizes the sorted float checkpoint (elastiq's sort + influence allocation; ``--rotate``d for
the rotation rows) with round-to-nearest and with GPTQ in both column orders, with the token
embedding and LM head at 4 bits and, for GPTQ, at 8 bits; then measures:
(a) each rate's weight bytes against the same weights in float16; (b) WikiText-2 perplexity on
the first ``--windows`` windows of 2048 tokens and the five zero-shot tasks on their first
``--items`` items, at every rate, beside the float model, with paired differences (per window,
per item) between the column orders and with/without rotation; (c) the wall time of each
quantization. Writes benchmarks/results/quantization.{json,md}.

    python benchmarks/quantization.py --windows 4 --items 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from elastiq.checkpoint import Checkpoint
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.evaluation.suite import ALL_MEASURES, run_suite
from elastiq.paths import cache_dir
from elastiq.modeling.model import Transformer

from measure import command_line, paired, save_results  # the script's folder is on sys.path
from sorting_quality import row

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.0, 0.15, 0.25, 0.35)
TASKS = ALL_MEASURES[1:]
VARIANTS = {  # name: (rotated float checkpoint?, QuantizeOptions fields)
    "RTN": (False, {"method": "rtn", "order": "forward"}),
    "GPTQ least-important-first": (False, {"method": "gptq", "order": "least-important-first"}),
    "GPTQ forward": (False, {"method": "gptq", "order": "forward"}),
    "rotation + RTN": (True, {"method": "rtn", "order": "forward"}),
    "rotation + GPTQ least-important-first": (True, {"method": "gptq", "order": "least-important-first"}),
    "rotation + GPTQ forward": (True, {"method": "gptq", "order": "forward"}),
    "GPTQ least-important-first, 8-bit embedding": (
        False, {"method": "gptq", "order": "least-important-first", "embedding_bits": 8}),
    "rotation + GPTQ least-important-first, 8-bit embedding and head": (
        True, {"method": "gptq", "order": "least-important-first", "embedding_bits": 8}),
    "GPTQ forward, 8-bit embedding": (False, {"method": "gptq", "order": "forward", "embedding_bits": 8}),
    "rotation + GPTQ forward, 8-bit embedding and head": (
        True, {"method": "gptq", "order": "forward", "embedding_bits": 8}),
}
PAIRS = (  # (a, b): a - b, paired per window and per item
    ("GPTQ least-important-first", "GPTQ forward"),
    ("rotation + GPTQ least-important-first", "rotation + GPTQ forward"),
    ("rotation + GPTQ least-important-first", "GPTQ least-important-first"),
    ("GPTQ least-important-first", "RTN"),
    ("GPTQ least-important-first, 8-bit embedding", "GPTQ least-important-first"),
    ("rotation + GPTQ least-important-first, 8-bit embedding and head", "rotation + GPTQ least-important-first"),
    ("GPTQ forward, 8-bit embedding", "GPTQ forward"),
    ("rotation + GPTQ forward, 8-bit embedding and head", "rotation + GPTQ forward"),
    ("GPTQ least-important-first, 8-bit embedding", "GPTQ forward, 8-bit embedding"),
)


def float_checkpoint(rotate: bool) -> Path:
    """The sorted float checkpoint (reused from the cache when present)."""
    path = cache_dir() / "bench" / f"smollm2-uniql{'-rotated' if rotate else ''}.elastiq"
    if not path.exists():
        compress("smollm2-135m", path, CompressOptions(rates=RATES, rotate=rotate))
    return path


def evaluate(ckpt: Checkpoint, windows: int, items: int) -> dict[str, dict]:
    """Perplexity and the five tasks at every rate (quantized weights dequantized to float32)."""
    config, tokenizer = ckpt.config, ckpt.tokenizer()
    out = {}
    for rate in RATES:
        model = Transformer.from_weights(ckpt.read_rate(rate), config)
        with torch.inference_mode():
            out[str(rate)] = run_suite(model, tokenizer, f"{ckpt.path.name}@{rate}", windows=windows, limit=items,
                                       progress=False)
        print("  " + row(ckpt.path.name, rate, out[str(rate)]), flush=True)
    return out


def mean_acc(r: dict) -> float:
    return sum(t[t["metric"]] for t in r["tasks"].values()) / len(r["tasks"])


def to_markdown(results: dict) -> str:
    """Quality per variant and rate, paired differences, sizes and compression against float16."""
    rates = [str(r) for r in results["rates"]]
    lines = [*(f"Command: `{c}`" for c in results["commands"]), "",
             f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF as the float source), sorted (elastiq sort + influence "
             f"allocation). WikiText-2 perplexity over the first {results['windows']} windows of 2048 tokens; "
             f"accuracy ± standard error on the first {results['items']} items of each task. Quantized weights are "
             f"dequantized to float32 to run. GPTQ calibration: {results['calib_samples']} C4 windows of "
             f"{results['calib_seqlen']} tokens. The rotated float model's outputs equal the float model's "
             "(tests/test_rotate.py), so it has no row of its own.", "",
             "| model | rate | WikiText-2 ppl | " + " | ".join(
                 f"{t} ({results['float']['0.0']['tasks'][t]['metric']})" for t in TASKS) + " | mean acc |",
             "|---" * (len(TASKS) + 4) + "|"]
    for rate in rates:
        lines.append(row("float32", rate, results["float"][rate]))
        lines += [row(f"Q4_0 {name}", rate, v["eval"][rate]) for name, v in results["variants"].items()]
    lines += ["", f"Paired differences a − b (per window; per item over the five tasks, {results['items']} items "
              "each): negative Δ NLL and positive Δ acc favour a.", "",
              "| a | b | rate | Δ WikiText-2 NLL | Δ acc (points) |", "|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a in results["variants"] and b in results["variants"]:
            for rate in rates:
                d = paired(results["variants"][a]["eval"][rate], results["variants"][b]["eval"][rate])
                lines.append(f"| {a} | {b} | {rate} | {d['nll']:+.4f} ± {d['nll_stderr']:.4f} | "
                             f"{100 * d['acc']:+.2f} ± {100 * d['acc_stderr']:.2f} |")
    lines += ["", "| variant | quantize s |", "|---|---|"]
    lines += [f"| {name} | {v['seconds']:.0f} |" for name, v in results["variants"].items()]
    lines += ["", "| weights | " + " | ".join(f"rate {r}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    dense = results["fp16_bytes"]["tied"][rates[0]]  # the original model in float16, tied head
    for name, v in results["variants"].items():
        if "GPTQ forward" not in name:
            continue
        fp16 = results["fp16_bytes"]["untied" if name.startswith("rotation") else "tied"]
        q4 = v["bytes"]
        lines += [f"| {name} (MB) | " + " | ".join(f"{q4[r] / 1e6:.1f}" for r in rates) + " |",
                  "| vs float16 at the same rate | " + " | ".join(f"{fp16[r] / q4[r]:.2f}x" for r in rates) + " |",
                  "| vs the dense float16 model | " + " | ".join(f"{dense / q4[r]:.2f}x" for r in rates) + " |"]
    lines += ["", "float16 sizes: tied head (the source model) " + ", ".join(
        f"{results['fp16_bytes']['tied'][r] / 1e6:.1f}" for r in rates) + " MB; rotated (untied head) " + ", ".join(
        f"{results['fp16_bytes']['untied'][r] / 1e6:.1f}" for r in rates) + " MB at rates " + ", ".join(rates) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--items", type=int, default=50, help="first N items per task")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--keep", action="store_true",
                        help="keep the variants --output already holds when it was measured with the same settings")
    parser.add_argument("--output", default=str(RESULTS / "quantization.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    settings = {"windows": args.windows, "items": args.items, "calib_samples": args.calib_samples,
                "calib_seqlen": args.calib_seqlen, "rates": list(RATES)}
    output = Path(args.output)
    previous = json.loads(output.read_text()) if args.keep and output.exists() else {}
    if previous and any(previous.get(k) != v for k, v in settings.items()):
        sys.exit(f"{output} was measured with other settings; run without --keep to measure everything again")
    results = previous or {**settings, "commands": [], "threads": torch.get_num_threads(), "variants": {}}
    results["commands"].append(command_line())
    floats = {rotate: Checkpoint(float_checkpoint(rotate)) for rotate in (False, True)}
    results["fp16_bytes"] = {"untied" if rotate else "tied": {str(r): c.rate_entry(r)["weight_bytes"] // 2
                                                               for r in RATES} for rotate, c in floats.items()}
    if "float" not in results:
        print("float32", flush=True)
        results["float"] = evaluate(floats[False], args.windows, args.items)
    for name, (rotate, fields) in VARIANTS.items():
        if name in results["variants"]:
            continue
        print(name, f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        options = QuantizeOptions(**fields, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
        slug = "-".join(str(v) for v in fields.values())
        out = cache_dir() / "bench" / f"smollm2-q4-{slug}{'-rotated' if rotate else ''}.elastiq"
        ckpt = Checkpoint(quantize_checkpoint(floats[rotate].path, out, options, overwrite=True, progress=False))
        results["variants"][name] = {
            "seconds": options.timings["quantize"], "load_average": os.getloadavg()[0],
            "bytes": {str(r): ckpt.rate_entry(r)["weight_bytes"] for r in RATES},
            "eval": evaluate(ckpt, args.windows, args.items),
        }
        save_results(output, results)  # partial results survive a stop
    save_results(output, results, to_markdown(results))


if __name__ == "__main__":
    main()
