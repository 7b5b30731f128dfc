"""Which loss recovers a nested checkpoint best: the next-token loss, distillation from the dense model, or both.

Starts from a sorted float checkpoint of SmolLM2-135M-Instruct (``elastiq compress``) and trains
nested LoRA at every offered rate with the same training tokens per variant (steps x batch x
seqlen of the packaged C4 sample, the held-out documents excluded):
- ``sort``: no training (the start checkpoint);
- ``lm``: the next-token loss only (the earlier default);
- ``lm+dense``: the next-token loss plus KL(dense || rate) at temperature 1, where the dense
  model is the unpruned float model the training started from;
- ``dense``: KL(dense || rate) only;
- ``dense-long``: ``dense`` with ``--long`` times the steps (a longer schedule).
Each rate is measured in float32 on the same windows for every variant: KL to the dense model
and perplexity on WikiText-2 test windows, and on the C4 sample's held-out documents (which no
variant trained on). Differences against ``lm`` are paired by window, with standard errors.
Writes benchmarks/results/distillation.{json,md}.

    python benchmarks/distillation.py START.elastiq --steps 200 --windows 16 --c4-windows 16
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

import torch
import torch.nn.functional as F

from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
from elastiq.compressor.recover import RecoverOptions, recover_checkpoint
from elastiq.evaluation.perplexity import wikitext2_tokens
from elastiq.modeling.model import Transformer
from elastiq.paths import data_dir

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"lm": dict(distill=0.0, lm_weight=1.0), "lm+dense": dict(distill=1.0, temperature=1.0, lm_weight=1.0),
            "dense": dict(distill=1.0, temperature=1.0, lm_weight=0.0),
            "dense-long": dict(distill=1.0, temperature=1.0, lm_weight=0.0)}


def windows(tokenizer, count: int, c4_count: int, seqlen: int) -> dict[str, torch.Tensor]:
    """The evaluation windows: the first ``count`` WikiText-2 test windows and ``c4_count`` from
    the C4 sample's held-out documents (the ones compression measures quality on, and more)."""
    wiki = wikitext2_tokens(tokenizer, data_dir())[:count * seqlen].view(count, seqlen)
    c4 = calibration_samples(tokenizer, data_dir() / C4_SAMPLE, 1, seqlen, 0, heldout=c4_count)[1:]
    return {"wikitext2": wiki, "c4-heldout": c4}


@torch.inference_mode()
def dense_logprobs(start: Checkpoint, data: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per corpus, each window's next-token log-probabilities [T-1, vocab] under ``start`` at rate 0
    (the dense model: sorting is exact there), float32."""
    reference = Transformer.from_weights(start.read_rate(0.0), start.config).eval()
    return {c: [reference(w[None])[0, :-1].float().log_softmax(-1) for w in ws] for c, ws in data.items()}


@torch.inference_mode()
def per_window(model: Transformer, dense: dict[str, list[torch.Tensor]], data: dict[str, torch.Tensor]) -> dict:
    """Per window: mean NLL, and mean KL(dense || model) over its tokens."""
    out = {}
    for corpus, ws in data.items():
        nll, kl = [], []
        for w, ref in zip(ws, dense[corpus]):
            logp = model(w[None])[0, :-1].float().log_softmax(-1)
            nll.append(F.nll_loss(logp, w[1:]).item())
            kl.append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0).mean().item())
        out[corpus] = {"nll": nll, "kl": kl}
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt n)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(len(t))).item() if len(t) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", help="the sorted float checkpoint (elastiq compress ... -o START.elastiq)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--long", type=int, default=3, help="dense-long trains this many times the steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of --eval-seqlen tokens")
    parser.add_argument("--c4-windows", type=int, default=16, help="held-out C4 windows of --eval-seqlen tokens")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--work", default="/tmp/elastiq-distillation", help="where trained checkpoints go")
    parser.add_argument("--output", default=str(RESULTS / "distillation.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = Checkpoint(args.start)
    config, tokenizer = start.config, start.tokenizer()
    data = windows(tokenizer, args.windows, args.c4_windows, args.eval_seqlen)
    dense = dense_logprobs(start, data)
    results = {"command": "python " + shlex.join(sys.argv), "start": str(args.start),
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "windows": args.windows,
               "c4_windows": args.c4_windows, "eval_seqlen": args.eval_seqlen, "variants": {}}
    names = ["sort"] + [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        path, seconds, tokens = Path(args.start), 0.0, 0
        if name != "sort":
            steps = args.steps * (args.long if name.endswith("-long") else 1)
            options = RecoverOptions(steps=steps, batch=args.batch, seqlen=args.seqlen, **VARIANTS[name])
            path = recover_checkpoint(args.start, Path(args.work) / f"{name.replace('+', '-')}.elastiq", options,
                                      overwrite=True)
            seconds, tokens = options.timings["train"], steps * args.batch * args.seqlen
            print(f"{name}: trained {seconds:.0f} s", flush=True)
        ckpt = Checkpoint(path)
        variant = {"train_seconds": seconds, "tokens": tokens, "rates": {}}
        for rate in ckpt.rates:
            model = Transformer.from_weights(ckpt.read_rate(rate), config).eval()
            variant["rates"][str(rate)] = per_window(model, dense, data)
            w = variant["rates"][str(rate)]
            print(f"{name} @ {rate}: " + ", ".join(f"{c} ppl {math.exp(mean_se(m['nll'])[0]):.2f} "
                                                   f"KL {mean_se(m['kl'])[0]:.3f}" for c, m in w.items()), flush=True)
        results["variants"][name] = variant
        write_text(Path(args.output), json.dumps(results, indent=2) + "\n")  # partial results survive a stop
    write_text(Path(args.output).with_suffix(".md"), markdown(results) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    """KL and perplexity per variant and rate, and each variant's paired difference against ``lm``."""
    variants = results["variants"]
    first = next(iter(variants.values()))
    lines = [f"Command: `{results['command']}`", "",
             f"SmolLM2-135M-Instruct; every rate measured in float32 on {results['windows']} WikiText-2 test windows "
             f"and {results['c4_windows']} held-out C4 windows of {results['eval_seqlen']} tokens; KL is "
             "KL(dense || rate), mean over tokens; ± is the standard error over windows (paired against `lm` in "
             f"the Δ columns). {results['threads']} threads.", "",
             "| variant | tokens | train s | rate | WikiText-2 ppl | WikiText-2 KL | Δ KL vs lm | C4 held-out ppl "
             "| C4 KL | Δ KL vs lm |", "|---" * 10 + "|"]
    for rate in first["rates"]:
        for name, v in variants.items():
            r = v["rates"].get(rate)
            if r is None:
                continue
            cells = []
            for corpus in ("wikitext2", "c4-heldout"):
                m = r[corpus]
                kl, kl_se = mean_se(m["kl"])
                cells += [f"{math.exp(mean_se(m['nll'])[0]):.2f}", f"{kl:.3f} ± {kl_se:.3f}"]
                base = variants.get("lm", {}).get("rates", {}).get(rate)
                if base is None or name == "lm":
                    cells.append("")
                else:
                    d, se = mean_se([a - b for a, b in zip(m["kl"], base[corpus]["kl"])])
                    cells.append(f"{d:+.3f} ± {se:.3f}")
            lines.append(f"| {name} | {v['tokens']:,} | {v['train_seconds']:.0f} | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
