"""What a backend is: a name, the package it needs, its footprint, and how to open an engine."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ... import ElastiqError
from ..memory import Footprint


@dataclass(frozen=True)
class Backend:
    """One runtime a nested checkpoint can run on.

    ``package`` is (module to import, pip requirement), None for what elastiq itself needs;
    ``export_format`` the export it runs from the cache beside the checkpoint, if any.
    ``footprint(ckpt, rate, ctx, baseline, dtype=, int4=, device=)`` predicts the ``Footprint`` of
    running ``rate`` with ``ctx`` positions on top of ``baseline`` bytes, before loading anything;
    ``open(checkpoint, rate, ctx, dtype=, verify=, tokenizer=, scoring=)`` loads the engine (each
    takes the options it uses and ignores the rest).
    """

    name: str
    package: tuple[str, str] | None
    footprint: Callable[..., Footprint]
    open: Callable[..., object]
    export_format: str | None = None  # the export it runs (gguf, onnx); None: the checkpoint itself

    def require(self):
        """Import the backend's package (so that it counts in a memory baseline)."""
        return import_package(self.name, self.package)


def import_package(backend: str, package: tuple[str, str] | None):
    """Import ``package`` (module, pip requirement) of ``backend``; a clear error naming the pip
    requirement when it is missing."""
    if package is None:
        return None
    module, dist = package
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ElastiqError(f"the {backend} backend needs the Python package {module} ({err}); install it "
                           f"with `pip install {dist}`, or run with --backend torch") from None
