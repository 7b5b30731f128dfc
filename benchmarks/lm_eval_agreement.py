"""elastiq's scorer against lm-evaluation-harness itself, on the real SmolLM2-135M-Instruct.

Both score the first ``--items`` items of the five tasks from the packaged data: the harness
through its own task configs written from the raw files (``elastiq.evaluation.harness``) and
``HFLM``, elastiq through its task loaders and scorer. Reports the largest per-choice
log-likelihood difference, how many predictions differ, and both accuracies per task. Writes
benchmarks/results/lm_eval_agreement.{json,md}.

    python benchmarks/lm_eval_agreement.py --items 50
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from elastiq.atomic import write_text
from elastiq.compressor.intake import load_model
from elastiq.evaluation.harness import run_lm_eval
from elastiq.evaluation.loglikelihood import encode_pair, score
from elastiq.evaluation.suite import hf_logits
from elastiq.evaluation.tasks import TASKS
from elastiq.evaluation.zeroshot import accuracies
from elastiq.paths import data_dir

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50, help="first N items of each task")
    parser.add_argument("--output", default=str(RESULTS / "lm_eval_agreement.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    loaded = load_model("smollm2-135m")
    data = data_dir()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        reference = run_lm_eval(loaded.model, loaded.tokenizer, list(TASKS), data, Path(work), args.items)
    harness_seconds = time.perf_counter() - start
    rows, out = [], {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "items": args.items,
                     "harness_seconds": harness_seconds, "tasks": {}}
    start = time.perf_counter()
    for name, task in TASKS.items():
        items = task.load(data)[:args.items]
        requests = [encode_pair(loaded.tokenizer, c, x) for item in items for c, x in item.requests()]
        flat = iter(score(hf_logits(loaded.model), requests, max_length=2048))
        ours = [[next(flat) for _ in item.choices] for item in items]
        theirs = reference[name]["loglikelihoods"]
        diff = max(abs(a - b) for mine, harness in zip(ours, theirs) for a, b in zip(mine, harness))
        mine = accuracies(items, ours)
        differ = sum(max(range(len(a)), key=a.__getitem__) != max(range(len(b)), key=b.__getitem__)
                     for a, b in zip(ours, theirs))
        metric = task.metric
        out["tasks"][name] = {"metric": metric, "max_abs_loglikelihood_diff": diff, "acc_predictions_differ": differ,
                              "elastiq": mine[metric], "lm_eval": reference[name][metric]}
        rows.append(f"| {name} | {metric} | {100 * mine[metric]:.2f} | {100 * reference[name][metric]:.2f} "
                    f"| {diff:.2e} | {differ} |")
    out["elastiq_seconds"] = time.perf_counter() - start
    table = "\n".join([
        f"Command: `{out['command']}`", "",
        f"SmolLM2-135M-Instruct (float32), first {args.items} items per task; lm-eval 0.4.13 run offline with "
        "HFLM on task configs written from the same files.", "",
        "| task | metric | elastiq | lm-eval | max abs log-likelihood diff | argmax differs (items) |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Wall time: lm-eval {harness_seconds:.0f} s, elastiq {out['elastiq_seconds']:.0f} s.", ""])
    write_text(Path(args.output), json.dumps(out, indent=2) + "\n")
    write_text(Path(args.output).with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
