"""How the bf16 engine's RMSNorm precision moves its logits: norm weights held in float32 and one
rounding to bf16 (the runtime since the model-family change) against weights in bf16 multiplied
after the cast (before it), each compared with the float32 model of the same 4-bit codes.

Runs the default model's 4-bit checkpoint (the one ``elastiq run`` builds) at each offered rate on
``--windows`` windows of 512 WikiText-2 tokens: mean KL per token of each bf16 variant to the
float32 reference, their paired difference with its standard error, and top-1 agreement. Writes
benchmarks/results/norm_precision.{json,md}.

    python benchmarks/norm_precision.py --windows 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from measure import command_line, save_results

RESULTS = Path(__file__).resolve().parent / "results"


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).flatten()


def _bf16_weight_norm(self, x: torch.Tensor) -> torch.Tensor:
    """The RMSNorm before the change: the weight cast to the activations' dtype, multiplied after."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight.to(x.dtype) * h.to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()

    from elastiq.checkpoint import Checkpoint
    from elastiq.evaluation.perplexity import WIKITEXT2_TEST
    from elastiq.evaluation.zeroshot import mean_stderr
    from elastiq.modeling import model as elastic
    from elastiq.paths import data_dir
    from elastiq.runtime.resolve import resolve_checkpoint

    torch.set_num_threads(2)
    ckpt = Checkpoint(resolve_checkpoint("smollm2-135m"))
    text = (data_dir() / WIKITEXT2_TEST).read_text(encoding="utf-8")
    ids = torch.tensor(ckpt.tokenizer().encode(text[:200 * 512 * args.windows])[:512 * args.windows]).view(-1, 512)
    rows = []
    for rate in ckpt.rates:
        weights = ckpt.read_rate(rate)
        with torch.inference_mode():
            reference = elastic.Transformer.from_weights(weights, ckpt.config)(ids)
            now = elastic.Transformer.from_weights(weights, ckpt.config, torch.bfloat16, int4=True)(ids)
            float32_forward = elastic.RMSNorm.forward
            elastic.RMSNorm.forward = _bf16_weight_norm
            try:
                before = elastic.Transformer.from_weights(weights, ckpt.config, torch.bfloat16, int4=True)(ids)
            finally:
                elastic.RMSNorm.forward = float32_forward
        a, b = _kl(reference, now), _kl(reference, before)
        top1 = {name: (reference.argmax(-1) == x.argmax(-1)).float().mean().item() for name, x in
                (("now", now), ("before", before))}
        rows.append({"rate": rate, "tokens": a.numel(), "kl_float32_norm": a.mean().item(),
                     "kl_bf16_norm": b.mean().item(), "paired_diff": (a - b).mean().item(),
                     "paired_stderr": mean_stderr((a - b).tolist()), "top1_float32_norm": top1["now"],
                     "top1_bf16_norm": top1["before"]})
        print(rows[-1])
    results = {"command": command_line(), "checkpoint": str(ckpt.path), "windows": args.windows, "rows": rows}
    lines = [f"Command: `{results['command']}`", "",
             f"`{ckpt.path.name}` on the torch engine (int4 weights, bf16 activations), {args.windows} WikiText-2 "
             "windows of 512 tokens: mean KL per token (nats) to the float32 model of the same codes, norm weights "
             "in float32 (now) or cast to bf16 before the multiply (before).", "",
             "| rate | tokens | KL, float32 norm | KL, bf16 norm | paired diff ± s.e. | top-1, float32 norm | "
             "top-1, bf16 norm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rate']} | {r['tokens']} | {r['kl_float32_norm']:.5f} | {r['kl_bf16_norm']:.5f} | "
                     f"{r['paired_diff']:+.5f} ± {r['paired_stderr']:.5f} | {100 * r['top1_float32_norm']:.2f}% | "
                     f"{100 * r['top1_bf16_norm']:.2f}% |")
    save_results(RESULTS / "norm_precision.json", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
