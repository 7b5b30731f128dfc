"""Where elastiq keeps its cache and finds its calibration and evaluation data, and the lock that
lets two processes share one cache entry."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from . import ElastiqError

DATA_ENV = "ELASTIQ_DATA"
CACHE_ENV = "ELASTIQ_CACHE"
# The data the package carries (installed with it, listed with sources and licenses in its README.md).
PACKAGED_DATA = Path(__file__).resolve().parent / "data"


def cache_dir() -> Path:
    """The cache root: $ELASTIQ_CACHE, else $XDG_CACHE_HOME/elastiq, else ~/.cache/elastiq."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "elastiq"


def data_dir() -> Path:
    """The data folder (wikitext2/, tasks/, c4/): $ELASTIQ_DATA if set, else the package's own copy."""
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise ElastiqError(f"${DATA_ENV} points to {path}, which is not a directory; set it to a folder "
                               "that holds wikitext2/, tasks/ and c4/, or unset it to use the data elastiq carries")
        return path
    if not (PACKAGED_DATA / "tasks").is_dir():
        raise ElastiqError(f"elastiq's data folder {PACKAGED_DATA} is missing or incomplete (the installation is "
                           f"broken): reinstall elastiq, or set ${DATA_ENV} to a folder that holds wikitext2/, "
                           "tasks/ and c4/")
    return PACKAGED_DATA


@contextmanager
def cache_lock(path: Path, waiting: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock file beside cache entry ``path`` (``path.lock``): a second process that wants
    the same entry says ``waiting`` and waits for the first one's result instead of making it again."""
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
