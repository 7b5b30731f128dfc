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

    head = "| model | " + " | ".join(f"ppl @ {r}" for r in RATES) + " | quantize s |"
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct (dequantized Q4_1 GGUF as the float source), sorted (elastiq sort + influence "
             f"allocation), WikiText-2 perplexity over the first {args.windows} windows of 2048 tokens. Quantized "
             f"weights are dequantized to float32 to run. GPTQ calibration: {args.calib_samples} C4 windows of "
             f"{args.calib_seqlen} tokens.", "", head, "|---" * (len(RATES) + 2) + "|"]
    for name, f in results["float"].items():
        lines.append(f"| {name} | " + " | ".join(f"{f['ppl'][str(r)]:.2f}" for r in RATES) + " | - |")
    for name, v in results["variants"].items():
        lines.append(f"| Q4_0 {name} | " + " | ".join(f"{v['ppl'][str(r)]:.2f}" for r in RATES)
                     + f" | {v['seconds']:.0f} |")
    lines += ["", "| weights | " + " | ".join(f"rate {r}" for r in RATES) + " |", "|---" * (len(RATES) + 1) + "|"]
    for name, f in results["float"].items():
        lines.append(f"| float16, {name.split(' ', 1)[-1] if 'rotated' in name else 'tied head'} (MB) | "
                     + " | ".join(f"{f['fp16_bytes'][str(r)] / 1e6:.1f}" for r in RATES) + " |")
    for name in ("RTN", "rotation + RTN"):
        v = results["variants"][name]
        lines.append(f"| Q4_0{' rotated (untied head)' if 'rotation' in name else ''} (MB) | "
                     + " | ".join(f"{v['bytes'][str(r)] / 1e6:.1f}" for r in RATES) + " |")
        lines.append(f"| compression vs float16{' (rotated)' if 'rotation' in name else ''} | "
                     + " | ".join(f"{v['ratio_vs_fp16'][str(r)]:.2f}x" for r in RATES) + " |")
    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    write_text(Path(args.output).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
