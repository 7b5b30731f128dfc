"""``--backend auto``: run on the installed backend that decodes this checkpoint fastest on this machine.

Which backend is fastest depends on the CPU (llama.cpp's kernels against torch's on AVX2, AVX-512
or ARM), the thread count and the model, so it is measured, never assumed. Each installed backend
first plans its own rate (``plan.plan_rate``: its footprint, the free memory, the quality floor);
the least-pruned of those rates wins, since quality comes first, and among the backends that can
run it the fastest decoder is chosen. Speed is measured once per checkpoint, rate, machine (CPU
model and instruction sets), thread count and backend version: the backend opens that rate (an
export backend writes its export into the cache beside the checkpoint), prefills ``PROBE_PROMPT``
tokens and decodes ``PROBE_TOKENS`` greedy tokens, ``PROBE_REPEATS`` times, keeping the fastest
repeat (the least disturbed by other work). The figures are remembered in ``SPEEDS_FILE`` in the
cache, so later runs choose at once. Measuring holds a lock beside that file: a second process
that needs the same figures waits for them instead of measuring at the same time (which would
slow both probes and could choose differently).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import ElastiqError, __version__
from ..atomic import write_text
from ..checkpoint import Checkpoint
from ..kernels import q4_path
from ..kernels.cpu_ops import build_name
from ..paths import cache_dir, cache_lock
from .backends import BACKENDS, backend, open_engine
from .backends.exported import export_key
from .floor import DEFAULT_MAX_KL
from ..machine import return_freed_memory
from .plan import RatePlan, plan_rate, process_baseline

SPEEDS_FILE = "backend-speeds.json"
PROBE_PROMPT = 64  # tokens prefilled before the timed decode
PROBE_TOKENS = 33  # tokens generated: 32 decode steps are timed (the last token is sampled, not run)
PROBE_REPEATS = 3
PROBE_TEXT = ("The river rose through the night, and by morning the lower fields of the valley were under water. "
              "Farmers moved their animals to the hills while the town council met to decide what to do next. ")
# CPU features that decide which kernels a backend runs (ggml, oneDNN and MLAS pick by them)
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


@dataclass(frozen=True)
class Speed:
    """One backend's measured speed at one rate: decode and prefill tokens a second."""

    decode_tok_s: float
    prefill_tok_s: float
    measured: str  # when, as an ISO date


@dataclass(frozen=True)
class Choice:
    """The backend ``--backend auto`` picked, its rate plan, the speeds it compared and why."""

    backend: str
    plan: RatePlan
    speeds: dict[str, Speed]
    reason: str


@functools.cache
def cpu_signature() -> str:
    """The CPU as far as kernels care: model name, architecture and the instruction sets in ``CPU_FEATURES``."""
    model, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return f"{model or 'unknown CPU'} ({platform.machine()}; {' '.join(f for f in CPU_FEATURES if f in flags)})"


def _version(name: str) -> str:
    """The backend's package version (elastiq's own for torch, with torch's)."""
    package = backend(name).require()
    own = f"elastiq {__version__}, torch {torch.__version__}"
    return own if package is None else f"{own}, {package.__name__} {getattr(package, '__version__', '?')}"


