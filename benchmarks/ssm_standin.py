"""A small Mamba2 trained here on the C4 sample: the stand-in for the sorting comparison of issue 15.

No pretrained Mamba2 or hybrid weights can be fetched on this machine, so this trains one from
scratch: a 4-layer Mamba2 (hidden 256, 8 SSM heads of P = 64, 2 groups of N = 64 states) with its
own byte-level BPE tokenizer of 4,096 tokens, both learnt from the C4 sample's documents that
calibration may use (every 10th document is held out, as ``calibration_samples`` holds it out).
It is a small stand-in, not a published model.

    python benchmarks/ssm_standin.py train --out /tmp/mamba2-standin --minutes 30

writes the Hugging Face folder (safetensors, config, tokenizer) and ``train_log.json`` (loss every
25 steps, held-out loss at the end) into ``--out``.

    python benchmarks/ssm_standin.py compare --model /tmp/mamba2-standin --windows 64

compresses it three times (``elastiq compress --no-recover --no-quantize``, the same block-influence
allocation) with each order of the SSM channels and states: ``uniql`` (state-aware ridge leverage
of the chunk states), ``ridge`` (ridge leverage of the channels alone) and ``magnitude`` (weight
norms); then measures every rate on the held-out C4 documents (the ones neither training nor
calibration read) and on WikiText-2: perplexity, and KL divergence to the dense model, each
method paired against ``uniql`` on the same windows; and each method's checkpoint again after
nested LoRA recovery (``elastiq recover``, ``--recover-steps``), paired against itself before. Writes benchmarks/results/ssm_sorting.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from elastiq.compressor.calibrate import HELDOUT_EVERY, C4_SAMPLE, calibration_texts
from elastiq.paths import data_dir

VOCAB = 4096


def split_documents() -> tuple[list[str], list[str]]:
    """The C4 sample's documents: those calibration may draw from, and the held-out ones."""
    texts = calibration_texts(data_dir() / C4_SAMPLE)
    train = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def train_tokenizer(texts: list[str]):
    """A byte-level BPE of ``VOCAB`` tokens learnt from ``texts``, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Every document's tokens followed by end-of-text, concatenated."""
    eos = tokenizer.eos_token_id
    return torch.tensor([i for t in texts for i in (*tokenizer.encode(t), eos)])


# Nemotron-H's layer pattern in small: Mamba2 mixers (M), ReLU² MLPs (-) and one attention layer (*).
HYBRID_LAYERS = ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention", "mlp"]


def model_config(vocab_size: int, family: str = "mamba2"):
    """The stand-in's config: a 4-block Mamba2, or a 7-block Nemotron-H hybrid (``HYBRID_LAYERS``)
    whose mixers have the Mamba2 stand-in's shapes."""
    from transformers import Mamba2Config, NemotronHConfig

    ids = dict(vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "nemotron_h":
        return NemotronHConfig(hidden_size=256, layers_block_type=HYBRID_LAYERS, mamba_num_heads=8, mamba_head_dim=64,
                               n_groups=2, ssm_state_size=64, expand=2, conv_kernel=4, chunk_size=64,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                               **ids)
    return Mamba2Config(hidden_size=256, num_hidden_layers=4, num_heads=8, head_dim=64, n_groups=2, state_size=64,
                        expand=2, conv_kernel=4, chunk_size=64, **ids)


def heldout_loss(model, stream: torch.Tensor, seqlen: int, windows: int) -> float:
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item()
                  for w in stream[:windows * seqlen].view(windows, seqlen)]
    return sum(losses) / len(losses)


def train(out: Path, minutes: float, seqlen: int, batch: int, lr: float, seed: int, threads: int,
          family: str = "mamba2") -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_texts, heldout_texts = split_documents()
    tokenizer = train_tokenizer(train_texts)
    stream = token_stream(tokenizer, train_texts)
    heldout = token_stream(tokenizer, heldout_texts)
    model = AutoModelForCausalLM.from_config(model_config(len(tokenizer), family))
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, warmup = minutes * 60, 50
    log, start, step = [], time.perf_counter(), 0
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        # linear warm-up, then cosine decay over the time budget (the step count is not known ahead)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        starts = [rng.randrange(len(stream) - seqlen) for _ in range(batch)]
        ids = torch.stack([stream[s:s + seqlen] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            log.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f}", flush=True)
        step += 1
    model.eval()
    result = {"family": family, "params": params, "steps": step, "seconds": round(time.perf_counter() - start, 1),
              "tokens": step * batch * seqlen, "train_tokens_available": len(stream), "seqlen": seqlen,
              "batch": batch, "lr": lr, "seed": seed, "threads": threads,
              "heldout_loss": heldout_loss(model, heldout, seqlen, 32), "random_loss": math.log(len(tokenizer)),
              "log": log}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(result, indent=1))
    print(f"held-out loss {result['heldout_loss']:.3f} (random: {result['random_loss']:.3f}) after {step} steps")


