"""Each rate's quality, measured as compression ends and recorded in the rate table.

On windows of the calibration text that calibration did not use, every offered rate of the
written checkpoint is compared with the dense model (the source model for ``compress``, the
float checkpoint's rate 0 for ``quantize``) as llama.cpp's ``llama-perplexity --kl-divergence``
compares a quantization with its base: the mean and 99th percentile over tokens of
KL(dense || rate), the share of tokens whose most likely next token is the same, and the rate's
own perplexity. The checkpoint is read back rate by rate, so the figures describe exactly the
weights a runtime loads (quantized ones dequantized to float32).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..divergence import Divergence
from ..modeling.model import Transformer
from ..quants import Quantized

QUALITY_WINDOWS = 8  # held-out calibration windows measured per rate (0: none)


def rate_quality(ckpt: Checkpoint, dense: Mapping[str, torch.Tensor | Quantized], windows: torch.Tensor,
                 progress: bool = True) -> dict[float, dict[str, float]]:
    """``{rate: {"heldout_ppl", "kl_mean", "kl_p99", "top1_agreement", "tokens"}}`` for every rate
    of ``ckpt`` on ``windows`` [n, seqlen], against the model of the weights ``dense``."""
    config = ckpt.config
    reference = Transformer.from_weights(dense, config)
    out = {}
    for rate in tqdm(ckpt.rates, desc="quality", disable=not progress, leave=False):
        model = Transformer.from_weights(ckpt.read_rate(rate), config)
        divergence, nll = Divergence(), []
        with torch.inference_mode():
            for window in windows:
                # The dense pass is repeated for each rate: keeping its logits for every window
                # instead would hold windows x seqlen x vocab floats (800 MB on SmolLM2).
                logits = model(window[None])[0, :-1].float()
                divergence.add(reference(window[None])[0, :-1], logits)
                nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
        d = divergence.summary()
        out[rate] = {"heldout_ppl": round(math.exp(torch.cat(nll).mean().item()), 4),
                     "kl_mean": round(d["kl_mean"], 6), "kl_p99": round(d["kl_p99"], 6),
                     "top1_agreement": round(d["top1_agreement"], 6), "tokens": d["tokens"]}
        del model
    return out
