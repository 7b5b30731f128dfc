"""Allocation: one sorted checkpoint at each of its rates, with the widths it was written with
against the widths today's ``allocate`` gives it (same block influence, same temperature), with
the kind weights it recorded or with each of ``--kind-weights``, side by side.

The sorted weights are the same for all: only the kept width of each group differs. Each
re-allocated checkpoint is written with the checkpoint writer (``WORK/reallocated-K.elastiq``), so
it is what compressing again would offer. Each rate of each is measured on the same windows of
held-out C4 (documents calibration never draws) and of WikiText-2: perplexity, KL(dense || rate),
and the paired difference of mean NLL and of mean KL per window (re-allocated minus as written, ±
one standard error).

    python benchmarks/allocation.py --checkpoint CKPT --windows 32     # writes benchmarks/results/allocation.{json,md}
    python benchmarks/allocation.py --checkpoint CKPT --kind-weights none qk=0.5,vo=0 --name allocation_kinds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from elastiq.checkpoint import Checkpoint, write_checkpoint
from elastiq.compressor.allocate import allocate_checkpoint, parse_kind_weights, pruned_shares
from elastiq.compressor.calibrate import C4_SAMPLE, heldout_windows
from elastiq.evaluation.perplexity import perplexity, wikitext2_tokens
from elastiq.modeling.model import Transformer
from elastiq.paths import data_dir

RESULTS = Path(__file__).parent / "results"
WRITTEN = "as written"
CORPORA = ("c4_heldout", "wikitext2")


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over paired windows and its standard error."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def run(path: Path, windows: int, seqlen: int, threads: int, work: Path, kinds: list[str]) -> dict:
    torch.set_num_threads(threads)
    ckpt = Checkpoint(path)
    rates = [r for r in ckpt.rates if r > 0]
    tokenizer = ckpt.tokenizer()
    variants = {WRITTEN: ckpt}
    for k, text in enumerate(kinds or [None]):
        specs = allocate_checkpoint(ckpt, rates, None if text is None else parse_kind_weights(text))
        name = "re-allocated" if text is None else f"kinds {text}"
        variants[name] = Checkpoint(write_checkpoint(work / f"reallocated-{k}.elastiq", ckpt.read_rate(0.0),
                                                     ckpt.groups, specs, ckpt.heads, ckpt.source.record, tokenizer,
                                                     quantization=ckpt.quantization, overwrite=True))
    corpora = {"c4_heldout": heldout_windows(tokenizer, data_dir() / C4_SAMPLE, windows, seqlen).flatten(),
               "wikitext2": wikitext2_tokens(tokenizer, data_dir())}
    dense = Transformer.from_weights(ckpt.read_rate(0.0), ckpt.config)
    out = {"checkpoint": str(path), "model": ckpt.source.name, "weights": "float" if ckpt.quantization is None
           else ckpt.quantization["format"], "windows": windows, "seqlen": seqlen, "rates": {}}
    for rate in rates:
        row = {}
        for name, c in variants.items():
            entry = c.rate_entry(rate)
            model = Transformer.from_weights(c.read_rate(rate), c.config)
            row[name] = {"weight_bytes": entry["weight_bytes"], "widths": entry["widths"],
                         "pruned": pruned_shares(c, entry["widths"]),
                         **{corpus: perplexity(model, tokens, seqlen, windows, progress=False, reference=dense)
                            for corpus, tokens in corpora.items()}}
            print(rate, name, {k: round(row[name][k]["ppl"], 2) for k in CORPORA}, flush=True)
        out["rates"][str(rate)] = row
    return out


def table(result: dict, command: str) -> str:
    lines = [f"# Allocation: {result['model']} ({result['weights']}), as written against re-allocated", "",
             f"`{command}`", "",
             f"Same sorted weights; only the widths differ. {result['windows']} windows of {result['seqlen']} tokens "
             "of held-out C4 and of WikiText-2. KL: mean over tokens of KL(dense || rate), nats. Δ: re-allocated "
             "minus as written, mean NLL or KL per window, ± one standard error (paired). Pruned: the share of "
             "each kind's parameters the rate removes.", "",
             "| rate | allocation | MB | pruned | C4 ppl | C4 KL | Δ KL, C4 | Δ NLL, C4 | WikiText-2 ppl | "
             "WikiText-2 KL | Δ KL, WikiText-2 | Δ NLL, WikiText-2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate, row in result["rates"].items():
        for name, r in row.items():
            cells = [f"{r['weight_bytes'] / 1e6:.1f}", ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["pruned"].items())]
            for corpus in CORPORA:
                c, base = r[corpus], row[WRITTEN][corpus]
                deltas = ["—", "—"] if name == WRITTEN else [
                    "{:+.4f} ± {:.4f}".format(*paired(c["window_kl"], base["window_kl"])),
                    "{:+.4f} ± {:.4f}".format(*paired(c["window_nll"], base["window_nll"]))]
                cells += [f"{c['ppl']:.2f}", f"{c['divergence']['kl_mean']:.4f}", *deltas]
            lines.append(f"| {rate} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a sorted nested checkpoint (float or 4-bit)")
    parser.add_argument("--windows", type=int, default=32, help="windows per corpus (default 32)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/elastiq-allocation"),
                        help="where the re-allocated checkpoint goes")
    parser.add_argument("--kind-weights", nargs="*", default=[], metavar="WEIGHTS",
                        help="re-allocate with each of these kind weights (compress --kind-weights's form; none: "
                             "every kind at 1) instead of those the checkpoint recorded")
    parser.add_argument("--name", default="allocation", help="results file name (default allocation)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.checkpoint, args.windows, args.seqlen, args.threads, args.work, args.kind_weights)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    command = "python benchmarks/allocation.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.md").write_text(table(result, command))
    print(table(result, command))


if __name__ == "__main__":
    main()
