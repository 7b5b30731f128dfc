"""How far a model's next-token distributions are from a reference model's, as llama.cpp measures it.

``llama-perplexity --kl-divergence`` compares a quantized model with its base token by token:
the KL divergence KL(reference || model) of the two next-token distributions (its mean and 99th
percentile over tokens), and how often both put the same token first ("same top p"). Compression
and evaluation report the same figures, from these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Divergence:
    """Per-token KL(reference || model) in nats and top-1 agreement, accumulated over windows."""

    kl: list[torch.Tensor] = field(default_factory=list)
    same: list[torch.Tensor] = field(default_factory=list)

    def add(self, reference_logits: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the tokens of one window: logits [T, vocab] of the reference and of the model."""
        ref = reference_logits.float().log_softmax(-1)
        logp = logits.float().log_softmax(-1)
        self.kl.append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0).double())
        self.same.append((ref.argmax(-1) == logp.argmax(-1)).double())

    def summary(self) -> dict[str, float]:
        """``kl_mean`` (± ``kl_stderr`` over tokens), ``kl_p99``, ``top1_agreement`` (±
        ``top1_stderr``) and the number of ``tokens``."""
        kl, same = torch.cat(self.kl), torch.cat(self.same)
        n = kl.numel()
        return {"kl_mean": kl.mean().item(), "kl_stderr": (kl.std() / n ** 0.5).item() if n > 1 else float("nan"),
                "kl_p99": torch.quantile(kl, 0.99).item(), "top1_agreement": same.mean().item(),
                "top1_stderr": (same.std() / n ** 0.5).item() if n > 1 else float("nan"), "tokens": n}
