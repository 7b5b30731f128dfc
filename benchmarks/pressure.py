"""A memory-pressure episode while ``elastiq serve`` answers requests: free memory, rate and tokens/s over time.

The server runs with ``--rate auto`` in a memory cgroup of its own with a limit, as a container or
an app sandbox on a device would hold it. Another process in the same cgroup takes memory step by
step (it keeps the cgroup's free memory, as the server's governor reads it, at a target: each
step's target lies between two rates' thresholds, so one more rate stops fitting at each step),
down to where no rate fits, then frees it all at once. Meanwhile a client streams chat requests
one after another through the official ``openai`` client, and a poller reads
``/v1/elastiq/status`` four times a second. Nothing is simulated: the server, the client, the
allocator and the kernel's cgroup accounting are real.

A rate r stops fitting when free memory falls below ``needs[r] * (1/margin - 1)`` (the governor's
rule, ``runtime/governor.py``, with ``needs`` and ``margin`` read from the server's status).

    sudo python benchmarks/pressure.py [CKPT] [--ctx 8192] [--hold 10]   # default: the cached SmolLM2 one

Needs root and a writable memory cgroup (v1 at /sys/fs/cgroup/memory, or v2). Writes
benchmarks/results/pressure.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from measure import command_line, save_results

RESULTS = Path(__file__).parent / "results"
CHUNK = 1 << 20  # the allocator's step, in bytes
BURST = 4  # chunks the allocator takes at most per 20 ms (200 MB/s): the kernel reclaims cache in time, and a
# server that frees memory in a switch sees it taken back over a few samples, not in one


def cgroup_dir(name: str) -> Path:
    """A new memory cgroup (v2 where the unified hierarchy has the memory controller, else v1)."""
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    unified = controllers.is_file() and "memory" in controllers.read_text().split()
    path = root / name if unified else root / "memory" / name
    try:
        path.mkdir(exist_ok=True)
    except OSError as err:
        raise SystemExit(f"cannot make the memory cgroup {path} ({err}); this benchmark needs root and a writable "
                         "memory cgroup") from None
    return path


def set_limit(cgroup: Path, limit: int) -> None:
    (cgroup / ("memory.max" if (cgroup / "memory.max").exists() else "memory.limit_in_bytes")).write_text(str(limit))


def reclaim(cgroup: Path) -> None:
    """Ask the kernel to reclaim the cgroup's page cache (v1 ``memory.force_empty``, v2
    ``memory.reclaim``; best effort), so that the allocator's pressure falls on anonymous memory
    and the cache the server read does not have to be reclaimed under it."""
    for name, value in (("memory.force_empty", "0"), ("memory.reclaim", str(1 << 30))):
        try:
            (cgroup / name).write_text(value)
        except OSError:
            pass


def usage(cgroup: Path) -> int:
    return int((cgroup / ("memory.current" if (cgroup / "memory.current").exists() else "memory.usage_in_bytes"))
               .read_text())


def child_allocator(spec: dict) -> None:
    """Keep this cgroup's free memory (as the governor reads it) at the schedule's target, in 1 MiB
    chunks whose pages are written; a target of None frees everything. Prints its log as JSON."""
    from elastiq.machine import free_memory, return_freed_memory

    chunks: list[bytearray] = []
    log, start, last = [], time.monotonic(), -1.0
    most = spec["most"] // CHUNK  # never more than this, whatever the reading says
    touch = b"\x01" * (CHUNK // 4096)
    while (now := time.monotonic() - start) < spec["duration"]:
        target = None
        for at, level in spec["schedule"]:
            if now >= at:
                target = level
        free = free_memory().bytes
        if target is None:
            if chunks:
                chunks.clear()
                return_freed_memory()
        elif free > target + CHUNK:
            for _ in range(min((free - target) // CHUNK, BURST, most - len(chunks))):
                chunk = bytearray(CHUNK)
                chunk[::4096] = touch
                chunks.append(chunk)
        elif free < target - CHUNK and chunks:
            del chunks[-min((target - free) // CHUNK, len(chunks)):]
            return_freed_memory()
        if now - last >= 0.1:
            log.append([round(now, 3), len(chunks) * CHUNK, free, target])
            last = now
        time.sleep(0.02)
    print(json.dumps(log))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=5).json()


def run_client(base: str, model: str, t0: float, stop: threading.Event, out: dict) -> None:
    """Stream chat requests one after another; record each content chunk's time, 503s and failures."""
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    prompts = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
               "List ten facts about the Moon.", "Describe a walk through a forest in autumn."]
    i = 0
    while not stop.is_set():
        sent = time.monotonic() - t0
        try:
            stream = client.chat.completions.create(model=model, stream=True, max_tokens=48, temperature=0,
                                                    messages=[{"role": "user", "content": prompts[i % 4]}])
            streamed = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    out["tokens"].append(time.monotonic() - t0)
                    streamed += 1
            out["completed"].append([sent, time.monotonic() - t0, streamed])
        except openai.APIStatusError as err:
            if err.status_code == 503:
                out["refused"].append(sent)
                time.sleep(0.5)
            else:
                out["failed"].append([sent, f"{err.status_code}: {err.message}"])
        except openai.APIError as err:
            out["failed"].append([sent, repr(err)])
            time.sleep(0.5)
        i += 1


