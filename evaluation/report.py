"""Evaluation results as JSON and as a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..atomic import write_text


def to_markdown(results: dict) -> str:
    """One row per measure: value ± standard error, items or windows, wall time; then how it was made."""
    lines = [f"Model: `{results['model']}`" + (f" ({results['model_file']})" if "model_file" in results else ""), "",
             "| measure | metric | value | ± stderr | n | seconds |", "|---|---|---|---|---|---|"]
    if "wikitext2" in results:
        p = results["wikitext2"]
        lines.append(f"| WikiText-2 (seqlen {p['seqlen']}) | ppl | {p['ppl']:.3f} | nll ± {p['nll_stderr']:.4f} "
                     f"| {p['windows']} windows | {p['seconds']:.0f} |")
        if "divergence" in p:
            d = p["divergence"]
            lines.append(f"| KL to `{results.get('reference', 'the reference')}` | mean KL (nats) | "
                         f"{d['kl_mean']:.4f} | {d['kl_stderr']:.4f} | {d['tokens']} tokens | |")
            lines.append(f"| | same top-1 % | {100 * d['top1_agreement']:.2f} | {100 * d['top1_stderr']:.2f} "
                         f"| 99th percentile KL {d['kl_p99']:.3f} | |")
    for name, t in results["tasks"].items():
        metric = t["metric"]
        lines.append(f"| {name} | {metric} | {100 * t[metric]:.2f} | {100 * t[metric + '_stderr']:.2f} "
                     f"| {t['n']} | {t['seconds']:.0f} |")
    lines.append("")
    if "command" in results:
        lines.append(f"Command: `{results['command']}`")
    timing = f"Total wall time {results['seconds']:.0f} s"
    if "load_seconds" in results:
        timing += f" (model load {results['load_seconds']:.0f} s)"
    lines.append(f"{timing}; torch {results['torch']}, {results['threads']} threads, {results['date']}.")
    return "\n".join(lines) + "\n"


def write_results(results: dict, json_path: Path,
                  markdown: Callable[[dict], str] = to_markdown) -> tuple[Path, Path]:
    """Write ``results`` to ``json_path`` and its table (``markdown``) beside it (same name, ``.md``)."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    write_text(json_path, json.dumps(results, indent=2) + "\n")
    write_text(md_path, markdown(results))
    return json_path, md_path