SORTS = ("uniql", "ridge", "magnitude")
RECOVERED = "+recovery"
RESULTS = Path(__file__).resolve().parent / "results"


def compare(model: Path, rates: list[float], windows: int, seqlen: int, calib_samples: int, threads: int,
            work: Path, recover_steps: int) -> dict:
    """Every sorting method's checkpoint at every rate, and the same after ``recover_steps`` steps
    of nested LoRA recovery (none if 0): perplexity and KL to the dense model on held-out C4 and
    WikiText-2 windows (the same windows for every method and rate)."""
    from transformers import AutoTokenizer

    from elastiq.checkpoint import Checkpoint
    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.recover import RecoverOptions, recover_checkpoint
    from elastiq.evaluation.perplexity import perplexity, wikitext2_tokens
    from elastiq.modeling.model import Transformer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    corpora = {"c4_heldout": token_stream(tokenizer, split_documents()[1]),
               "wikitext2": wikitext2_tokens(tokenizer, data_dir())}
    recovery = RecoverOptions(steps=recover_steps, seqlen=seqlen, bf16=False) if recover_steps else None
    out = {"model": json.loads((model / "train_log.json").read_text()), "rates": rates, "windows": windows,
           "seqlen": seqlen, "calib_samples": calib_samples, "results": {},
           "recovery": recovery.settings() if recovery else None}
    out["model"].pop("log")
    out["model"].setdefault("family", json.loads((model / "config.json").read_text())["model_type"])
    dense = None

    def measure(ckpt: Checkpoint, name: str, seconds: float) -> None:
        rows = {}
        for rate in ckpt.rates:
            if rate == 0 and name in SORTS[1:]:
                continue  # sorting is exact: rate 0 is the dense model for every method
            m = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
            rows[str(rate)] = {c: perplexity(m, tokens, seqlen, windows, progress=False, reference=dense)
                               for c, tokens in corpora.items()}
            print(name, rate, {k: round(v["ppl"], 2) for k, v in rows[str(rate)].items()}, flush=True)
        out["results"][name] = {"seconds": round(seconds, 1), "rates": rows}

    for method in SORTS:
        start = time.perf_counter()
        options = CompressOptions(rates=rates, calib_samples=calib_samples, calib_seqlen=seqlen, method=method,
                                  quality_windows=0)
        ckpt = Checkpoint(compress(model, work / f"{method}.elastiq", options, overwrite=True, progress=False))
        if dense is None:
            dense = Transformer.from_weights(ckpt.read_rate(0.0), ckpt.config)
            out["widths"] = {str(r["rate"]): r["widths"] for r in ckpt.rate_table}  # the same for every method
        measure(ckpt, method, time.perf_counter() - start)
        if recovery is not None:
            start = time.perf_counter()
            recovered = recover_checkpoint(ckpt.path, work / f"{method}-recovered.elastiq", recovery,
                                           overwrite=True, progress=False)
            measure(Checkpoint(recovered), method + RECOVERED, time.perf_counter() - start)
    return out


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


KINDS = {"mamba2": "Mamba2", "nemotron_h": "Nemotron-H hybrid (Mamba2 mixers, ReLU² MLPs and attention, one a block)"}


