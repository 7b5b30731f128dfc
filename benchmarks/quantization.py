"""4-bit quantization of SmolLM2-135M-Instruct's nested checkpoint: size, perplexity, wall time.

Quantizes the sorted float checkpoint (elastiq's sort + influence allocation; ``--rotate``d for
the rotation rows) with round-to-nearest and with GPTQ in both column orders, then measures:
(a) each rate's weight bytes against the same weights in float16; (b) WikiText-2 perplexity on
the first ``--windows`` windows of 2048 tokens at every rate, beside the float model; (c) the
wall time of each quantization. Writes benchmarks/results/quantization.{json,md}.

    python benchmarks/quantization.py --windows 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.evaluation.perplexity import perplexity, wikitext2_tokens
from elastiq.paths import cache_dir, data_dir
from elastiq.runtime.model import Transformer

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.0, 0.15, 0.25, 0.35)
VARIANTS = {  # name: (rotated float checkpoint?, method, order)
    "RTN": (False, "rtn", "forward"),
    "GPTQ least-important-first": (False, "gptq", "least-important-first"),
    "GPTQ forward": (False, "gptq", "forward"),
    "rotation + RTN": (True, "rtn", "forward"),
    "rotation + GPTQ least-important-first": (True, "gptq", "least-important-first"),
}


def float_checkpoint(rotate: bool) -> Path:
    """The sorted float checkpoint (reused from the cache when present)."""
    path = cache_dir() / "bench" / f"smollm2-uniql{'-rotated' if rotate else ''}.elastiq"
    if not path.exists():
        compress("smollm2-135m", path, CompressOptions(rates=RATES, rotate=rotate))
    return path


def ppl_by_rate(ckpt: Checkpoint, tokens: torch.Tensor, windows: int) -> dict[str, float]:
    config = ckpt.manifest["source"]["config"]
    out = {}
    for rate in RATES:
        model = Transformer.from_weights(ckpt.read_rate(rate), config)
        with torch.inference_mode():
            out[str(rate)] = perplexity(model, tokens, 2048, windows, progress=False)["ppl"]
        print(f"  rate {rate}: ppl {out[str(rate)]:.2f}", flush=True)
    return out


def to_markdown(results: dict) -> str:
    """Perplexity per variant and rate; weight bytes and compression against float16, both the
    same rate's weights and the dense (rate 0) model, as UniQL reports it."""
    rates = [str(r) for r in results["rates"]]
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF as the float source), sorted (elastiq sort + influence "
             f"allocation), WikiText-2 perplexity over the first {results['windows']} windows of 2048 tokens. "
             f"Quantized weights are dequantized to float32 to run. GPTQ calibration: {results['calib_samples']} "
             f"C4 windows of {results['calib_seqlen']} tokens.", "",
             "| model | " + " | ".join(f"ppl @ {r}" for r in rates) + " | quantize s |", "|---" * (len(rates) + 2) + "|"]
    for name, f in results["float"].items():
        lines.append(f"| {name} | " + " | ".join(f"{f['ppl'][r]:.2f}" for r in rates) + " | - |")
    for name, v in results["variants"].items():
        lines.append(f"| Q4_0 {name} | " + " | ".join(f"{v['ppl'][r]:.2f}" for r in rates) + f" | {v['seconds']:.0f} |")
    lines += ["", "| weights | " + " | ".join(f"rate {r}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    dense = results["float"]["float32"]["fp16_bytes"][rates[0]]  # the original model in float16, tied head
    for rotated, variant, label in ((False, "RTN", "tied head"), (True, "rotation + RTN", "rotated, untied head")):
        fp16 = results["float"]["float32 (rotated)" if rotated else "float32"]["fp16_bytes"]
        q4 = results["variants"][variant]["bytes"]
        lines += [f"| float16, {label} (MB) | " + " | ".join(f"{fp16[r] / 1e6:.1f}" for r in rates) + " |",
                  f"| Q4_0, {label} (MB) | " + " | ".join(f"{q4[r] / 1e6:.1f}" for r in rates) + " |",
                  f"| vs float16 at the same rate, {label} | " + " | ".join(f"{fp16[r] / q4[r]:.2f}x" for r in rates) + " |",
                  f"| vs the dense float16 model, {label} | " + " | ".join(f"{dense / q4[r]:.2f}x" for r in rates)
                  + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--output", default=str(RESULTS / "quantization.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "windows": args.windows,
               "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen, "rates": list(RATES),
               "threads": torch.get_num_threads(), "float": {}, "variants": {}}
    floats = {rotate: Checkpoint(float_checkpoint(rotate)) for rotate in (False, True)}
    tokens = wikitext2_tokens(floats[False].tokenizer(), data_dir())
    for rotate, ckpt in floats.items():
        name = "float32 (rotated)" if rotate else "float32"
        print(name, flush=True)
        results["float"][name] = {"ppl": ppl_by_rate(ckpt, tokens, args.windows),
                                  "fp16_bytes": {str(r): ckpt.rate_entry(r)["weight_bytes"] // 2 for r in RATES}}
    for name, (rotate, method, order) in VARIANTS.items():
        print(name, flush=True)
        options = QuantizeOptions(method=method, order=order, calib_samples=args.calib_samples,
                                  calib_seqlen=args.calib_seqlen)
        out = cache_dir() / "bench" / f"smollm2-q4-{method}-{order}{'-rotated' if rotate else ''}.elastiq"
        ckpt = Checkpoint(quantize_checkpoint(floats[rotate].path, out, options, overwrite=True))
        fp16 = results["float"]["float32 (rotated)" if rotate else "float32"]["fp16_bytes"]
        results["variants"][name] = {
            "seconds": options.timings["quantize"],
            "bytes": {str(r): ckpt.rate_entry(r)["weight_bytes"] for r in RATES},
            "ratio_vs_fp16": {str(r): fp16[str(r)] / ckpt.rate_entry(r)["weight_bytes"] for r in RATES},
            "ppl": ppl_by_rate(ckpt, tokens, args.windows),
        }
        write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop

    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    table = to_markdown(results)
    write_text(Path(args.output).with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
