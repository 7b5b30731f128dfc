"""The quality floor: a rate too far from the dense model is not offered unless the user accepts it.

Compression measures every rate against the dense model and records it in the rate table
(``compressor/quality.py``): the mean KL divergence of its next-token distributions on held-out
calibration text, among other figures. The planner, ``--rate`` and ``/rate`` refuse a rate whose
recorded KL exceeds ``max_kl`` (``--max-kl``; ``inf`` accepts every rate), and say what quality
they chose. A rate with no recorded quality (older checkpoints, ``--quality-windows 0``) is not
refused, and the planner says that its quality is unmeasured.
"""

from __future__ import annotations

import math

from .. import ElastiqError
from ..checkpoint import Checkpoint

DEFAULT_MAX_KL = 0.5  # nats; see the README's "Quality floor" for the measurements behind it


def quality_note(ckpt: Checkpoint, rate: float) -> str:
    """What the rate table says of ``rate``'s quality, in a few words."""
    q = ckpt.rate_entry(rate).get("quality")
    if not q:
        return "quality not measured"
    return (f"KL {q['kl_mean']:.3f} nats to the dense model, same top-1 {100 * q['top1_agreement']:.0f}%, "
            f"held-out perplexity {q['heldout_ppl']:.1f}")


def within_floor(ckpt: Checkpoint, rate: float, max_kl: float) -> bool:
    """Whether ``rate``'s recorded KL is at most ``max_kl`` (an unmeasured rate is)."""
    q = ckpt.rate_entry(rate).get("quality")
    return not q or math.isinf(max_kl) or q["kl_mean"] <= max_kl


def check_floor(ckpt: Checkpoint, rate: float, max_kl: float) -> None:
    """Refuse ``rate`` when its recorded KL exceeds ``max_kl``, naming the way to accept it."""
    if not within_floor(ckpt, rate, max_kl):
        raise ElastiqError(f"rate {rate} is below the quality floor: {quality_note(ckpt, rate)}, over the "
                           f"{max_kl} nats allowed; pass --max-kl inf (or a larger --max-kl) to run it anyway")
