"""What ``torch.compile`` (Inductor's CPU backend) buys the torch runtime's decode step, as the model is written today.

The torch Engine opens each rate of a 4-bit checkpoint (bfloat16 activations on the int4 codes),
prefills a prompt eagerly, then decodes greedy tokens one at a time: eagerly, and through
``torch.compile(decode_step, dynamic=True)``, where ``decode_step`` is the model's forward at one
position of the KV cache (the position symbolic, so that one graph serves every step). Reported:
the first compiled call's seconds (compiling; Inductor's on-disk cache is emptied first), steady
decode tok/s of both paths (medians of --repeats runs of --decode-tokens steps), and whether the
greedy tokens are equal, and from torch.profiler over one eager decode run, the 4-bit matmuls' calls
and milliseconds a step and their share of the ops' time (the profile slows each op down a little).
The rate switch is not exercised: each rate is compiled in its own process. ``--kernels
elastiq,torch`` runs each rate with elastiq's CPU ops and with torch's ops; ``--skip-module-guards``
compiles without guards on the model's modules, whose evaluation costs milliseconds a step.

    python benchmarks/compiled_decode.py CKPT.elastiq --rates 0.0,0.35 --kernels elastiq,torch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from elastiq.atomic import write_text
from measure import prompt_ids, run_child

RESULTS = Path(__file__).resolve().parent / "results"


def child(spec: dict) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # the first call pays the whole compile
    os.environ["ELASTIQ_CPU_KERNEL"] = spec.get("kernel", "elastiq")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from elastiq.runtime.engine import Engine

    torch.set_num_threads(spec["threads"])
    engine = Engine(spec["checkpoint"], spec["rate"], ctx=spec["ctx"])
    model, generator = engine.model, engine.generator
    ids = prompt_ids(engine.tokenizer, spec["prompt_tokens"])

    def step(token: torch.Tensor, start: int) -> torch.Tensor:
        return model(token, start=start, last_only=True)[0, -1]

    # skipping the guards on the model's modules is safe here (one rate a process, nothing resized)
    # and takes their evaluation (~4 ms a step on SmolLM2) out of every call
    skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    options = {"guard_filter_fn": skip} if spec["skip_module_guards"] else {}
    compiled = torch.compile(step, dynamic=True, options=options)

    @torch.inference_mode()
    def decode(fn, around=contextlib.nullcontext()) -> tuple[list[int], float, float]:
        """Greedy tokens from the prompt; seconds of the first step and of the rest. The decode
        steps, not the prefill, run inside the context ``around``."""
        generator.reset()
        logits, _ = generator.prefill(ids)
        tokens, times = [], []
        with around:
            for _ in range(spec["decode_tokens"]):
                tokens.append(int(logits.argmax()))
                start = time.perf_counter()
                logits = fn(torch.tensor([[tokens[-1]]]), len(generator.cached))
                times.append(time.perf_counter() - start)
                generator.cached.append(tokens[-1])
        return tokens, times[0], sum(times[1:])

    steps = spec["decode_tokens"] - 1
    eager = [decode(step) for _ in range(spec["repeats"])]
    prof = profile(activities=[ProfilerActivity.CPU])
    decode(step, prof)
    ops = prof.key_averages()
    total = sum(op.self_cpu_time_total for op in ops)
    int4 = [op for op in ops if "int4pack_mm" in op.key or op.key == "elastiq::q4_matmul"]
    first = decode(compiled)
    runs = [decode(compiled) for _ in range(spec["repeats"])]
    return {"eager_tok_s": statistics.median(steps / r[2] for r in eager),
            "compiled_tok_s": statistics.median(steps / r[2] for r in runs),
            "compile_s": first[1], "equal_tokens": all(r[0] == eager[0][0] for r in [first, *runs]),
            "agree": next((i for i, (a, b) in enumerate(zip(first[0], eager[0][0])) if a != b), len(first[0])),
            "int4_share": sum(op.self_cpu_time_total for op in int4) / total,
            "int4_calls_per_step": sum(op.count for op in int4) / spec["decode_tokens"],
            "int4_ms_per_step": sum(op.self_cpu_time_total for op in int4) / 1e3 / spec["decode_tokens"]}


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             f"torch {results['torch']}, {results['threads']} threads, CPU: {results['cpu']}. Prompt "
             f"{results['prompt_tokens']} tokens (prefilled eagerly), {results['decode_tokens']} greedy decode steps, "
             f"medians of {results['repeats']} runs; each rate in its own process"
             + ("; compiled without guards on the model's modules" if results.get("skip_module_guards") else "")
             + ".", "",
             "| rate (, CPU kernel if not elastiq's) | eager decode tok/s | compiled decode tok/s | compiled / eager | "
             "first compiled call s | greedy tokens equal to eager | 4-bit matmuls a step | their ms a step | "
             "their share of eager op time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate, r in results["rates"].items():
        equal = "all" if r["equal_tokens"] else f"first {r['agree']}"
        lines.append(f"| {rate} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | "
                     f"{r['compiled_tok_s'] / r['eager_tok_s']:.2f} | {r['compile_s']:.0f} | {equal} | "
                     f"{r['int4_calls_per_step']:.0f} | {r['int4_ms_per_step']:.1f} | {r['int4_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rates", default="0.0,0.35")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-module-guards", action="store_true",
                        help="compile without guards on the model's modules "
                        "(torch.compiler.skip_guard_on_all_nn_modules_unsafe)")
    parser.add_argument("--kernels", default="elastiq", help="CPU kernels to run each rate with, comma-separated: "
                        "elastiq (its own CPU ops), torch (torch's int4 op and torch paths)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child[1]))))
        return
    import torch

    from elastiq.runtime.fastest import cpu_signature

    spec = {k: getattr(args, k) for k in ("checkpoint", "prompt_tokens", "decode_tokens", "ctx", "repeats", "threads",
                                          "skip_module_guards")}
    results = {"command": "python benchmarks/compiled_decode.py " + shlex.join(sys.argv[1:]), **spec,
               "torch": torch.__version__, "cpu": cpu_signature(), "rates": {}}
    for rate in (float(r) for r in args.rates.split(",")):
        for kernel in args.kernels.split(","):
            key = str(rate) if kernel == "elastiq" else f"{rate}, {kernel}"
            results["rates"][key] = run_child(__file__, "decode", {**spec, "rate": rate, "kernel": kernel})
            print(key, results["rates"][key], file=sys.stderr, flush=True)
    write_text(RESULTS / "compiled_decode.json", json.dumps(results, indent=1))
    write_text(RESULTS / "compiled_decode.md", to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
