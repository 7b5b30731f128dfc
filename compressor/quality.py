"""Each rate's quality, measured as compression ends and recorded in the rate table.

On windows of the calibration text that calibration did not use, every offered rate of the
written checkpoint is compared with the dense model (the source model for ``compress``, the
float checkpoint's rate 0 for ``quantize``) as llama.cpp's ``llama-perplexity --kl-divergence``
compares a quantization with its base: the mean and 99th percentile over tokens of
KL(dense || rate), the share of tokens whose most likely next token is the same, and the rate's
own perplexity. The checkpoint is read back rate by rate, so the figures describe exactly the
weights a runtime loads (quantized ones dequantized to float32), and one block at a time, so that
a model larger than memory is measured too.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint
from ..divergence import Divergence
from ..modeling.model import Transformer, Weight, block_from_weights
from .blockwise import BlockReader, block_runner

QUALITY_WINDOWS = 8  # held-out calibration windows measured per rate (0: none)


def rate_quality(ckpt: Checkpoint, dense: Checkpoint | Mapping[str, Weight], windows: torch.Tensor,
                 progress: bool = True, device: torch.device | str = "cpu") -> dict[float, dict[str, float]]:
    """``{rate: {"heldout_ppl", "kl_mean", "kl_p99", "top1_agreement", "tokens"}}`` for every rate
    of ``ckpt`` on ``windows`` [n, seqlen], against the dense model: rate 0 of the checkpoint
    ``dense`` (``ckpt`` itself for a float one), or the model of the weights ``dense``.

    Each model is held one block at a time (besides its embedding and head): the dense model's
    last hidden states of every window are computed once and kept ([n, seqlen, hidden], where its
    logits would be [n, seqlen, vocab]), and each window's dense logits recomputed from them by the
    dense head when a rate's come, window by window as the whole models compute them. Every model
    computes on ``device``."""
    config = ckpt.config
    windows = windows.to(device)
    reference, finals = _last_hidden(BlockReader(dense, config, device=device), config, windows)
    norm, head = reference.norm, reference.lm_head  # the dense embedding is not needed again
    del reference
    out = {}
    for rate in tqdm(ckpt.rates, desc="quality", disable=not progress, leave=False):
        model, hidden = _last_hidden(BlockReader(ckpt, config, rate, device), config, windows)
        divergence, nll = Divergence(), []
        with torch.inference_mode():
            for window, x, final in zip(windows, hidden, finals):
                logits = model.lm_head(model.norm(x))[0, :-1].float()
                divergence.add(head(norm(final))[0, :-1], logits)
                nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
        d = divergence.summary()
        out[rate] = {"heldout_ppl": round(math.exp(torch.cat(nll).mean().item()), 4),
                     "kl_mean": round(d["kl_mean"], 6), "kl_p99": round(d["kl_p99"], 6),
                     "top1_agreement": round(d["top1_agreement"], 6), "tokens": d["tokens"]}
        del model, hidden
    return out


def _last_hidden(reader: BlockReader, config: Mapping, windows: torch.Tensor) -> tuple[Transformer, list[torch.Tensor]]:
    """The model's ends (``Transformer.ends_from_weights``) and each window's hidden states after
    the last block [1, seqlen, hidden], each window run alone as ``Transformer.forward`` runs it,
    one block built at a time."""
    ends = Transformer.ends_from_weights(reader.ends(), config)
    positions = torch.arange(windows.shape[1], device=windows.device)
    with torch.inference_mode():
        hidden = [ends.embed(window[None]) for window in windows]
    for index in range(len(reader.blocks)):
        run = block_runner(block_from_weights(reader.block(index), config, index), positions)
        with torch.inference_mode():
            hidden = [run(x) for x in hidden]
        del run
    return ends, hidden
