"""What each rate of a nested checkpoint costs in quality, measured on any backend.

``evaluate_rates`` opens one engine (torch, llama.cpp or onnxruntime), runs the evaluation suite
through its ``logits`` at each asked rate (switching rate in place between them), and returns one
suite result per rate beside the rate's weight bytes; ``rates_markdown`` prints them as one table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .. import ElastiqError
from ..checkpoint import MANIFEST, Checkpoint
from ..families import checkpoint_family
from ..modeling.model import Transformer
from ..runtime.backends import open_engine
from .loglikelihood import LogitsFn
from .suite import ALL_MEASURES, PERPLEXITY, check_measures, hf_logits, run_suite

MAX_LENGTH = 2048  # tokens a zero-shot request keeps (its last ones), as the harness's default


def evaluate_rates(ckpt: Checkpoint, rates: Sequence[float], backend: str = "torch",
                   measures: Sequence[str] = ALL_MEASURES, seqlen: int = 2048, windows: int | None = None,
                   limit: int | None = None, batch_tokens: int = 4096, data: Path | None = None,
                   progress: bool = True, reference: LogitsFn | None = None) -> dict:
    """The suite's results at each of ``rates`` (offered by ``ckpt``) on ``backend``; with a
    ``reference`` model (``reference_model``), also each rate's KL divergence to it."""
    check_measures(measures)
    for rate in rates:
        ckpt.rate_entry(rate)  # every rate is checked before anything is loaded
    checkpoint_family(ckpt)  # and its config and tensors
    positions = ckpt.config["max_position_embeddings"]
    if PERPLEXITY in measures and seqlen > positions:
        raise ElastiqError(f"--seqlen {seqlen} is longer than the {positions} positions the model was trained for")
    max_length = min(MAX_LENGTH, positions)
    ctx = max(seqlen, max_length) if PERPLEXITY in measures else max_length
    tokenizer = ckpt.tokenizer()
    start = time.perf_counter()
    engine, out = None, {}
    for rate in rates:
        if engine is None:
            engine = open_engine(backend, ckpt, rate, ctx, tokenizer=tokenizer, scoring=True)
        else:
            engine.set_rate(rate)
        result = run_suite(engine.logits, tokenizer, f"{ckpt.path.name}@{rate}", measures, seqlen=seqlen,
                           windows=windows, limit=limit, max_length=max_length,
                           batch_tokens=batch_tokens, data=data, progress=progress, reference=reference)
        out[str(rate)] = {**result, "rate": rate, "weight_bytes": ckpt.rate_entry(rate)["weight_bytes"]}
    first = next(iter(out.values()))
    quant = ckpt.quantization
    return {"checkpoint": str(ckpt.path), "model": ckpt.source.name, "backend": backend,
            "activations": str(getattr(engine, "dtype", "")).removeprefix("torch."),
            "weights": quant["format"] if quant else "float",
            "elastiq": first["elastiq"], "torch": first["torch"], "threads": first["threads"], "date": first["date"],
            "rates": out, "seconds": time.perf_counter() - start}


def reference_model(source: str | Path, vocab_size: int) -> LogitsFn:
    """The dense model that KL divergence is measured against, in float32: a nested checkpoint's
    rate 0 (dequantized), or a model (Hugging Face folder, GGUF or name) through transformers.
    Its vocabulary must be ``vocab_size`` tokens, the compared model's."""
    if (Path(source) / MANIFEST).is_file():
        dense = Checkpoint(source)
        checkpoint_family(dense)
        config = dense.config
        model = Transformer.from_weights(dense.read_rate(0.0), config)
        logits_fn, vocab = model, config["vocab_size"]
    else:
        from ..compressor.intake import load_model

        loaded = load_model(str(source))
        logits_fn, vocab = hf_logits(loaded.model), loaded.model.config.vocab_size
    if vocab != vocab_size:
        raise ElastiqError(f"the KL reference {source} has a vocabulary of {vocab} tokens and the model measured "
                           f"{vocab_size}: KL divergence compares two models of one tokenizer")
    return logits_fn


def rates_markdown(results: dict) -> str:
    """One row per rate: weight bytes, perplexity and each task's accuracy, with standard errors."""
    rows = list(results["rates"].values())
    first = rows[0]
    tasks = list(first["tasks"])
    head = ["rate", "weights MB"]
    if PERPLEXITY in first:
        head.append(f"WikiText-2 ppl ({first[PERPLEXITY]['windows']} × {first[PERPLEXITY]['seqlen']} tokens)")
    kl = PERPLEXITY in first and "divergence" in first[PERPLEXITY]
    if kl:
        head += ["KL to reference (mean ± se / p99)", "same top-1 %"]
    head += [f"{name} {t['metric']} % (n={t['n']})" for name, t in first["tasks"].items()]
    lines = [f"`{Path(results['checkpoint']).name}` ({results['model']}, {results['weights']} weights) "
             f"on {results['backend']}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [str(r["rate"]), f"{r['weight_bytes'] / 1e6:.1f}"]
        if PERPLEXITY in r:
            p = r[PERPLEXITY]
            cells.append(f"{p['ppl']:.2f} (nll ± {p['nll_stderr']:.3f})")
        if kl:
            d = r[PERPLEXITY]["divergence"]
            cells += [f"{d['kl_mean']:.4f} ± {d['kl_stderr']:.4f} / {d['kl_p99']:.3f}",
                      f"{100 * d['top1_agreement']:.1f} ± {100 * d['top1_stderr']:.1f}"]
        for name in tasks:
            t = r["tasks"][name]
            cells.append(f"{100 * t[t['metric']]:.1f} ± {100 * t[t['metric'] + '_stderr']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if kl:
        lines += ["", f"KL divergence KL(reference ‖ rate) over the WikiText-2 tokens, reference "
                      f"`{results.get('reference', '(given)')}` (llama.cpp's --kl-divergence measures)."]
    lines += ["", f"Wall time {results['seconds']:.0f} s; torch {results['torch']}, {results['threads']} threads, "
                  f"{results['date']}."]
    if "command" in results:
        lines.append(f"Command: `{results['command']}`")
    return "\n".join(lines) + "\n"
