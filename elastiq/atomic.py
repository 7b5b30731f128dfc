"""Writes that never leave a half-written file or folder: write a temporary sibling, then rename it.

Every writer of elastiq (checkpoints, exports, recovery state, results) goes through
``atomic_path``. The temporary sibling gets the permissions that ``open()`` or ``mkdir()`` would
give under the user's umask (``mkstemp``/``mkdtemp`` make them owner-only, which would outlive the
rename), so a checkpoint written by one account can be read by another.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into (an empty file, or a folder with
    ``directory``), renamed over ``path`` when the block ends and removed if it raises. A folder
    that already exists at ``path`` is replaced whole (moved aside, then deleted). Files and
    folders written into a temporary folder get the default modes too, whoever created them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, umask = f".{path.name}.", _umask()
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".partial"))
        os.chmod(tmp, 0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".partial")
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:  # what the block wrote (safetensors writes owner-only files) gets the same modes
            for inner in tmp.rglob("*"):
                os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~umask)
        if directory and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".old"))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (the rename is atomic on one file system)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
