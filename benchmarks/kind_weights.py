"""Kind weights: each rate of one sorted checkpoint re-allocated with other kind weights, measured
against the dense model block by block, so that a model larger than memory is measured too.

The sorted weights are the same for every variant; only the kept widths differ (``allocate`` with
the checkpoint's recorded block influence and temperature, and each ``--kind-weights``). Every
variant is read from the same weights file at its own widths: widths that are not the checkpoint's
own do not end on its hashed segments, so those reads are not verified against the sha256 hashes
(the rate-0 read of the dense reference is). Each rate is measured as compression measures it
(``compressor/quality.py``): KL(dense || rate) mean and 99th percentile, top-1 agreement and
perplexity on held-out C4 windows (documents calibration never draws). Writes
benchmarks/results/NAME.{json,md}.

    python benchmarks/kind_weights.py CKPT --kind-weights none qk=0.5,vo=0 --windows 8 --name kind_weights_NAME
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elastiq.checkpoint import Checkpoint
from elastiq.compressor.allocate import allocate_checkpoint, parse_kind_weights, pruned_shares
from elastiq.compressor.calibrate import C4_SAMPLE, heldout_windows
from elastiq.compressor.quality import rate_quality
from elastiq.paths import data_dir

from measure import command_line, save_results  # the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"


class Reallocated(Checkpoint):
    """A checkpoint read at other widths: ``widths`` {rate: {group: width}} in place of its rate table's."""

    def __init__(self, path: Path, widths: dict[float, dict[str, int]]):
        super().__init__(path)
        self.widths = widths

    @property
    def rates(self) -> list[float]:
        return sorted(self.widths)

    def rate_entry(self, rate: float) -> dict:
        return {"rate": rate, "widths": self.widths[rate]}

    def read_tensor(self, name, rate, verify=True, unit_order=False):
        return super().read_tensor(name, rate, False, unit_order)  # other widths end off the hashed segments


def run(path: Path, kinds: list[str], windows: int, seqlen: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    ckpt = Checkpoint(path)
    rates = [r for r in ckpt.rates if r > 0]
    held = heldout_windows(ckpt.tokenizer(), data_dir() / C4_SAMPLE, windows, seqlen)
    out = {"checkpoint": str(path), "model": ckpt.source.name, "windows": windows, "seqlen": seqlen,
           "threads": threads,
           "recorded_kind_weights": ckpt.source.record.get("compression", {}).get("kind_weights"),
           "variants": {}}
    variants = {"as written": None, **{f"kinds {k}": parse_kind_weights(k) for k in kinds}}
    for name, weights in variants.items():
        widths = {r: ckpt.rate_entry(r)["widths"] for r in rates} if weights is None else \
            {s.rate: s.widths for s in allocate_checkpoint(ckpt, rates, weights) if s.rate > 0}
        start = time.perf_counter()
        measured = rate_quality(Reallocated(path, widths), ckpt, held, progress=False)
        out["variants"][name] = {str(r): {**measured[r], "pruned": pruned_shares(ckpt, widths[r]), "widths": widths[r]}
                                 for r in rates}
        print(name, {r: round(measured[r]["kl_mean"], 4) for r in rates},
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return out


def table(result: dict, command: str) -> str:
    lines = [f"# Kind weights: {result['model']}", "", f"`{command}`", "",
             f"Same sorted weights; only the widths differ. {result['windows']} held-out C4 windows of "
             f"{result['seqlen']} tokens, each rate against the dense model (rate 0) block by block; KL: "
             "KL(dense || rate) in nats, mean and 99th percentile over tokens. Pruned: the "
             "share of each kind's parameters the rate removes.", "",
             "| rate | allocation | pruned | KL mean | KL p99 | same top-1 % | held-out ppl |",
             "|---|---|---|---|---|---|---|"]
    rates = next(iter(result["variants"].values())).keys()
    for rate in rates:
        for name, variant in result["variants"].items():
            r = variant[rate]
            pruned = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["pruned"].items())
            lines.append(f"| {rate} | {name} | {pruned} | {r['kl_mean']:.4f} | "
                         f"{r['kl_p99']:.2f} | {100 * r['top1_agreement']:.1f} | {r['heldout_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a sorted nested checkpoint (float or 4-bit)")
    parser.add_argument("--kind-weights", nargs="+", required=True, metavar="WEIGHTS",
                        help="kind weights to re-allocate with, each in compress --kind-weights's form (none: every "
                             "kind at 1)")
    parser.add_argument("--windows", type=int, default=8, help="held-out C4 windows (default 8)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="kind_weights", help="results file name (default kind_weights)")
    args = parser.parse_args()
    result = run(args.checkpoint, args.kind_weights, args.windows, args.seqlen, args.threads)
    save_results(RESULTS / f"{args.name}.json", result, table(result, command_line()))


if __name__ == "__main__":
    main()
