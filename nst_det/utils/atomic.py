"""Atomic file and folder writes: a reader sees the old content or the new, never a half.

Pattern: write to a temporary sibling, flush + fsync, then os.replace() onto the final name (an
atomic rename on POSIX within one file system), then fsync the folder so the rename is durable.

A temporary sibling is named `.<name>.<host>-<pid namespace>.<pid>.<random>.tmp`. An exception
(Ctrl-C included, and SIGTERM once `exit_on_sigterm` is installed) removes it; a process killed
outright cannot, so the next write in that folder removes the temporaries of writers of this host
and pid namespace that are no longer running (and those named `.<name>.<host>.<pid>...` by
earlier versions). Another machine's or container's are left alone: whether their writer still
runs cannot be seen from here. A full disk is reported as `DiskFullError` naming the file
(torch.save would otherwise end on an unrelated "unexpected pos" RuntimeError).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator

from .process import process_running


def _writer_names() -> tuple[str, str]:
    """(this writer's host name and pid namespace, the host name alone) for temporaries' names:
    a writer's pid is checked alive only in its own namespace (containers that share a host
    name, e.g. the host's network, but not their pids took each other's live writers for dead
    ones, and removed their temporaries mid-write). Earlier versions wrote the host alone."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:  # not Linux, or no /proc
        namespace = ""
    return (f"{host}-{namespace}" if namespace else host), host


_HOST, _OLD_HOST = _writer_names()
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the file system is full (ENOSPC) or over quota (EDQUOT)."""


def _disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in `exc`'s chain (torch.save hides it under a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    cause = _disk_full_cause(exc)
    if cause is None:
        return
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    what = "No space left on device" if cause.errno == errno.ENOSPC else "Disk quota exceeded"
    raise DiskFullError(
        cause.errno,
        f"{what} ({errno.errorcode[cause.errno]}) while writing {path} ({free}). Nothing was "
        f"written to {path.name}: its previous version, if any, is intact. Free space on that "
        "file system or write elsewhere (e.g. another OUTPUT_DIR), then run again "
        "(--resume continues a training run)",
    ) from exc


def _temp_prefix(path: Path) -> str:
    """`.<name>.<host>.<pid>.`, the name cut short so that the temporary's whole name (this, 8
    random characters and a suffix of up to 8) stays within NAME_MAX (255 bytes) when `path`'s
    does."""
    tail = f".{_HOST}.{os.getpid()}."
    room = 255 - 1 - len(tail.encode()) - 16
    name = path.name.encode()[:max(1, room)].decode(errors="ignore")
    return f".{name}{tail}"


_OWN_TEMP = re.compile(r"^\..+\.(?:" + "|".join(map(re.escape, dict.fromkeys((_HOST, _OLD_HOST))))
                       + r")\.(\d+)\.[^.]*\.(tmp|old)$")


def _is_temp(name: str) -> bool:
    """A temporary of these writers (`.<name>.<...>.tmp` / `.old`) or of submitit (`*.save_tmp`)."""
    return (name.startswith(".") and name.endswith((".tmp", ".old"))) or name.endswith(".save_tmp")


def remove_stale_temps(folder: str | os.PathLike, *, below: bool = False, exclude=(),
                       any_writer: bool = False) -> list[Path]:
    """Remove the temporaries that interrupted writers left in `folder`; returns what went.

    By default only this host's (and pid namespace's) temporaries whose writer process is gone
    (a live writer's, or another machine's or container's on a shared file system, are left
    alone): safe beside other writers, so
    every write calls it on its own folder. `below`: the sub-folders too, except those in
    `exclude` (and what is below them). `any_writer`: every temporary whoever wrote it,
    submitit's `*.save_tmp` included, for a folder one process owns (a pipeline stage's folder
    when its job starts: an earlier job of the stage, maybe on another node, was killed).
    """
    exclude = {os.path.abspath(e) for e in exclude}
    removed = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(parent, d)) not in exclude]
        for name in [*dirs, *files]:
            if any_writer:
                stale = _is_temp(name)
            else:
                match = _OWN_TEMP.match(name)
                stale = bool(match) and not process_running(int(match.group(1)))
            if not stale:
                continue
            path = Path(parent, name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
        if not below:
            break
    return removed


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in the main thread, as Ctrl-C raises KeyboardInterrupt,
    so `finally` blocks and these writers remove their temporaries before the process ends
    (Python's default SIGTERM action ends the process without running any of them)."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGTERM, handler)


def _umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process umask would restrict it (mkstemp creates files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems don't allow opening folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing (its path is the file's `name`); rename it
    onto `path` on success.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name, so that `f.name` is the path (a reader may check it)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_disk_full(e, path)
        raise


def atomic_link(src: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Make `path` a hard link to the file `src`, atomically; False where links are unsupported.

    Later atomic writes to either name replace that name only (a rename breaks the link).
    """
    path = Path(path)
    tmp = path.parent / f"{_temp_prefix(path)}link.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # e.g. a file system without hard links
        return False
    os.replace(tmp, path)
    with contextlib.suppress(FileNotFoundError):  # path was already src: rename did nothing
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        try:
            yield tmp
        except BaseException as e:
            _raise_if_disk_full(e, path)
            raise
        os.chmod(tmp, _umask_mode(0o777))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old",
                                        dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file_set(folder: str | os.PathLike, marker: str,
                    first: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder inside `folder`; on success move its files into `folder`, the file
    named `first` (if any: e.g. what says whose files these are) first and the one named
    `marker` last. Readers must treat the set as absent while `marker` is absent.

    Before anything moves, the old `marker` is removed, so an interruption at any moment leaves
    either the previous complete set, or files without their marker: never new files under an
    old marker, or an unmarked file that looks finished. Files of the folder not in the new set
    are left alone (the folder may be a user's).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(folder / marker), suffix=".tmp", dir=folder))
    try:
        try:
            yield tmp
        except BaseException as e:
            _raise_if_disk_full(e, folder / marker)
            raise
        if not (tmp / marker).is_file():
            raise FileNotFoundError(f"{marker} was not written: the file set is incomplete")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / marker)
        _fsync_dir(folder)
        for item in sorted(tmp.iterdir(), key=lambda p: (p.name != first, p.name)):
            if item.name != marker:
                os.replace(item, folder / item.name)
        os.replace(tmp / marker, folder / marker)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
