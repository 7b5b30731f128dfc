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
from ..checkpoint import Checkpoint
from ..runtime.backends import open_engine
from .suite import ALL_MEASURES, PERPLEXITY, check_measures, run_suite

MAX_LENGTH = 2048  # tokens a zero-shot request keeps (its last ones), as the harness's default


def evaluate_rates(ckpt: Checkpoint, rates: Sequence[float], backend: str = "torch",
                   measures: Sequence[str] = ALL_MEASURES, seqlen: int = 2048, windows: int | None = None,
                   limit: int | None = None, batch_tokens: int = 4096, data: Path | None = None,
                   progress: bool = True) -> dict:
    """The suite's results at each of ``rates`` (offered by ``ckpt``) on ``backend``."""
    check_measures(measures)
    for rate in rates:
        ckpt.rate_entry(rate)  # every rate is checked before anything is loaded
    positions = ckpt.manifest["source"]["config"]["max_position_embeddings"]
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
                           batch_tokens=batch_tokens, data=data, progress=progress)
        out[str(rate)] = {**result, "rate": rate, "weight_bytes": ckpt.rate_entry(rate)["weight_bytes"]}
    first = next(iter(out.values()))
    quant = ckpt.manifest["quantization"]
    return {"checkpoint": str(ckpt.path), "model": ckpt.manifest["source"].get("name"), "backend": backend,
            "activations": str(getattr(engine, "dtype", "")).removeprefix("torch."),
            "weights": quant["format"] if quant else "float",
            "elastiq": first["elastiq"], "torch": first["torch"], "threads": first["threads"], "date": first["date"],
            "rates": out, "seconds": time.perf_counter() - start}


def rates_markdown(results: dict) -> str:
    """One row per rate: weight bytes, perplexity and each task's accuracy, with standard errors."""
    rows = list(results["rates"].values())
    first = rows[0]
    tasks = list(first["tasks"])
    head = ["rate", "weights MB"]
    if PERPLEXITY in first:
        head.append(f"WikiText-2 ppl ({first[PERPLEXITY]['windows']} × {first[PERPLEXITY]['seqlen']} tokens)")
    head += [f"{name} {t['metric']} % (n={t['n']})" for name, t in first["tasks"].items()]
    lines = [f"`{Path(results['checkpoint']).name}` ({results['model']}, {results['weights']} weights) "
             f"on {results['backend']}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [str(r["rate"]), f"{r['weight_bytes'] / 1e6:.1f}"]
        if PERPLEXITY in r:
            p = r[PERPLEXITY]
            cells.append(f"{p['ppl']:.2f} (nll ± {p['nll_stderr']:.3f})")
        for name in tasks:
            t = r["tasks"][name]
            cells.append(f"{100 * t[t['metric']]:.1f} ± {100 * t[t['metric'] + '_stderr']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Wall time {results['seconds']:.0f} s; torch {results['torch']}, {results['threads']} threads, "
                  f"{results['date']}."]
    if "command" in results:
        lines.append(f"Command: `{results['command']}`")
    return "\n".join(lines) + "\n"
