"""The torch engine's speed at two revisions of elastiq, side by side on one machine in one run.

A change to the runtime is measured against the revision before it: the other revision is
checked out into a temporary git worktree, and every measurement runs in a fresh process that
imports elastiq from one tree or the other, the two trees alternating within each round so that
the machine's drift falls on both. Each process loads the default model's 4-bit checkpoint (the
one ``elastiq run`` builds) at one rate and times greedy generation (median of ``--repeats``);
the table gives each tree's median over ``--rounds`` and their ratio, and how many greedy tokens
the head's first run shares with the base's before they differ. Writes
benchmarks/results/NAME.{json,md} (``--name``, default revisions).

    python benchmarks/revisions.py --base a7f3cbd
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import add_generation_args, command_line, generation_spec, prompt_ids, run_child, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SPEEDS = ("load_s", "prefill_tok_s", "decode_tok_s")  # what the table gives as medians


def import_tree(tree: str) -> None:
    """Make ``import elastiq`` load the package from ``tree`` (a checkout), not the installed one."""
    import importlib.util

    sys.meta_path[:] = [f for f in sys.meta_path if "ditable" not in getattr(f, "__name__", type(f).__name__)]
    for name in [m for m in sys.modules if m == "elastiq" or m.startswith("elastiq.")]:
        del sys.modules[name]  # what this script's own imports loaded from the installed tree
    spec = importlib.util.spec_from_file_location("elastiq", f"{tree}/elastiq/__init__.py",
                                                  submodule_search_locations=[f"{tree}/elastiq", tree])
    module = importlib.util.module_from_spec(spec)
    sys.modules["elastiq"] = module
    spec.loader.exec_module(module)


def child_generate(spec: dict) -> dict:
    import_tree(spec["tree"])
    import torch

    import elastiq.runtime.engine
    from elastiq.runtime.engine import Engine

    if not Path(elastiq.runtime.engine.__file__).is_relative_to(spec["tree"]):
        raise RuntimeError(f"imported {elastiq.runtime.engine.__file__}, not from {spec['tree']}")
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    engine = Engine(spec["checkpoint"], spec["rate"], ctx=spec["ctx"])
    load = time.perf_counter() - start
    ids = prompt_ids(engine.tokenizer, spec["prompt_tokens"])
    prefill, decode = [], []
    for _ in range(spec["repeats"]):
        engine.generator.reset()
        stats = engine.generator.generate(ids, spec["decode_tokens"])
        prefill.append(stats.prefilled / stats.prefill_s)
        decode.append(stats.decoded / stats.decode_s)
    return {"load_s": load, "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "tokens": stats.tokens}


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 (torch's int4 kernels are much faster with it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    return f"{model} ({'with' if 'avx512' in info else 'without'} AVX-512)"


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             f"The torch engine (int4 weights, bfloat16 activations) on `{Path(results['checkpoint']).name}` at "
             f"`{results['base']}` (base) and `{results['head']}` (head), {results['device']}. Prompt "
             f"{results['prompt_tokens']} tokens, {results['decode_tokens']} decoded greedily, {results['threads']} "
             f"threads; each cell is the median over {results['rounds']} rounds of fresh processes (each the median "
             f"of {results['repeats']} generations), base and head alternating.", "",
             "| rate | base prefill tok/s | head prefill tok/s | head / base | base decode tok/s | head decode tok/s "
             "| head / base | greedy tokens equal |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rates"]:
        b, h = row["base"], row["head"]
        tokens = [row["runs"][name][0].get("tokens") for name in ("base", "head")]
        equal = "-" if None in tokens else next((f"first {i} of {len(tokens[0])}" for i, (x, y)
                                                in enumerate(zip(*tokens)) if x != y), "all")
        lines.append(f"| {row['rate']} | {b['prefill_tok_s']:.0f} | {h['prefill_tok_s']:.0f} | "
                     f"{h['prefill_tok_s'] / b['prefill_tok_s']:.2f} | {b['decode_tok_s']:.1f} | "
                     f"{h['decode_tok_s']:.1f} | {h['decode_tok_s'] / b['decode_tok_s']:.2f} | {equal} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="revisions", help="results file stem in benchmarks/results/")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_generation_args(parser, prompt_tokens=128)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"generate": child_generate}[args.child[0]](json.loads(args.child[1]))))
        return
    if not args.base:
        parser.error("--base REV is required")

    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.resolve import resolve_checkpoint

    ckpt = Checkpoint(resolve_checkpoint("smollm2-135m"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            trees = {"base": str(base_tree), "head": str(ROOT)}
            runs = {(rate, name): [] for rate in ckpt.rates for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for rate in ckpt.rates:
                    for name in order:
                        spec = {**generation_spec(args), "tree": trees[name], "checkpoint": str(ckpt.path),
                                "rate": rate}
                        runs[rate, name].append(run_child(__file__, "generate", spec))
                        print(rate, name, runs[rate, name][-1], file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    import torch

    def median(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    results = {"command": command_line(), "checkpoint": str(ckpt.path), "base": args.base, "head": head,
               "device": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}", "rounds": args.rounds,
               **generation_spec(args),
               "rates": [{"rate": rate, **{name: {k: median(runs[rate, name], k) for k in SPEEDS}
                                           for name in ("base", "head")}, "runs": {n: runs[rate, n] for n in trees}}
                         for rate in ckpt.rates]}
    save_results(RESULTS / f"{args.name}.json", results, to_markdown(results))


if __name__ == "__main__":
    main()
