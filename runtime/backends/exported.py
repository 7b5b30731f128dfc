"""What the backends that run an export share: the export cache beside the checkpoint, and an
engine with the torch ``Engine``'s interface on one rate's export.

Each rate is exported once into ``NAME.elastiq.exports/rate-R-KEY.FORMAT``, where KEY is a short
hash of the checkpoint's manifest, so a changed checkpoint never reuses a stale export (whose
files are then removed). The engines keep ``Engine``'s attributes and a ``generate.CachedGenerator``
(the longest common prefix of the cached tokens is reused, the same stop rule and sampling as
torch), so ``chat`` and the CLI run unchanged on either. A rate switch loads the other rate's
export (exporting it first if it is not cached): unlike torch's in-place resize, it reads that
whole file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ... import ElastiqError
from ...checkpoint import MANIFEST, Checkpoint
from ...exporters import export
from ..engine import Switch, check_ctx
from ..generate import CachedGenerator
from .base import import_package


def export_key(ckpt: Checkpoint) -> str:
    """A short hash of the checkpoint's manifest (its sha256 per tensor makes it name the weights)."""
    return hashlib.sha256((ckpt.path / MANIFEST).read_bytes()).hexdigest()[:12]


def export_path(ckpt: Checkpoint, rate: float, fmt: str) -> Path:
    """Where ``rate``'s export in ``fmt`` is cached: beside the checkpoint, keyed by its manifest."""
    return ckpt.path.with_name(ckpt.path.name + ".exports") / f"rate-{rate}-{export_key(ckpt)}.{fmt}"


def cached_export(ckpt: Checkpoint, rate: float, fmt: str) -> tuple[Path, float | None]:
    """The export of ``rate`` in ``fmt``, written once (the exporters write a temporary name and
    rename it); returns its path and the seconds exporting took, None when the cache held it.
    Exports of this rate under another manifest key are stale and removed."""
    ckpt.rate_entry(rate)
    path = export_path(ckpt, rate, fmt)
    if path.is_file():
        return path, None
    for stale in path.parent.glob(f"rate-{rate}-*.{fmt}"):
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        export(ckpt.path, rate, fmt, path)
    except PermissionError as err:
        raise ElastiqError(f"cannot write the export cache {path.parent}: {err.strerror}; make the "
                           f"checkpoint's folder writable, or run with --backend torch") from None
    return path, time.perf_counter() - start


class ExportEngine:
    """One rate of ``checkpoint`` run by another backend on its cached export, with ``Engine``'s
    interface. Activations and logits are float32 (``dtype``); ``threads`` defaults to torch's
    thread count. ``load_seconds`` and ``load_bytes`` are those of opening the export (its file
    size); ``export_seconds`` is the time exporting took, None when the cache held the export.
    ``scoring`` prepares the backend for ``logits`` (llama.cpp then keeps every position's logits,
    ``ctx`` x vocab floats)."""

    backend = format = ""  # the backend's name and the export format it runs
    requires: tuple[str, str] = ("", "")  # its package: (module, pip requirement)

    @staticmethod
    def refusal(ckpt: Checkpoint) -> str | None:
        """Why this backend cannot run ``ckpt``'s model (None: it can), said before anything is
        planned or exported: its footprint and opening it ask this first."""
        return None

    def __init__(self, checkpoint: str | Path | Checkpoint, rate: float, ctx: int = 2048, tokenizer=None,
                 threads: int | None = None, scoring: bool = False):
        self.package = import_package(self.backend, self.requires)
        self.ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        if (why := self.refusal(self.ckpt)) is not None:
            raise ElastiqError(why)
        self.config = self.ckpt.config
        check_ctx(self.config, ctx)
        self.ckpt.rate_entry(rate)  # an unoffered rate fails before anything is exported
        self.int4 = self.ckpt.quantization is not None
        self.dtype, self.device, self.ctx = torch.float32, torch.device("cpu"), ctx
        self.threads = threads or torch.get_num_threads()
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        self.generator = None
        self.scoring = scoring
        self.rate = rate
        self._open(rate)

    def _open(self, rate: float) -> None:
        """Export ``rate`` if the cache lacks it, then load it (the previous model is freed first)."""
        self.export, self.export_seconds = cached_export(self.ckpt, rate, self.format)
        self._close()
        start = time.perf_counter()
        self.generator = self._load(self.export)
        self.load_seconds = time.perf_counter() - start
        self.load_bytes = self.export.stat().st_size

    def _load(self, path: Path) -> CachedGenerator:
        raise NotImplementedError

    def _close(self) -> None:
        self.generator = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of every position of right-padded ``ids`` [B, T], each row
        run from position 0 on an empty cache: what evaluation scores."""
        raise NotImplementedError

    def set_rate(self, rate: float) -> Switch:
        """Move to ``rate`` by loading its export (written first if the cache lacks it); the cache of
        tokens is emptied. ``bytes_read`` is the size of the export loaded."""
        self.ckpt.rate_entry(rate)
        start, old = time.perf_counter(), self.rate
        if rate == old:
            return Switch(old, rate, time.perf_counter() - start, 0)
        self._open(rate)
        self.rate = rate
        return Switch(old, rate, time.perf_counter() - start, self.load_bytes)