def run_poller(base: str, t0: float, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        try:
            s = get_json(f"{base}/elastiq/status")
            out.append({"t": time.monotonic() - t0, "rate": s["rate"], "free": s["governor"]["free_memory_bytes"],
                        "target": s["governor"]["target_rate"], "starved": bool(s["governor"]["starved"]),
                        "switches": s["switches"]})
        except Exception as err:  # noqa: BLE001 - a missed sample is recorded, not fatal
            out.append({"t": time.monotonic() - t0, "error": repr(err)})
        time.sleep(0.25)


def schedule_for(needs: dict[float, int], margin: float, calm: float, step: float) -> tuple[list, dict]:
    """Free-memory targets over time: calm, then one step per rate between thresholds, then below
    the last one (no rate fits), then freed. Returns the schedule and each rate's threshold."""
    rates = sorted(needs)
    threshold = {r: needs[r] * (1 / margin - 1) for r in rates}
    schedule, at = [[0.0, None]], calm
    for a, b in zip(rates, rates[1:]):
        schedule.append([at, int((threshold[a] + threshold[b]) / 2)])
        at += step
    schedule.append([at, int(threshold[rates[-1]] / 2)])
    schedule.append([at + step, None])
    return schedule, threshold


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    polls = [p for p in results["polls"] if "rate" in p]
    t = [p["t"] for p in polls]
    fig, (ax_free, ax_rate, ax_tok) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    ax_free.plot(t, [p["free"] / 2**20 for p in polls], label="free memory (governor's reading)")
    held = results["allocator"]
    ax_free.plot([h[0] + results["allocator_offset"] for h in held], [h[1] / 2**20 for h in held],
                 label="held by the other process", alpha=0.6)
    steps = results["schedule"] + [[results["duration"], None]]
    for (a, level), (b, _) in zip(steps, steps[1:]):
        if level is not None:
            ax_free.hlines(level / 2**20, a, b, colors="black", linestyles="--", lw=0.8)
    ax_free.plot([], [], "k--", lw=0.8, label="the other process's target for free memory")
    rates = sorted(results["thresholds"], key=float)
    for r in rates:
        ax_free.axhline(results["thresholds"][r] / 2**20, ls=":", lw=0.7, color="grey")
    ax_free.plot([], [], ":", color="grey", label=f"below these, rates {rates[0]} ... {rates[-1]} stop fitting")
    ax_free.set_yscale("symlog", linthresh=64)
    ax_free.set_ylabel("MiB")
    ax_free.legend(loc="upper left", fontsize=8)
    ax_rate.step(t, [p["rate"] for p in polls], where="post", label="rate served")
    starved = [p["t"] for p in polls if p["starved"]]
    if starved:
        ax_rate.axvspan(min(starved), max(starved), color="red", alpha=0.1, label="no rate fits: new requests get 503")
    ax_rate.set_ylabel("pruning rate")
    ax_rate.invert_yaxis()
    ax_rate.legend(loc="lower left", fontsize=8)
    end = int(max(t)) + 1
    bins = [0] * end
    for x in results["client"]["tokens"]:
        if int(x) < end:
            bins[int(x)] += 1
    ax_tok.bar(range(end), bins, width=1.0, align="edge", label="streamed tokens per second")
    for x in results["client"]["refused"]:
        ax_tok.axvline(x, color="red", lw=0.6, alpha=0.5)
    ax_tok.set_ylabel("tokens / s")
    ax_tok.set_xlabel("seconds")
    ax_tok.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"elastiq serve under memory pressure: {results['model']} (red lines: 503 refusals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def to_markdown(results: dict) -> str:
    lines = [f"# `elastiq serve` through a memory-pressure episode ({results['device']})", "",
             f"`{results['command']}`", "", f"Model: {results['model']} ({results['checkpoint']}); "
             f"`--rate auto --ctx {results['ctx']} --hold {results['hold']}`, in a memory cgroup limited to "
             f"{results['limit'] / 2**20:.0f} MiB shared with the allocating process. Plot: `pressure.png`.", "",
             "| phase | from s | free-memory target, MiB | rates served | tokens streamed "
             "| tokens/s (median of 1 s bins) | requests completed (of them, with no text) | 503 | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in results["phases"]:
        target = "-" if p["target"] is None else f"{p['target'] / 2**20:.1f}"
        lines.append(f"| {p['name']} | {p['start']:.0f} | {target} | {', '.join(map(str, p['rates']))} | {p['tokens']} "
                     f"| {p['tok_s']:.1f} | {p['completed']} ({p['empty']}) | {p['refused']} | {p['failed']} |")
    lines += ["", "Switches (the server's log):", ""] + [f"- {line}" for line in results["switch_log"]] + [""]
    lines.append(f"Requests: {results['totals']['completed']} completed, {results['totals']['refused']} refused "
                 f"with 503 while no rate fitted, {results['totals']['failed']} failed. A request with no text is one "
                 "the model ended at once (its first token was the end of its turn): a rate's answer, not the "
                 "server's.")
    return "\n".join(lines) + "\n"


def phases(results: dict) -> list[dict]:
    schedule = results["schedule"]
    names = ["calm"] + [f"step {i}" for i in range(1, len(schedule) - 2)] + ["no rate fits", "memory freed"]
    client, polls, out = results["client"], [p for p in results["polls"] if "rate" in p], []
    for i, (at, target) in enumerate(schedule):
        end = schedule[i + 1][0] if i + 1 < len(schedule) else results["duration"]
        toks = [x for x in client["tokens"] if at <= x < end]
        bins = [sum(1 for x in toks if s <= x < s + 1) for s in range(int(at), int(end))]
        out.append({"name": names[i], "start": at, "target": target, "tokens": len(toks),
                    "tok_s": statistics.median(bins) if bins else 0.0,
                    "rates": sorted({p["rate"] for p in polls if at <= p["t"] < end}),
                    "completed": sum(1 for c in client["completed"] if at <= c[1] < end),
                    "empty": sum(1 for c in client["completed"] if at <= c[1] < end and c[2] == 0),
                    "refused": sum(1 for x in client["refused"] if at <= x < end),
                    "failed": sum(1 for x in client["failed"] if at <= x[0] < end)})
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_allocator(json.loads(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a nested checkpoint (default: the cached SmolLM2 one)")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--calm", type=float, default=20.0, help="seconds before the first step")
    parser.add_argument("--step", type=float, default=15.0, help="seconds of each step")
    parser.add_argument("--headroom", type=int, default=768, help="MiB of the cgroup limit above the loaded server")
    parser.add_argument("--output", type=Path, default=RESULTS / "pressure.json")
    args = parser.parse_args()
    if args.checkpoint is None:
        from elastiq.runtime.resolve import resolve_checkpoint

        args.checkpoint = str(resolve_checkpoint("smollm2-135m"))
    cgroup = cgroup_dir(f"elastiq-pressure-{os.getpid()}")
    join = lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731 - runs in each child
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "elastiq", "serve", args.checkpoint, "--rate", "auto",
                               "--port", str(port), "--ctx", str(args.ctx), "--hold", str(args.hold)],
                              preexec_fn=join, env=env, stderr=subprocess.PIPE, text=True)
    log_lines: list[str] = []
    threading.Thread(target=lambda: log_lines.extend(server.stderr), daemon=True).start()
    allocator, threads, stop = None, [], threading.Event()
    try:
        for _ in range(600):
            try:
                model = get_json(f"{base}/models")["data"][0]["id"]
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None:
                    raise SystemExit("the server exited:\n" + "".join(log_lines[-30:])) from None
                time.sleep(0.5)
        else:
            raise SystemExit("the server did not answer in 5 minutes")
        status = get_json(f"{base}/elastiq/status")
        needs = {float(r): n for r, n in status["governor"]["needs_bytes"].items()}
        reclaim(cgroup)
        limit = usage(cgroup) + args.headroom * 2**20
        set_limit(cgroup, limit)
        time.sleep(1)  # the governor reads the limit before the timeline starts
        schedule, thresholds = schedule_for(needs, status["governor"]["margin"], args.calm, args.step)
        duration = schedule[-1][0] + 2 * args.hold + 10
        client = {"tokens": [], "completed": [], "refused": [], "failed": []}
        polls: list[dict] = []
        t0 = time.monotonic()
        allocator = subprocess.Popen([sys.executable, __file__, "--child", "allocator",
                                      json.dumps({"schedule": schedule, "duration": duration,
                                                  "most": (args.headroom + 256) * 2**20})],
                                     preexec_fn=join, env=env, stdout=subprocess.PIPE, text=True)
        offset = time.monotonic() - t0
        threads += [threading.Thread(target=run_client, args=(base, model, t0, stop, client)),
                    threading.Thread(target=run_poller, args=(base, t0, stop, polls))]
        for th in threads:
            th.start()
        output = allocator.communicate()[0].strip().splitlines()
        if allocator.returncode or not output:
            raise SystemExit(f"the allocating process failed (exit status {allocator.returncode}; -9: killed, as the "
                             "cgroup's OOM killer does)")
        held = json.loads(output[-1])
        time.sleep(2)
    finally:
        stop.set()
        for th in threads:
            th.join()
        if allocator is not None and allocator.poll() is None:
            allocator.kill()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        for _ in range(20):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.5)
    import torch

    results = {"command": command_line(), "device": f"CPU, torch {torch.__version__}", "model": model,
               "checkpoint": args.checkpoint, "ctx": args.ctx, "hold": args.hold, "limit": limit,
               "needs": {str(r): n for r, n in needs.items()}, "thresholds": {str(r): v for r, v in thresholds.items()},
               "schedule": schedule, "duration": duration, "allocator": held, "allocator_offset": offset,
               "client": client, "polls": polls,
               "switch_log": [line.strip() for line in log_lines if line.startswith("elastiq: rate ") or
                              line.startswith("elastiq: governor")]}
    results["phases"] = phases(results)
    results["totals"] = {k: len(client[k]) for k in ("completed", "refused", "failed")}
    save_results(args.output, results, to_markdown(results))
    plot(results, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
