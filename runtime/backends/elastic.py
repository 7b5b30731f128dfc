"""elastiq's own runtime: the elastic model in torch (``runtime.engine.Engine``), the only backend
that switches rate in memory, reading only the units a wider rate adds."""

from __future__ import annotations

import torch

from ...checkpoint import Checkpoint
from ...kernels import q4_path
from ..engine import Engine
from ..memory import Footprint, predict_footprint
from .base import Backend


def footprint(ckpt: Checkpoint, rate: float, ctx: int, baseline: int, dtype: torch.dtype = torch.bfloat16,
              int4: bool = True, device: str | torch.device = "cpu", **_) -> Footprint:
    return predict_footprint(ckpt, rate, ctx, dtype, int4, baseline, q4_path(device))


def _open(checkpoint, rate: float, ctx: int, dtype: torch.dtype | None = None, verify: bool = True,
          tokenizer=None, **_) -> Engine:
    return Engine(checkpoint, rate, ctx, dtype, verify=verify, tokenizer=tokenizer)


BACKEND = Backend("torch", None, footprint, _open)