def speed_key(ckpt: Checkpoint, rate: float, name: str, threads: int, dtype: torch.dtype) -> str:
    """What a measured speed depends on: the checkpoint's weights, the rate, the backend and its
    version, the CPU, the thread count and (for torch) the activation dtype and the 4-bit kernel."""
    parts = {"checkpoint": export_key(ckpt), "rate": rate, "backend": name, "version": _version(name),
             "cpu": cpu_signature(), "threads": threads, "dtype": str(dtype) if name == "torch" else None,
             "kernel": _kernel() if name == "torch" and ckpt.quantization is not None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _kernel() -> str:
    """The torch backend's 4-bit CPU path, and for elastiq's own ops their build (an update that
    changes their source is measured again)."""
    path = q4_path("cpu")
    return f"{path} {build_name()}" if path == "cpu" else path


def _read_speeds(path: Path) -> dict:
    """The remembered speeds; an unreadable file counts as empty (it is only a cache)."""
    try:
        speeds = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return speeds if isinstance(speeds, dict) else {}


def _remembered(remembered: dict, keys: dict[str, str]) -> dict[str, Speed]:
    """The speeds ``remembered`` holds for each backend's key."""
    speeds = {}
    for name, key in keys.items():
        entry = remembered.get(key)
        if isinstance(entry, dict) and {"decode_tok_s", "prefill_tok_s", "measured"} <= entry.keys():
            speeds[name] = Speed(entry["decode_tok_s"], entry["prefill_tok_s"], entry["measured"])
    return speeds


def probe_ids(tokenizer, count: int = PROBE_PROMPT) -> list[int]:
    """``count`` tokens of English prose for the probe's prefill."""
    ids = tokenizer.encode(PROBE_TEXT)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def measure_speed(name: str, ckpt: Checkpoint, rate: float, dtype: torch.dtype, tokenizer) -> Speed:
    """Open ``rate`` on backend ``name`` (exporting it first if need be), time the probe, and free it."""
    ids = probe_ids(tokenizer)
    engine = open_engine(name, ckpt, rate, PROBE_PROMPT + PROBE_TOKENS + 1, dtype, tokenizer=tokenizer)
    decode, prefill = 0.0, 0.0
    for _ in range(PROBE_REPEATS):
        engine.generator.reset()
        stats = engine.generator.generate(ids, PROBE_TOKENS)
        decode = max(decode, (stats.decoded - 1) / stats.decode_s)
        prefill = max(prefill, stats.prefill_tok_s)
    del engine
    gc.collect()
    return_freed_memory()
    return Speed(decode, prefill, time.strftime("%Y-%m-%d"))


def choose_backend(ckpt: Checkpoint, rate: float | None, ctx: int, dtype: torch.dtype, int4: bool,
                   threads: int, memory_budget: int | None = None, max_kl: float = DEFAULT_MAX_KL, tokenizer=None,
                   log: Callable[[str], None] = lambda _: None) -> Choice:
    """The backend to run ``ckpt`` on: among the installed backends that can run the least-pruned
    rate any of them plans (``rate`` when given), the one measured to decode it fastest here.
    Speeds come from the cache file when it holds them for this key, else are measured (``log``
    says so first) and remembered."""
    plans, unusable = {}, {}
    for name in BACKENDS:  # every package imported first, so that one baseline serves every plan
        try:
            backend(name).require()
        except ElastiqError as err:
            unusable[name] = str(err)
    baseline = process_baseline()
    for name in BACKENDS:
        if name in unusable:
            continue
        try:
            plans[name] = plan_rate(ckpt, rate, ctx, dtype, int4, memory_budget, backend=name, baseline=baseline,
                                    max_kl=max_kl)
        except ElastiqError as err:
            unusable[name] = str(err)
    if not plans:
        errors = set(unusable.values())
        raise ElastiqError(errors.pop() if len(errors) == 1 else "no backend can run this checkpoint here: " +
                           "; ".join(f"{name}: {why}" for name, why in unusable.items()))
    best = min(plan.rate for plan in plans.values())
    candidates = [name for name, plan in plans.items() if plan.rate == best]
    path = cache_dir() / SPEEDS_FILE
    keys = {name: speed_key(ckpt, best, name, threads, dtype) for name in candidates}
    speeds = _remembered(_read_speeds(path), keys)
    fresh = []
    if len(candidates) > 1 and len(speeds) < len(candidates):
        path.parent.mkdir(parents=True, exist_ok=True)
        # a second process waits for the first's figures instead of measuring beside it
        with cache_lock(path, "--backend auto: another elastiq process is measuring the backends on this machine; "
                              "waiting for it", log):
            remembered = _read_speeds(path)
            speeds = _remembered(remembered, keys)
            missing = [name for name in candidates if name not in speeds]
            if missing:
                log(f"--backend auto: measuring how fast {', '.join(missing)} decode{'s' if len(missing) == 1 else ''} "
                    f"rate {best} on this machine, once (exports are written into the cache beside the checkpoint)")
            for name in missing:
                speeds[name] = measure_speed(name, ckpt, best, dtype, tokenizer)
                remembered[keys[name]] = {"backend": name, "rate": best, "checkpoint": str(ckpt.path),
                                          "threads": threads, "cpu": cpu_signature(), **speeds[name].__dict__}
                fresh.append(name)
            if fresh:  # written with the figures of checkpoints that no longer exist left out
                kept = {key: entry for key, entry in remembered.items() if not (
                    isinstance(entry, dict) and "checkpoint" in entry and not Path(entry["checkpoint"]).exists())}
                write_text(path, json.dumps(kept, indent=1, sort_keys=True) + "\n")
    chosen = max(candidates, key=lambda name: speeds[name].decode_tok_s if name in speeds else 0.0)
    return Choice(chosen, plans[chosen], speeds, _reason(chosen, best, plans, speeds, fresh, unusable, path))


def _reason(chosen: str, rate: float, plans: dict[str, RatePlan], speeds: dict[str, Speed], fresh: list[str],
            unusable: dict[str, str], path: Path) -> str:
    """Why ``chosen``: the speeds compared, when measured, and which backends were left out and why."""
    if len(speeds) > 1:
        ranked = sorted(speeds, key=lambda name: -speeds[name].decode_tok_s)
        figures = ", ".join(f"{name} {speeds[name].decode_tok_s:.0f} tok/s" for name in ranked)
        when = "measured now" if fresh else f"measured {speeds[chosen].measured}"
        reason = f"{chosen}: the fastest decoder of rate {rate} here ({figures}; {when}, remembered in {path})"
    else:
        reason = f"{chosen}: the only backend that can run rate {rate} here"
    left = [f"{name} plans rate {plan.rate}" for name, plan in plans.items() if plan.rate != rate]
    left += [f"{name} cannot run ({error})" for name, error in unusable.items()]
    return reason + ("; " + "; ".join(left) if left else "")


__all__ = ["Choice", "Speed", "choose_backend", "cpu_signature", "measure_speed", "speed_key"]
