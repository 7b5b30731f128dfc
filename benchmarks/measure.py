"""What the benchmarks share: a process's peak memory, the machine's memory read bandwidth, the
prompt, child processes, llama.cpp's own quantizations, and writing results (a JSON and its
markdown table, quoting the command that made them)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from elastiq.atomic import write_text


GENERATION = ("prompt_tokens", "decode_tokens", "ctx", "repeats", "threads")


def add_generation_args(parser: argparse.ArgumentParser, prompt_tokens: int) -> None:
    """The options of a speed benchmark's generation runs (``generation_spec`` collects them)."""
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="generations per process (their median)")
    parser.add_argument("--threads", type=int, default=2)


def generation_spec(args: argparse.Namespace) -> dict:
    """The generation options of ``args``, as a child's spec carries them."""
    return {name: getattr(args, name) for name in GENERATION}


def command_line() -> str:
    """The command that ran this benchmark, as its results quote it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def save_results(output: Path, results: dict, table: str | None = None) -> None:
    """Write ``results`` to ``output`` (JSON) and, when given, ``table`` beside it (.md), then print
    the table; each file is replaced whole (``atomic.write_text``)."""
    write_text(output, json.dumps(results, indent=2) + "\n")
    if table is not None:
        write_text(output.with_suffix(".md"), table)
        print(table)


def paired(a: dict, b: dict) -> dict:
    """a − b of two suite results on the same windows and items: WikiText-2 NLL per window, and
    accuracy per item pooled over the tasks, each with its standard error."""
    from elastiq.evaluation.zeroshot import mean_stderr

    dnll = [x - y for x, y in zip(a["wikitext2"]["window_nll"], b["wikitext2"]["window_nll"])]
    dacc = []
    for task, result in a["tasks"].items():
        metric = result["metric"]
        dacc += [x - y for x, y in zip(result["per_item"][metric], b["tasks"][task]["per_item"][metric])]
    return {"nll": sum(dnll) / len(dnll), "nll_stderr": mean_stderr(dnll),
            "acc": sum(dacc) / len(dacc), "acc_stderr": mean_stderr(dacc), "items": len(dacc)}


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which exec resets (Linux's
    ``ru_maxrss`` keeps the value the parent had when it forked, so a large parent would mask
    every child's own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM; peak RSS needs Linux")


def read_bandwidth(threads: int, size: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes a second this process reads from memory with ``threads`` threads: the median of
    ``repeats`` sums of a float32 buffer of ``size`` bytes (far beyond the caches). What a decode
    step that only streamed its weights once could reach: the bound tok/s figures are set against."""
    import time

    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(size // 4)
    buffer.sum()  # pages touched, code warm
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - start)
    return size / sorted(seconds)[repeats // 2]


def quantize(source: Path, kind: str, out: Path, threads: int, requantize: bool = False) -> Path:
    """``source`` (a GGUF file) quantized by llama.cpp to ``kind`` (a ``LLAMA_FTYPE_MOSTLY_*`` suffix),
    kept at ``out``; ``requantize`` lets llama.cpp start from an already quantized file."""
    import llama_cpp

    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    params.allow_requantize = requantize
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    tmp.rename(out)
    return out


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` tokens of WikiText-2 text: the same prompt for every runner."""
    from elastiq.evaluation.perplexity import WIKITEXT2_TEST
    from elastiq.paths import data_dir

    text = (data_dir() / WIKITEXT2_TEST).read_text(encoding="utf-8")[:20 * n]
    return tokenizer.encode(text)[:n]


def run_child(script: str, kind: str, spec: dict) -> dict:
    """Run ``script --child KIND SPEC`` in a fresh process (its peak memory is its own) and return
    the JSON object it prints last."""
    out = subprocess.run([sys.executable, script, "--child", kind, json.dumps(spec)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"
