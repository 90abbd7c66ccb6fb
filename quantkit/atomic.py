"""Writing files safely: a reader sees the old file or the new one, never half of one; an
interrupted or failed write leaves what was there before; only a regular file is ever replaced."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError


def os_error(exc: OSError, path: str | Path | None = None) -> QuantkitError:
    """One line for a failed file operation: what, where and why."""
    where = path if path is not None else (exc.filename or "")
    reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else (
        exc.strerror or type(exc).__name__)
    return QuantkitError(f"cannot write {where}: {reason}")


def write_error(exc: Exception, path: str | Path) -> QuantkitError:
    """One line for any failed write (safetensors reports an OS error in its own exception)."""
    if isinstance(exc, OSError):
        return os_error(exc, path)
    text = str(exc)
    full = any(s in text for s in ("StorageFull", "FileTooLarge", "No space left", "File too large",
                                   "failed writing"))
    return QuantkitError(f"cannot write {path}: " + ("no space left on device" if full else
                                                     (text.splitlines()[0][:200] if text else type(exc).__name__)))


@contextmanager
def sole_writer(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` for one writer (a lock on the folder itself, so no file is left behind;
    released when the process ends, however): a second run there would clear the first's scratch
    files and mix the two runs' results."""
    fd = os.open(folder, os.O_RDONLY)  # not inherited by the workers the run starts
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another {what} is writing to {folder}: wait for it to end, or choose another "
                                "folder") from None
        except OSError:  # a file system without locks: run unguarded, as before
            pass
        yield
    finally:
        os.close(fd)


@contextmanager
def held(lock_file: Path) -> Iterator[bool]:
    """``lock_file`` (created) locked for this process, waiting for any other holder -> whether it
    is locked (False on a file system without locks). The system releases it when the holder ends,
    however it ends, so a killed process never blocks the next."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)


@contextmanager
def cache_writer(folder: Path) -> Iterator[None]:
    """One writer at a time into the cache ``folder``, of all threads and processes. Its writers
    write under hidden temporary names, so those found here are a killed writer's (a gigabyte for
    full-size weights): removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with held(folder / "write.lock") as locked:
        for leftover in folder.glob(".*") if locked else ():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        yield


def check_writable_target(path: str | Path) -> None:
    """Refuse now, before slow work, a target that can never be written: a directory, a path
    under a file, or a folder this user cannot write into."""
    path = Path(path)
    if path.is_dir():
        raise QuantkitError(f"cannot write {path}: it is a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QuantkitError(f"cannot write {path}: {parent} is not a directory")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise QuantkitError(f"cannot write {path}: {parent} is not writable")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (same suffix, so writers that go by it still work) that
    replaces ``path`` when the block ends without error and is removed otherwise. A path that
    exists but is no regular file (a device, a pipe) is written in place, never replaced."""
    path = Path(path)
    check_writable_target(path)
    if path.is_symlink():
        path = path.resolve()  # write what the link points to; the link stays
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        try:
            yield path
        except OSError as exc:
            raise os_error(exc, path) from None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise stick to the final file
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
