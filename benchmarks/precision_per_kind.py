"""What a few more bits buy, per tensor kind: 8-bit (Q8_0) instead of 4-bit (Q4_0) for one kind of matrix.

llama.cpp keeps some tensors at 6-8 bits in its 4-bit types (the output matrix always; in its _M
mixes also half of ``attn_v`` and ``ffn_down``, more of them in the first and last blocks). This
measures which of those choices pays per byte on elastiq's nested checkpoints. From a sorted float
checkpoint (``elastiq compress --no-recover --no-quantize``), every rate is fake-quantized by
round-to-nearest: every matrix to Q4_0 (4.5 bits a weight) except the variant's kind, held at
Q8_0 (8.5 bits). Blocks of 32 run along each matrix's input axis as ``Checkpoint.read_rate``
returns it, and the 1-D norms stay float. Each variant's KL(dense || variant) and perplexity are
measured in float32 on WikiText-2 test windows and held-out C4 windows (the documents calibration
never reads), paired by window against the all-4-bit baseline; the extra bytes are the variant's
matrices at 8.5 instead of 4.5 bits. RTN stands in for GPTQ here (GPTQ lowers every row; how much a
kind gains from more bits is what is compared). Writes benchmarks/results/precision_per_kind.{json,md}.

    python benchmarks/precision_per_kind.py FLOAT.elastiq --windows 16 --c4-windows 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch

from distillation import dense_logprobs, mean_se, per_window, windows
from elastiq.atomic import write_text
from elastiq.checkpoint import Checkpoint
from elastiq.modeling.model import Transformer
from elastiq.quants import dequantize, dequantize_q8_0, quantize_q8_0, quantize_rtn

RESULTS = Path(__file__).resolve().parent / "results"
Q4_BITS, Q8_BITS = 4.5, 8.5  # bits a weight, the fp16 block scale included


def _kinds(layers: int) -> dict[str, re.Pattern]:
    """Each variant: the matrices it holds at 8 bits (none for the baseline)."""
    edge = f"(0|{layers - 1})"
    return {"all 4-bit": re.compile(r"^$"),
            "8-bit embedding and head": re.compile(r"(embed_tokens|lm_head)\.weight$"),
            "8-bit v_proj": re.compile(r"v_proj\.weight$"),
            "8-bit down_proj": re.compile(r"down_proj\.weight$"),
            "8-bit first and last block": re.compile(rf"layers\.{edge}\..*_proj\.weight$"),
            "8-bit embedding, head, v_proj, down_proj": re.compile(r"(embed_tokens|lm_head|v_proj|down_proj)\.weight$")}


def fake_quantize(weights: dict, eight: re.Pattern) -> tuple[dict, int, int]:
    """``weights`` with every 2-D float matrix rounded to Q4_0, or Q8_0 where its name matches
    ``eight``; returns them, their quantized bytes, and the bytes the Q8_0 ones add over Q4_0."""
    out, total, extra, done = {}, 0, 0, {}
    for name, w in weights.items():
        if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2):
            out[name] = w
        elif id(w) in done:  # a tied head: the embedding's matrix, quantized and counted once
            out[name] = out[done[id(w)]]
        elif eight.search(name):
            q = quantize_q8_0(w)
            out[name], done[id(w)] = dequantize_q8_0(q.codes, q.scales), name
            total += w.numel() * Q8_BITS / 8
            extra += w.numel() * (Q8_BITS - Q4_BITS) / 8
        else:
            out[name], done[id(w)] = dequantize(*quantize_rtn(w)), name
            total += w.numel() * Q4_BITS / 8
    return out, int(total), int(extra)


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             f"Start `{Path(results['start']).name}`; {results['windows']} WikiText-2 and {results['c4_windows']} "
             f"held-out C4 windows of {results['eval_seqlen']} tokens, float32, {results['threads']} threads. "
             "RTN fake-quantization: every matrix Q4_0 (4.5 bits), the variant's kind Q8_0 (8.5 bits). Δ KL is "
             "the variant's KL minus the all-4-bit KL, paired by window (± standard error); 'per MB' divides "
             "the WikiText-2 Δ KL by the extra megabytes. Matrix MB counts the quantized matrices only (a tied "
             "embedding and head once).", "",
             "| rate | variant | matrix MB | +MB | WikiText-2 KL | Δ KL | Δ KL per MB | C4 KL | Δ KL (C4) | WikiText-2 ppl |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rate, variants in results["rates"].items():
        base = variants["all 4-bit"]
        for name, r in variants.items():
            cells = [rate, name, f"{r['bytes'] / 1e6:.1f}", f"{r['extra'] / 1e6:.1f}"]
            for corpus in ("wikitext2", "c4-heldout"):
                m, se = mean_se(r[corpus]["kl"])
                cells.append(f"{m:.3f} ± {se:.3f}")
                if name == "all 4-bit":
                    cells += ["", ""] if corpus == "wikitext2" else [""]
                    continue
                dm, dse = mean_se([a - b for a, b in zip(r[corpus]["kl"], base[corpus]["kl"])])
                cells.append(f"{dm:+.3f} ± {dse:.3f}")
                if corpus == "wikitext2":
                    cells.append(f"{dm / (r['extra'] / 1e6):+.4f}")
            cells.append(f"{torch.tensor(r['wikitext2']['nll']).mean().exp().item():.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", help="a sorted float nested checkpoint")
    parser.add_argument("--rates", default=None, help="comma-separated; default every offered rate")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--c4-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--output", default=str(RESULTS / "precision_per_kind.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = Checkpoint(args.start)
    config, tokenizer = start.config, start.tokenizer()
    rates = [float(r) for r in args.rates.split(",")] if args.rates else list(start.rates)
    data = windows(tokenizer, args.windows, args.c4_windows, args.eval_seqlen)
    dense = dense_logprobs(start, data)
    kinds = _kinds(config["num_hidden_layers"])
    results = {"command": "python " + shlex.join(sys.argv), "start": str(args.start),
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "windows": args.windows,
               "c4_windows": args.c4_windows, "eval_seqlen": args.eval_seqlen, "rates": {}}
    for rate in rates:
        weights = start.read_rate(rate)
        for name, pattern in kinds.items():
            quantized, total, extra = fake_quantize(weights, pattern)
            model = Transformer.from_weights(quantized, config).eval()
            row = {"bytes": total, "extra": extra, **per_window(model, dense, data)}
            results["rates"].setdefault(str(rate), {})[name] = row
            print(rate, name, total, extra, {c: mean_se(row[c]["kl"]) for c in data}, file=sys.stderr, flush=True)
    output = Path(args.output)
    write_text(output, json.dumps(results, indent=1))
    write_text(output.with_suffix(".md"), to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
