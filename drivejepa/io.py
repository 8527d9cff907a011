"""Atomic file output: every file appears whole or not at all (write to a temporary name, fsync, rename).

Temporary names carry the writing host and process (``.<name>.<host>-<pid>.<random>.tmp``), so a cleanup removes
only what a dead process left behind, never the file a concurrent job is writing (:func:`remove_stale_temps`).
An OS error while writing (a full disk, a read-only directory) is re-raised naming the final path."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

# A temporary file of another host cannot be checked for a live writer; it is stale after this long.
FOREIGN_TEMP_SECONDS = 24 * 3600


def _default_mode() -> int:
    """0666 less the process umask: what ``open()`` would give (mkstemp's 0600 would hide outputs from others)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def named_os_error(exc: OSError, path: str | Path) -> OSError:
    """``exc`` with ``path`` as its file name when it names none (``write`` on a full disk does not)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Use it for writers that want a file name (``torch.save``, ``np.save``, image writers)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise named_os_error(exc, path.parent) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _default_mode())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise named_os_error(exc, path) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` whose writer is gone: a process of this host
    that no longer runs, or (other hosts) a file untouched for a day. Returns what was removed."""
    removed = []
    host = _host()
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")
        owner = parts[-3] if len(parts) >= 4 else ""
        owner_host, _, pid = owner.rpartition("-")
        try:
            if owner_host == host and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - tmp.stat().st_mtime > FOREIGN_TEMP_SECONDS
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            continue
    return removed


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path`` (created), held for the ``with`` block. It serialises
    jobs that update one file (the shard manifest) on one host or on a shared file system that supports flock."""
    path = Path(path)
    try:
        fh = open(path, "a+")
    except OSError as exc:
        raise named_os_error(exc, path) from exc
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def is_resource_error(exc: BaseException) -> bool:
    """An OS error about the storage or permissions (full disk, quota, read-only, denied), which no retry or skip of
    one item fixes: the job must stop and say so."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (provenance of checkpoints and decoders)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
