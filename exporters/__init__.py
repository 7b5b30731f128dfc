"""Exporters of one rate of a nested checkpoint to GGUF, ONNX and Hugging Face.

Each format is one writer ``(checkpoint, rate, output) -> output path`` in ``FORMATS``; ``export``
checks the format's name and calls its writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .gguf import ExportError, write_gguf
from .hf import write_hf
from .onnx import write_onnx

FORMATS: dict[str, Callable[[Path, float, Path], Path]] = {
    "gguf": write_gguf,
    "onnx": write_onnx,
    "hf": write_hf,
}


def export(checkpoint: str | Path, rate: float, fmt: str, output: str | Path) -> Path:
    """Write ``rate`` of the nested checkpoint ``checkpoint`` to ``output`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not known; accepted: {', '.join(sorted(FORMATS))}")
    return FORMATS[fmt](Path(checkpoint), rate, Path(output))
