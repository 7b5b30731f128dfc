"""ONNX export of SmolLM2-135M-Instruct's nested checkpoints: export time, file size, agreement with
the elastic runtime, and onnxruntime's prefill and decode speed per rate.

For the 4-bit checkpoint (GPTQ, least-important-first) and the float one it is quantized from, at
every rate: (a) the wall time of ``write_onnx`` and the file's size; (b) the max abs logit
difference from the elastic runtime (float32) over a ``--prompt``-token WikiText-2 prefill and
``--decode`` greedy decode steps fed the presents back, and how many greedy tokens agree with the
runtime's argmax; (c) onnxruntime's prefill tokens/s (``--prompt`` tokens, median of ``--repeats``
prefills) and decode tokens/s (median step time of the decode steps after that prefill), on the
CPU execution provider with as many intra-op threads as torch uses. Writes
benchmarks/results/export_onnx.{json,md}.

    nice python benchmarks/export_onnx.py
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

import numpy as np
import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.evaluation.perplexity import wikitext2_tokens
from elastiq.exporters.onnx import write_onnx
from elastiq.paths import cache_dir, data_dir
from elastiq.modeling.model import Transformer

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.0, 0.15, 0.25, 0.35)
CHECKPOINTS = {"Q4_0 GPTQ least-important-first": "smollm2-q4-gptq-least-important-first.elastiq",
               "float32": "smollm2-uniql.elastiq"}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, ids: np.ndarray, start: int, cache: dict) -> tuple[np.ndarray, dict, float]:
    """One call for tokens ``ids`` [1, T] at positions start..start+T-1: logits, next cache, seconds."""
    T = ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, start + T), np.int64),
            "position_ids": np.arange(start, start + T, dtype=np.int64)[None], **cache}
    names = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    outs = sess.run(names, feed)
    seconds = time.perf_counter() - t0
    return outs[0], {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}, seconds


def measure(ckpt: Checkpoint, rate: float, prompt: np.ndarray, args, folder: Path) -> dict:
    t0 = time.perf_counter()
    path = write_onnx(ckpt.path, rate, folder / f"{rate}.onnx")
    export_s = time.perf_counter() - t0
    file_bytes = path.stat().st_size
    sess = session(path, torch.get_num_threads())
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
             if i.name.startswith("past_key_values.")}
    prefill_s = [run(sess, prompt, 0, empty)[2] for _ in range(args.repeats)]
    logits, cache, _ = run(sess, prompt, 0, empty)
    steps, tokens, step_s = [logits[0]], [], []
    for _ in range(args.decode):
        tokens.append(int(steps[-1][-1].argmax()))
        out, cache, seconds = run(sess, np.array([[tokens[-1]]], np.int64), prompt.shape[1] + len(tokens) - 1, cache)
        steps.append(out[0])
        step_s.append(seconds)
    ort_logits = np.concatenate(steps)  # logits at every position of prompt + generated tokens
    sequence = torch.tensor(np.concatenate([prompt[0], tokens]))[None]
    model = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
    with torch.inference_mode():
        expected = model(sequence).numpy()[0]
    greedy = expected[prompt.shape[1] - 1:-1].argmax(-1)
    path.unlink()
    return {"export_s": export_s, "file_bytes": file_bytes,
            "max_abs_logit_diff": float(np.abs(ort_logits - expected).max()),
            "max_abs_logit": float(np.abs(expected).max()),
            "greedy_agree": int((greedy == np.array(tokens)).sum()),
            "prefill_tokens_per_s": prompt.shape[1] / statistics.median(prefill_s),
            "decode_tokens_per_s": 1 / statistics.median(step_s)}


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct nested checkpoints (elastiq sort + influence allocation), exported with "
             f"`write_onnx` and run by onnxruntime {results['onnxruntime']} on the CPU execution provider with "
             f"{results['threads']} intra-op threads. Logit difference: max abs over a {results['prompt']}-token "
             f"WikiText-2 prefill and {results['decode']} greedy decode steps fed their presents back, against the "
             f"elastic runtime in float32 on the whole sequence. Prefill: {results['prompt']} tokens, median of "
             f"{results['repeats']}. Decode: median step after that prefill, batch 1. The machine's 2 cores were "
             f"shared with other jobs (1-minute load average {results['load_average_before']:.1f} before, "
             f"{results['load_average_after']:.1f} after), so the speeds are lower bounds.", "",
             "| checkpoint | rate | export s | file MB | max abs logit diff | greedy tokens agreeing | "
             "prefill tokens/s | decode tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, by_rate in results["checkpoints"].items():
        for rate, r in by_rate.items():
            lines.append(f"| {name} | {rate} | {r['export_s']:.1f} | {r['file_bytes'] / 1e6:.1f} | "
                         f"{r['max_abs_logit_diff']:.2e} (of logits up to {r['max_abs_logit']:.0f}) | "
                         f"{r['greedy_agree']}/{results['decode']} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "export_onnx.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "prompt": args.prompt,
               "decode": args.decode, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "onnxruntime": ort.__version__, "rates": list(RATES), "load_average_before": os.getloadavg()[0],
               "checkpoints": {}}
    for name, folder_name in CHECKPOINTS.items():
        ckpt = Checkpoint(cache_dir() / "bench" / folder_name)
        prompt = wikitext2_tokens(ckpt.tokenizer(), data_dir())[:args.prompt].numpy()[None].astype(np.int64)
        results["checkpoints"][name] = {}
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            for rate in RATES:
                r = measure(ckpt, rate, prompt, args, Path(tmp))
                results["checkpoints"][name][str(rate)] = r
                print(name, rate, r, flush=True)
                write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop
    results["load_average_after"] = os.getloadavg()[0]
    write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    table = to_markdown(results)
    write_text(Path(args.output).with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
