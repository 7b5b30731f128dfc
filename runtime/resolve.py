"""What ``elastiq run`` and ``elastiq chat`` were given, as a nested checkpoint.

A checkpoint folder is used as it is. A model (a known name such as the default
``smollm2-135m``, a Hugging Face folder or a GGUF file) is compressed once with the default
pipeline (sort at the default rates, then GPTQ to 4 bits) into the cache, and found there on
every later run; each stage writes under a temporary name, so an interrupted first run leaves
no checkpoint that looks finished (the next run removes what it left and starts over). The
cache key holds the build's default options, so a checkpoint an earlier elastiq built with other
defaults is not taken for today's: it is rebuilt once, and the old one named in the log. A lock
file beside the cached checkpoint makes a second process that asks for the same model at the
same time wait for the first one's result instead of compressing it again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

from ..checkpoint import MANIFEST, SUFFIX
from ..paths import cache_dir, cache_lock


def cached_checkpoint_path(source: str) -> Path:
    """Where the 4-bit checkpoint of model ``source`` is cached: a readable slug of the name plus
    a hash of the resolved path (two folders with one name must not share a checkpoint) and of
    the build's default options (a checkpoint built with other defaults is another checkpoint),
    as the pipeline records them (``PipelineOptions.settings``: sort, then quantize)."""
    from ..compressor.pipeline import PipelineOptions

    path = Path(source).expanduser()
    key = str(path.resolve()) if path.exists() else source
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name or source).strip("-.") or "model"
    settings = json.dumps(PipelineOptions(recover=None).settings(key), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return cache_dir() / "checkpoints" / f"{slug}-{digest}-q4{SUFFIX}"


def other_builds(target: Path) -> list[Path]:
    """The finished cached checkpoints of the same name as ``target`` but another key: builds of
    earlier defaults (or of another folder of that name), which nothing uses any more by itself."""
    slug = target.name.rsplit("-", 2)[0]
    return sorted(p for p in target.parent.glob(f"{slug}-*-q4{SUFFIX}")
                  if p != target and p.name.rsplit("-", 2)[0] == slug and (p / MANIFEST).is_file())


def resolve_checkpoint(source: str, log: Callable[[str], None] = print) -> Path:
    """The nested checkpoint for ``source``: the folder itself, or the cached compression of a
    model, made on first use (compress at the default rates, then GPTQ to Q4_0)."""
    path = Path(source).expanduser()
    if (path / MANIFEST).is_file():
        return path
    target = cached_checkpoint_path(source)
    if (target / MANIFEST).is_file():
        return target
    from ..compressor.compress import compress
    from ..compressor.intake import check_source
    from ..compressor.quantize import quantize_checkpoint

    check_source(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    waiting = f"elastiq: another elastiq process is compressing {source} into {target}; waiting for it"
    with cache_lock(target, waiting, log):
        if (target / MANIFEST).is_file():  # the other process finished it
            return target
        log(f"elastiq: no checkpoint of {source} cached yet; compressing it once into {target} "
            "(calibrate and sort, then GPTQ to 4 bits: several minutes on a laptop CPU)")
        if older := other_builds(target):
            size = sum(f.stat().st_size for p in older for f in p.rglob("*") if f.is_file())
            log(f"elastiq: {len(older)} other build(s) of that name stay in {target.parent} (made with earlier "
                f"defaults, or from another folder so named): {', '.join(p.name for p in older)}; "
                f"delete what you no longer run to free {size / 1e6:.0f} MB")
        float_ckpt = target.with_name(target.name.replace(f"-q4{SUFFIX}", f"-float{SUFFIX}"))
        try:
            compress(source, float_ckpt, overwrite=True)
            quantize_checkpoint(float_ckpt, target, overwrite=True)
        except KeyboardInterrupt:
            if (target / MANIFEST).is_file():  # interrupted once the checkpoint was in place
                raise
            raise KeyboardInterrupt(f"nothing was written to {target}; the next run compresses {source} "
                                    "again") from None
        finally:  # the float intermediate is not kept, whatever stopped the run
            shutil.rmtree(float_ckpt, ignore_errors=True)
    return target
