"""The memory governor of ``elastiq serve``: the serving rate follows the device's free memory.

A thread samples free memory a few times a second (``machine.free_memory``: psutil, the cgroup
limit, CUDA; Linux's pressure stall information is reported beside it). The model part of each
rate's footprint (weights, KV cache, workspace: the planner's prediction without the baseline) is
known from the checkpoint, and the memory the model may use is the margin's share of what is free
plus what the current rate holds, the planner's rule re-applied while running. When the current
rate no longer fits, the target moves at once to the least-pruned rate that does; a less-pruned
rate must have fitted for ``hold_s`` before the target grows back (hysteresis, so a rate does
not flap). When not even the most-pruned rate fits, the governor is ``starved``: the server
refuses new requests with 503 and lets running ones finish. The server applies the target at the
next token boundary (``serve.py``).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import backends
from .floor import within_floor
from ..machine import FreeMemory
from .memory import SAFETY_MARGIN

PRESSURE = Path("/proc/pressure/memory")


def model_needs(engine, max_kl: float) -> dict[float, int]:
    """Predicted bytes of each rate ``engine`` may run (offered, within the quality floor ``max_kl``)
    beyond the process's baseline: its weights, KV cache and workspace on the engine's backend."""
    footprint = backends.backend(engine.backend).footprint
    ckpt = engine.ckpt
    return {r: footprint(ckpt, r, engine.ctx, 0, dtype=engine.dtype, int4=engine.int4, device=engine.device).total
            for r in ckpt.rates if within_floor(ckpt, r, max_kl)}


def memory_pressure(path: Path = PRESSURE) -> float | None:
    """The share of the last 10 s in which some task stalled on memory (Linux PSI), or None."""
    try:
        match = re.search(r"^some avg10=([\d.]+)", path.read_text(), re.M)
    except OSError:
        return None
    return float(match.group(1)) / 100 if match else None


class Governor:
    """The target rate among ``needs`` (rate -> predicted model bytes, of the rates it may run:
    offered and within the quality floor), starting at ``rate``, from ``probe``'s free memory every
    ``interval_s``. ``on_change(rate)``, set by the server, is called from the governor's thread when
    the target moves."""

    def __init__(self, needs: dict[float, int], rate: float, probe: Callable[[], FreeMemory],
                 margin: float = SAFETY_MARGIN, hold_s: float = 10.0, interval_s: float = 0.25):
        self.needs, self.rate, self.probe = dict(needs), rate, probe
        self.on_change: Callable[[float], None] = lambda _: None
        self.margin, self.hold_s, self.interval_s = margin, hold_s, interval_s
        self.free: FreeMemory | None = None
        self.pressure: float | None = None
        self.starved: str | None = None  # why no rate fits, while none does
        self.reason = "the rate loaded"
        self.moves = 0
        self._since: float | None = None  # when a less-pruned rate started to fit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="elastiq-governor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.step()

    def step(self, now: float | None = None) -> float:
        """Sample free memory once and move the target if the rule says so; returns the target."""
        now = time.monotonic() if now is None else now
        free, self.pressure = self.probe(), memory_pressure()
        self.free = free
        room = self.margin * (free.bytes + self.needs[self.rate])
        fitting = [r for r in sorted(self.needs) if self.needs[r] <= room]
        why = (f"{free.bytes / 2**20:.0f} MiB free ({free.source}); the model may use {room / 2**20:.0f} MiB, "
               f"rate {{rate}} needs {{need:.0f}} MiB")
        if not fitting:
            smallest = max(self.needs)
            self.starved = why.format(rate=smallest, need=self.needs[smallest] / 2**20) + ": no rate fits"
            self._since = None
            self._move(smallest, self.starved)
            return self.rate
        self.starved = None
        best = fitting[0]
        if best > self.rate:  # the current rate no longer fits: shrink now
            self._since = None
            self._move(best, why.format(rate=self.rate, need=self.needs[self.rate] / 2**20))
        elif best < self.rate:  # room for a less-pruned rate: grow once it has lasted
            self._since = now if self._since is None else self._since
            if now - self._since >= self.hold_s:
                self._since = None
                self._move(best, why.format(rate=best, need=self.needs[best] / 2**20) +
                           f", for {self.hold_s:g} s")
        else:
            self._since = None
        return self.rate

    def _move(self, rate: float, reason: str) -> None:
        if rate == self.rate:
            return
        print(f"elastiq: governor: rate {self.rate} -> {rate}: {reason}", file=sys.stderr)
        self.rate, self.reason = rate, reason
        self.moves += 1
        self.on_change(rate)

    def status(self) -> dict:
        """What ``/v1/elastiq/status`` reports of the governor."""
        return {"target_rate": self.rate, "reason": self.reason, "starved": self.starved, "moves": self.moves,
                "free_memory_bytes": self.free.bytes if self.free else None,
                "memory_pressure_some_avg10": self.pressure, "hold_s": self.hold_s, "margin": self.margin,
                "needs_bytes": {str(r): n for r, n in sorted(self.needs.items())}}
