"""The figures behind the quality floor: each rate's KL to the dense model, and what it answers.

For each nested checkpoint given (default: the 4-bit checkpoint ``elastiq run`` builds for
``smollm2-135m``), every rate's quality as compression records it (``compressor/quality.py``: 8
held-out C4 windows of 512 tokens against the dense SmolLM2; measured here when the manifest
predates it), then three chat questions answered greedily (30 tokens) at every rate with the
floor lifted. Writes benchmarks/results/quality_floor.{json,md}.

    python benchmarks/quality_floor.py CKPT [CKPT ...]

The committed results measured three: the float checkpoint (``elastiq compress -o f.elastiq``), its
GPTQ quantization with an 8-bit embedding (``elastiq quantize f.elastiq -o q8.elastiq
--embedding-bits 8``) and the default cached checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elastiq.checkpoint import Checkpoint
from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
from elastiq.compressor.intake import load_model
from elastiq.compressor.quality import QUALITY_WINDOWS, rate_quality
from elastiq.paths import data_dir
from elastiq.runtime.chat import reply
from elastiq.runtime.engine import Engine
from elastiq.runtime.generate import Sampling
from elastiq.runtime.resolve import resolve_checkpoint

from measure import command_line, save_results  # the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("What is the capital of France?", "What is the capital of Italy?", "Name three colors.")


def quality(ckpt: Checkpoint) -> dict[str, dict]:
    """The rate table's recorded quality, or the same measurement made now (calibration defaults)."""
    if all(r.get("quality") for r in ckpt.manifest["rates"]):
        return {str(r["rate"]): r["quality"] for r in ckpt.manifest["rates"]}
    windows = calibration_samples(ckpt.tokenizer(), data_dir() / C4_SAMPLE, 32, 512, 0, heldout=QUALITY_WINDOWS)[32:]
    dense = load_model(ckpt.manifest["source"]["name"]).model.state_dict()
    return {str(r): q for r, q in rate_quality(ckpt, dense, windows, progress=False).items()}


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             "KL to the dense model on 8 held-out C4 windows of 512 tokens (4,088 tokens), and greedy answers "
             "(30 tokens) with the floor lifted.", ""]
    for name, c in results["checkpoints"].items():
        lines += [f"`{name}` ({c['weights']})", "",
                  "| rate | MB | KL mean / p99 | same top-1 % | held-out ppl | " + " | ".join(QUESTIONS) + " |",
                  "|---" * (5 + len(QUESTIONS)) + "|"]
        for rate, q in c["quality"].items():
            answers = [a.replace("\n", " ").replace("|", "/").strip() or "(empty)" for a in c["answers"][rate]]
            lines.append(f"| {rate} | {c['mb'][rate]:.1f} | {q['kl_mean']:.3f} / {q['kl_p99']:.2f} | "
                         f"{100 * q['top1_agreement']:.1f} | {q['heldout_ppl']:.1f} | " + " | ".join(answers) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality_floor.json")
    args = parser.parse_args()
    paths = args.checkpoints or [str(resolve_checkpoint("smollm2-135m"))]
    results = {"command": command_line(), "questions": QUESTIONS, "checkpoints": {}}
    for path in paths:
        ckpt = Checkpoint(path)
        quant = ckpt.manifest["quantization"]
        weights = "float" if not quant else f"Q4_0 {quant['method']}, embedding {quant.get('embedding_format', 'q4_0')}"
        engine = Engine(ckpt, 0.0, ctx=512)
        answers = {}
        for rate in ckpt.rates:
            engine.set_rate(rate)
            answers[str(rate)] = []
            for question in QUESTIONS:
                engine.generator.reset()
                text, _ = reply(engine, [{"role": "user", "content": question}], 30, Sampling(), lambda s: None)
                answers[str(rate)].append(text)
        results["checkpoints"][ckpt.path.name] = {
            "weights": weights, "quality": quality(ckpt), "answers": answers,
            "mb": {str(r["rate"]): r["weight_bytes"] / 1e6 for r in ckpt.manifest["rates"]}}
        print(f"{ckpt.path.name} done", flush=True)
    save_results(args.output, results, to_markdown(results))


if __name__ == "__main__":
    main()
