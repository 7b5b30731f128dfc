"""Writes that never leave a half-written file or folder: write a temporary sibling, then rename it.

Every writer of elastiq (checkpoints, exports, recovery state, results) goes through
``atomic_path``. The temporary sibling gets the permissions that ``open()`` or ``mkdir()`` would
give under the user's umask (``mkstemp``/``mkdtemp`` make them owner-only, which would outlive the
rename), so a checkpoint written by one account can be read by another.

Faults while writing. A temporary is named ``.NAME.<pid>.<random>.partial`` (a folder being
replaced is moved aside to ``.NAME.<pid>.<random>.old``), so that the next write of NAME
recognises what a writer killed mid-write (kill -9, power loss) left: a temporary whose process is
gone is removed, and a folder it had moved aside and not yet replaced is put back. A temporary of a
live process (another writer of NAME, or a reused PID) is left alone; PIDs are this machine's, so
two machines (or PID namespaces) writing one name in a shared folder could take each other's
temporaries for stale. A write that runs out of room (full disk, quota, file-size limit) removes
its temporary and raises ``WriteError``, which names the output and the cause.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from . import ElastiqError

SPACE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit exceeded"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error ends its message


class WriteError(ElastiqError):
    """A write ran out of room (full disk, quota or file-size limit); its temporary is removed, so
    nothing was written under the output's name."""

    def __init__(self, path: Path, cause: str, existed: bool):
        self.cause = cause
        left = f"{path} is left as it was" if existed else "nothing was written under that name"
        super().__init__(f"cannot write {path}: {cause}; {left}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writer's process is gone; a folder such a writer had
    moved aside and not replaced yet (it was killed between the two renames) goes back to ``path``.
    ``atomic_path`` does it first; a reader that resumes from ``path`` calls it before looking."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.(partial|old)")
    for stale in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(stale.name)
        if not match or _alive(int(match.group(1))):
            continue
        with suppress(FileNotFoundError):  # another writer of path may be sweeping it too
            if match.group(2) == "old" and not path.exists() and (stale / path.name).exists():
                (stale / path.name).rename(path)
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def _exhausted(tmp: Path) -> int | None:
    """EFBIG when a file under ``tmp`` reached this process's file-size limit (RLIMIT_FSIZE), ENOSPC
    when ``tmp``'s file system has no free block, else None."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    files = [p for p in (tmp.rglob("*") if tmp.is_dir() else [tmp]) if p.is_file()]
    if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in files):
        return errno.EFBIG
    return errno.ENOSPC if os.statvfs(tmp).f_bavail == 0 else None


def _space_cause(err: Exception, tmp: Path) -> str | None:
    """Why ``err`` is a write that ran out of room, or None when it is something else. Writers say it
    three ways: an OSError with its errno (Python's files); the OS error in the message as Rust
    formats it, "... (os error 28)" (safetensors' SafetensorError, the tokenizers library's plain
    Exception); or a short write, an OSError without errno (numpy's ``tofile``, which gguf-py writes
    tensors with), where the file system says whether it is full or a file reached the size limit."""
    if isinstance(err, WriteError):  # a nested atomic_path said so for its own path
        return err.cause
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (match := _RUST_OS_ERROR.search(str(err))):
        code = int(match.group(1))
    if code is None and isinstance(err, OSError) and tmp.exists():
        code = _exhausted(tmp)
    return SPACE_ERRORS.get(code)


@contextmanager
def atomic_path(path: Path, directory: bool = False, named: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into (an empty file, or a folder with
    ``directory``), renamed over ``path`` when the block ends and removed if it raises. A folder
    that already exists at ``path`` is replaced whole (moved aside, then deleted). Files and
    folders written into a temporary folder get the default modes too, whoever created them.

    ``named`` yields ``TMP/NAME`` inside a temporary folder instead, not yet created, for a writer
    that checks the name (``write_checkpoint`` wants ``.elastiq``): what the block writes there can
    be read back (and completed) before it is renamed to ``path``. Stale temporaries of ``path`` are
    removed first; running out of room raises ``WriteError`` (the module's docstring says more)."""
    path = Path(path)
    folder, prefix, umask = directory or named, f".{path.name}.{os.getpid()}.", _umask()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep(path)
        existed = path.exists()
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".partial"))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".partial")
            tmp = Path(name)
    except OSError as err:  # a disk too full for even an empty temporary
        if err.errno in SPACE_ERRORS:
            raise WriteError(path, SPACE_ERRORS[err.errno], path.exists()) from err
        raise
    target, old = tmp / path.name if named else tmp, None
    try:
        if folder:
            os.chmod(tmp, 0o777 & ~umask)
        else:
            try:
                os.fchmod(fd, 0o666 & ~umask)
            finally:
                os.close(fd)
        yield target
        if folder:  # what the block wrote (safetensors writes owner-only files) gets the same modes
            for inner in tmp.rglob("*"):
                os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~umask)
        if folder and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".old"))
            path.rename(old / path.name)
            target.rename(path)
        else:
            os.replace(target, path)
        if named:
            tmp.rmdir()
    except BaseException as err:
        cause = _space_cause(err, tmp) if isinstance(err, Exception) else None
        if old is not None and not path.exists():  # stopped between the two renames: the old folder goes back
            (old / path.name).rename(path)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if cause:
            raise WriteError(path, cause, existed) from err
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def resumable_path(path: Path, folder: Path) -> Iterator[Path]:
    """``folder / NAME``, for a writer whose work outlives a stop (it resumes from what it finds
    there), moved over ``path`` when the block ends: what ``atomic_path(named=True)`` gives, except
    that the block's files are kept when it raises. Running out of room raises ``WriteError`` naming
    ``path``, as ``atomic_path`` does."""
    path = Path(path)
    existed, staged = path.exists(), Path(folder) / path.name
    try:
        yield staged
    except Exception as err:
        cause = _space_cause(err, staged)
        if cause:
            raise WriteError(path, cause, existed) from err
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(staged, path)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (the rename is atomic on one file system)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
