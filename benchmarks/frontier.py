"""Quality per byte: elastiq's rates against llama.cpp's own quantizations of the dense model, all run in llama.cpp.

The dense model is rate 0 of a float elastiq checkpoint (sorting alone does not change the
model), exported as an F32 GGUF; llama.cpp quantizes that file to each standard type
(``llama_cpp.llama_model_quantize``: Q8_0, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K). Each elastiq
checkpoint given is exported at every rate it offers (``elastiq export --format gguf``). Every
GGUF file is then run in llama.cpp on the same token windows:
- WikiText-2 test windows and held-out C4 windows (documents no elastiq stage calibrated or
  trained on): perplexity, and KL(dense || model) per token, its mean and 99th percentile, and
  top-1 agreement (llama.cpp's ``--kl-divergence`` measures), with the dense F32 file as reference;
- accuracy on the tasks given (the first ``--items`` items each; by default last-word prediction,
  which moves with compression where the multiple-choice tasks sit near chance for small models).
Each elastiq row is compared with the smallest llama.cpp file at or above its size, paired per
window (KL, NLL) and per item (accuracy), with standard errors. Writes
benchmarks/results/frontier.{json,md,png}.

    python benchmarks/frontier.py FLOAT.elastiq --elastiq default=Q4.elastiq recovered=R.elastiq \
        --windows 16 --c4-windows 16 --items 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.calibrate import C4_SAMPLE, heldout_windows
from elastiq.evaluation.perplexity import wikitext2_tokens
from elastiq.evaluation.suite import run_suite
from elastiq.exporters.gguf import write_gguf
from elastiq.paths import data_dir

from distillation import mean_se  # the script's folder is on sys.path
from measure import quantize

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_TYPES = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


class LlamaLogits:
    """A GGUF file in llama.cpp as an evaluation ``LogitsFn``: ids [B, T] to logits [B, T, V]."""

    def __init__(self, path: Path, ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for row in ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(out)

    def close(self) -> None:
        self.llm.close()


def log_probs(fn: LlamaLogits, windows: torch.Tensor) -> list[torch.Tensor]:
    return [fn(w[None])[0, :-1].log_softmax(-1) for w in windows]


def measure(fn: LlamaLogits, dense: dict[str, list[torch.Tensor]], data: dict[str, torch.Tensor]) -> dict:
    """Per window: mean NLL, mean KL(dense || model), top-1 agreement; and KL's 99th percentile."""
    out = {}
    for corpus, windows in data.items():
        nll, kl, same, every = [], [], [], []
        for w, ref in zip(windows, dense[corpus]):
            logp = fn(w[None])[0, :-1].log_softmax(-1)
            nll.append(-logp.gather(-1, w[1:, None]).mean().item())
            k = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)
            kl.append(k.mean().item())
            every.append(k)
            same.append((ref.argmax(-1) == logp.argmax(-1)).double().mean().item())
        out[corpus] = {"nll": nll, "kl": kl, "top1": same,
                       "kl_p99": torch.quantile(torch.cat(every).double(), 0.99).item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float", help="a float elastiq checkpoint of the model: its rate 0 is the dense model")
    parser.add_argument("--elastiq", nargs="+", default=[], metavar="NAME=CKPT",
                        help="elastiq checkpoints to place on the frontier, every rate each")
    parser.add_argument("--types", default=",".join(LLAMA_TYPES), help="llama.cpp quantization types")
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows")
    parser.add_argument("--c4-windows", type=int, default=16, help="held-out C4 windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--tasks", default="last_word", help="zero-shot tasks (comma-separated; '' for none)")
    parser.add_argument("--items", type=int, default=200, help="first N items per task")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", default="/tmp/elastiq-frontier", help="where the GGUF files go")
    parser.add_argument("--name", default="frontier", help="results/NAME.{json,md,png}")
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite NAME.md and NAME.png from the measured NAME.json, running nothing")
    args = parser.parse_args()
    if args.tables_only:
        output = RESULTS / f"{args.name}.json"
        results = json.loads(output.read_text())
        write_text(output.with_suffix(".md"), markdown(results) + "\n")
        plot(results, output.with_suffix(".png"))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    base = Checkpoint(args.float)
    tokenizer = base.tokenizer()
    data = {"wikitext2": wikitext2_tokens(tokenizer, data_dir())[:args.windows * args.seqlen].view(-1, args.seqlen),
            "c4-heldout": heldout_windows(tokenizer, data_dir() / C4_SAMPLE, args.c4_windows, args.seqlen)}
    dense_path = work / "dense-f32.gguf"
    if not dense_path.exists():
        write_gguf(base.path, 0.0, dense_path, float_type="f32")
    files = {"dense F32": ("llama.cpp", dense_path)}
    for kind in [t for t in args.types.split(",") if t]:
        files[f"llama.cpp {kind}"] = ("llama.cpp", quantize(dense_path, kind, work / f"dense-{kind}.gguf",
                                                           args.threads))
    for spec in args.elastiq:
        name, _, path = spec.partition("=")
        ckpt = Checkpoint(path)
        for rate in ckpt.rates:
            out = work / f"{name}-{rate}.gguf"
            if not out.exists():
                write_gguf(ckpt.path, rate, out)
            files[f"elastiq {name} {rate}"] = ("elastiq", out)

    ctx = max(args.seqlen, 2048)
    dense_fn = LlamaLogits(dense_path, ctx, args.threads)
    dense = {c: log_probs(dense_fn, w) for c, w in data.items()}
    dense_fn.close()
    tasks = [t for t in args.tasks.split(",") if t]
    results = {"command": "python " + shlex.join(sys.argv), "model": base.source.name, "windows": args.windows,
               "c4_windows": args.c4_windows, "seqlen": args.seqlen, "items": args.items, "tasks": tasks,
               "threads": args.threads, "rows": {}}
    output = RESULTS / f"{args.name}.json"
    for label, (kind, path) in files.items():
        t = time.perf_counter()
        fn = LlamaLogits(path, ctx, args.threads)
        row = {"kind": kind, "file": path.name, "bytes": path.stat().st_size, **measure(fn, dense, data)}
        if tasks:
            suite = run_suite(fn, tokenizer, label, tasks, limit=args.items, progress=False)
            row["tasks"] = {name: {"metric": r["metric"], "per_item": r["per_item"][r["metric"]]}
                            for name, r in suite["tasks"].items()}
        fn.close()
        row["seconds"] = time.perf_counter() - t
        results["rows"][label] = row
        w = row["wikitext2"]
        print(f"{label}: {row['bytes'] / 1e6:.1f} MB, WikiText-2 ppl {math.exp(mean_se(w['nll'])[0]):.2f}, "
              f"KL {mean_se(w['kl'])[0]:.3f} ({row['seconds']:.0f} s)", flush=True)
        write_text(output, json.dumps(results) + "\n")  # partial results survive a stop
    write_text(output.with_suffix(".md"), markdown(results) + "\n")
    plot(results, output.with_suffix(".png"))
    print(markdown(results))


def nearest_above(results: dict, size: int) -> str | None:
    """The smallest llama.cpp quantization at or above ``size`` bytes (the dense file counts)."""
    above = [(r["bytes"], k) for k, r in results["rows"].items() if r["kind"] == "llama.cpp" and r["bytes"] >= size]
    return min(above)[1] if above else None


def markdown(results: dict) -> str:
    rows, tasks = results["rows"], results["tasks"]
    lines = [f"Command: `{results['command']}`", "",
             f"{results['model']}; every file run in llama.cpp ({results['threads']} threads) on the same "
             f"{results['windows']} WikiText-2 test windows and {results['c4_windows']} held-out C4 windows of "
             f"{results['seqlen']} tokens; KL is KL(dense F32 || file) per token (mean ± standard error over "
             f"windows, and 99th percentile over tokens); tasks: first {results['items']} items, accuracy ± "
             "standard error. Δ columns: paired against the smallest llama.cpp file at or above the row's size "
             "(negative KL Δ: closer to dense than it).", ""]
    head = ["file", "MB", "WikiText-2 ppl", "WikiText-2 KL", "KL p99", "same top-1 %", "C4 ppl", "C4 KL"]
    head += [f"{t} %" for t in tasks] + ["compared with", "Δ WikiText-2 KL", "Δ C4 KL"]
    head += [f"Δ {t} pts" for t in tasks]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]):
        w, c = r["wikitext2"], r["c4-heldout"]
        cells = [label, f"{r['bytes'] / 1e6:.1f}", f"{math.exp(mean_se(w['nll'])[0]):.2f}",
                 "{:.3f} ± {:.3f}".format(*mean_se(w["kl"])), f"{w['kl_p99']:.2f}",
                 f"{100 * mean_se(w['top1'])[0]:.1f}", f"{math.exp(mean_se(c['nll'])[0]):.2f}",
                 "{:.3f} ± {:.3f}".format(*mean_se(c["kl"]))]
        for t in tasks:
            cells.append("{:.1f} ± {:.1f}".format(*(100 * x for x in mean_se(r["tasks"][t]["per_item"]))))
        ref = nearest_above(results, r["bytes"]) if r["kind"] == "elastiq" else None
        if ref is None:
            cells += [""] * (3 + len(tasks))
        else:
            o = rows[ref]
            cells.append(ref)
            for corpus in ("wikitext2", "c4-heldout"):
                cells.append("{:+.3f} ± {:.3f}".format(*mean_se([a - b for a, b in zip(r[corpus]["kl"],
                                                                                     o[corpus]["kl"])])))
            for t in tasks:
                d = [a - b for a, b in zip(r["tasks"][t]["per_item"], o["tasks"][t]["per_item"])]
                cells.append("{:+.1f} ± {:.1f}".format(*(100 * x for x in mean_se(d))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + between_checkpoints(rows))


def between_checkpoints(rows: dict) -> list[str]:
    """Each elastiq checkpoint after the first against the first given, rate by rate, paired per
    window (negative: closer to the dense model than the first)."""
    by_name: dict[str, dict[str, dict]] = {}
    for label, r in rows.items():
        if r["kind"] == "elastiq":
            _, name, rate = label.split()
            by_name.setdefault(name, {})[rate] = r
    if len(by_name) < 2:
        return []
    (first, reference), *others = by_name.items()
    lines = ["", f"Against `{first}`, paired per window (Δ = this checkpoint − {first}):", "",
             "| checkpoint | rate | Δ MB | Δ WikiText-2 KL | Δ C4 KL | Δ WikiText-2 NLL | Δ C4 NLL |",
             "|---|---|---|---|---|---|---|"]
    for name, by_rate in others:
        for rate, r in by_rate.items():
            if rate not in reference:
                continue
            o = reference[rate]
            cells = [name, rate, f"{(r['bytes'] - o['bytes']) / 1e6:+.1f}"]
            for measure_ in ("kl", "nll"):
                for corpus in ("wikitext2", "c4-heldout"):
                    d = [a - b for a, b in zip(r[corpus][measure_], o[corpus][measure_])]
                    cells.append("{:+.3f} ± {:.3f}".format(*mean_se(d)))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    """Bytes against WikiText-2 KL and perplexity: llama.cpp's types as one curve, each elastiq
    checkpoint's rates as another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list] = {}
    for label, r in results["rows"].items():
        key = "llama.cpp (dense F32 and its quantizations)" if r["kind"] == "llama.cpp" else \
            "elastiq " + label.split()[1]
        series.setdefault(key, []).append((r["bytes"] / 1e6, mean_se(r["wikitext2"]["kl"])[0],
                                           math.exp(mean_se(r["wikitext2"]["nll"])[0]), label))
    for key, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        for ax, index in ((axes[0], 1), (axes[1], 2)):
            ax.plot(xs, [p[index] for p in points], marker="o", label=key)
    for ax, name in ((axes[0], "KL(dense || file), nats per token"), (axes[1], "perplexity")):
        ax.set_xlabel("file size, MB")
        ax.set_ylabel(f"WikiText-2 {name}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: quality per byte, all run in llama.cpp")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
