"""What a backend is: a name, the package it needs, its footprint, and how to open an engine."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ... import ElastiqError
from ...families import checkpoint_family
from ...families.base import ATTENTION, ATTENTION_ONLY, MLP_ONLY, SSM, SSM_MLP
from ..memory import Footprint

# What each kind of block is, in a backend's refusal (``families.base``'s kinds).
KIND_NAMES = {ATTENTION: "attention + MLP", SSM: "Mamba2", SSM_MLP: "Mamba2 + MLP", ATTENTION_ONLY: "attention-only",
              MLP_ONLY: "MLP-only"}


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


def block_kinds(ckpt) -> set[str]:
    """The kinds of block a checkpoint's model holds (``Family.layer_kinds``)."""
    return set(checkpoint_family(ckpt).layer_kinds(ckpt.config))


def unsupported(backend: str, ckpt, runs: str, instead: str) -> str:
    """A backend's refusal of a checkpoint whose kinds of block it cannot run: what its blocks are,
    what the backend ``runs``, and what to run it on ``instead``."""
    family = checkpoint_family(ckpt)
    held = block_kinds(ckpt)
    kinds = [KIND_NAMES[k] for k in KIND_NAMES if k in held] + sorted(held - set(KIND_NAMES))
    kinds = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    return f"the {backend} backend runs {runs}; {ckpt.path.name} is a {family.name} model of {kinds} blocks: " \
           f"run it with {instead}"