def table(result: dict, command: str) -> str:
    m, recovery = result["model"], result.get("recovery")
    kind = KINDS[m.get("family", "mamba2")]
    hybrid = m.get("family", "mamba2") != "mamba2"
    lines = [f"# Sorting a {kind.partition(' (')[0]}: state-aware vs plain ridge leverage vs magnitude (trained "
             "stand-in)", "", f"`{command}`", "",
             f"The model is a {m['params'] / 1e6:.1f}M-parameter {kind} trained here for {m['seconds'] / 60:.0f} min "
             f"({m['steps']} steps, {m['tokens'] / 1e6:.1f}M tokens) on the C4 sample: held-out loss "
             f"{m['heldout_loss']:.2f} nats against {m['random_loss']:.2f} for a uniform guess. It is a small "
             "stand-in trained on this machine, not a published model (none can be fetched here).", "",
             f"Each method: `elastiq compress --no-recover --no-quantize --method M` ({result['calib_samples']} "
             f"calibration windows of {result['seqlen']} tokens), the same influence allocation"
             + (f"; `+recovery`: then `elastiq recover` (nested LoRA, rank {recovery['rank']}, {recovery['steps']} "
                f"steps of {recovery['batch']} windows of {recovery['seqlen']} tokens, distillation from the dense "
                "model)" if recovery else "; no recovery") + ". "
             f"Measured on {result['windows']} windows of {result['seqlen']} tokens of held-out C4 documents (read by "
             "neither training, calibration nor recovery) and of WikiText-2. KL: mean over tokens of KL(dense || "
             "rate), nats. Δ NLL, mean NLL per window ± one standard error (paired, same windows): a method "
             "against uniql, both without recovery; a `+recovery` row against the same method without it."
             + (" The methods differ in the order of the mixers' channels and states; `ridge` sorts the MLP and "
                "attention blocks as `uniql` does, `magnitude` sorts every block by weight norms." if hybrid else ""),
             "",
             "| rate | method | C4 ppl | C4 KL | Δ NLL, C4 | WikiText-2 ppl | WikiText-2 KL | Δ NLL, WikiText-2 |",
             "|---|---|---|---|---|---|---|---|"]
    results = result["results"]
    names = [n for method in SORTS for n in (method, method + RECOVERED) if n in results]
    for rate in results[SORTS[0]]["rates"]:
        for name in names:
            r = results[name]["rates"].get(rate)
            if r is None:
                continue
            base = results[name.removesuffix(RECOVERED) if name.endswith(RECOVERED) else SORTS[0]]["rates"]
            if rate not in base:  # sorting is exact: a recovered rate 0 is paired with the dense model
                base = results[SORTS[0]]["rates"]
            cells = []
            for corpus in ("c4_heldout", "wikitext2"):
                c = r[corpus]
                kl = c.get("divergence", {}).get("kl_mean", 0.0)
                if name == SORTS[0]:
                    delta = "—"
                else:
                    d, se = _paired(c["window_nll"], base[rate][corpus]["window_nll"])
                    delta = f"{d:+.4f} ± {se:.4f}"
                cells += [f"{c['ppl']:.2f}", f"{kl:.4f}", delta]
            label = "dense" if rate == "0.0" and name == SORTS[0] else name
            lines.append(f"| {rate} | {label} | " + " | ".join(cells) + " |")
    if "widths" in result:
        lines += ["", "Widths kept block by block ((P, N): channels per SSM head of 64 and states per group of 64; "
                  "mlp: MLP channels; vo: V/O rank per KV head); the allocation is the same for every method:", ""]
        for rate, widths in result["widths"].items():
            blocks = sorted({int(k.split(".")[1]) for k in widths})

            def kept(i: int) -> str:
                if f"layers.{i}.ssm_p" in widths:
                    return f"({widths[f'layers.{i}.ssm_p']}, {widths[f'layers.{i}.ssm_n']})"
                return " ".join(f"{k} {widths[f'layers.{i}.{k}']}" for k in ("mlp", "vo") if f"layers.{i}.{k}" in widths)

            lines.append(f"- {rate}: " + ", ".join(kept(i) for i in blocks))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, corpus in zip(axes, ("c4_heldout", "wikitext2")):
        for name, r in result["results"].items():
            rows = r["rates"]
            if "0.0" not in rows:  # sorting is exact: every method starts from the dense model
                rows = {"0.0": result["results"][SORTS[0]]["rates"]["0.0"], **rows}
            xs = [float(r) for r in rows]
            ax.plot(xs, [rows[r][corpus]["ppl"] for r in rows], marker="o", label=name,
                    linestyle="--" if name.endswith(RECOVERED) else "-")
        ax.set_xlabel("rate (fraction of prunable parameters pruned)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(corpus)
        ax.legend()
    kind = KINDS[result["model"].get("family", "mamba2")].partition(" (")[0]
    fig.suptitle(f"{kind} stand-in: sorting methods, without and with nested recovery (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the stand-in (a Mamba2 or a Nemotron-H hybrid) and its tokenizer")
    t.add_argument("--out", type=Path, required=True, help="folder for the Hugging Face model and tokenizer")
    t.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    t.add_argument("--seqlen", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: leave the other core free)")
    t.add_argument("--family", choices=("mamba2", "nemotron_h"), default="mamba2",
                   help="a Mamba2, or a Nemotron-H hybrid of Mamba2, MLP and attention layers (default mamba2)")
    c = sub.add_parser("compare", help="compare the sorting methods on the trained stand-in")
    c.add_argument("--model", type=Path, required=True, help="the folder `train` wrote")
    c.add_argument("--rates", type=lambda v: [float(r) for r in v.split(",")], default=[0.15, 0.25, 0.35])
    c.add_argument("--windows", type=int, default=64, help="windows per corpus (default 64)")
    c.add_argument("--seqlen", type=int, default=256)
    c.add_argument("--calib-samples", type=int, default=32)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--recover-steps", type=int, default=200,
                   help="steps of nested LoRA recovery after each method's compress (0: none; default 200)")
    c.add_argument("--work", type=Path, default=Path("/tmp/elastiq-ssm-sorting"), help="where the checkpoints go")
    c.add_argument("--name", default="ssm_sorting", help="results file name in benchmarks/results (default ssm_sorting)")
    args = parser.parse_args()
    if args.command == "train":
        train(args.out, args.minutes, args.seqlen, args.batch, args.lr, args.seed, args.threads, args.family)
    else:
        from measure import command_line, save_results

        result = compare(args.model, args.rates, args.windows, args.seqlen, args.calib_samples, args.threads,
                         args.work, args.recover_steps)
        command = command_line()
        result["command"] = command
        save_results(RESULTS / f"{args.name}.json", result, table(result, command))
        plot(result, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
