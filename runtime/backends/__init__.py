"""The backends a nested checkpoint runs on, one module each behind ``Backend`` (``base.py``).

``BACKENDS`` is the one list of them: each name and the module that defines it as ``BACKEND``.
Adding a backend is one module and one entry here. Importing this package imports no backend
(the CLI lists the names without loading torch); ``backend(name)`` imports the one asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ... import ElastiqError

if TYPE_CHECKING:
    import torch

    from ...checkpoint import Checkpoint
    from .base import Backend

BACKENDS: dict[str, str] = {"torch": "elastic", "llama.cpp": "llamacpp", "onnxruntime": "onnxrt"}
AUTO = "auto"  # not a backend: the installed one measured fastest for the checkpoint here (``runtime.fastest``)


def backend(name: str) -> Backend:
    """The backend called ``name``, or an error listing the known ones."""
    if name not in BACKENDS:
        raise ElastiqError(f"backend {name!r} is not known; accepted: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{BACKENDS[name]}").BACKEND


def open_engine(name: str, checkpoint: str | Path | Checkpoint, rate: float, ctx: int,
                dtype: torch.dtype | None = None, verify: bool = True, tokenizer=None, scoring: bool = False):
    """The engine of backend ``name`` at ``rate``. ``dtype`` and ``verify`` are torch's (an export's
    reads of the checkpoint always verify; the other backends compute in their own types);
    ``scoring`` prepares an export's engine for ``logits`` (torch's always can)."""
    chosen = backend(name)
    chosen.require()
    return chosen.open(checkpoint, rate, ctx, dtype=dtype, verify=verify, tokenizer=tokenizer, scoring=scoring)


__all__ = ["AUTO", "BACKENDS", "backend", "open_engine"]
