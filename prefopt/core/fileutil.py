"""Atomic writes and locks: nothing prefopt writes is ever left half-written."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from prefopt.core.errors import ConfigError

TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .NAME.HOST-PID.XXXXXXXX.tmp next to NAME
HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporary files of writes killed mid-way (atomic_write's .NAME.HOST-PID.XXXXXXXX.tmp) in `directory`.
    A writer holds an exclusive flock on its temp until the rename, so a temp whose lock can be taken has no live
    writer. Unlike a pid check this holds for writers on other hosts or in other pid namespaces (containers sharing a
    host name) and for a pid reused since. name: only the temps of this file name (atomic_write cleans its target's)."""
    removed = []
    for path in Path(directory).glob(f".{glob.escape(name) if name != '*' else name}.*{TEMP_SUFFIX}"):
        if TEMP_PATTERN.match(path.name) and remove_if_unlocked(path):
            removed.append(path)
    return removed


def remove_if_unlocked(path: Path) -> bool:
    """Unlink `path` if no process holds a lock on it; True when removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone already, a link, or not ours to read
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # still the file we locked: its writer may have renamed it onto its target meanwhile (then the name is gone)
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        os.unlink(path)
        return True
    except (BlockingIOError, FileNotFoundError):  # a live writer's, or renamed into place
        return False
    finally:
        os.close(fd)


def locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file next to `path`, exclusively flocked, so clean_stale_temps never takes it for a killed write's.
    A cleaner may lock and unlink it between creation and our lock: then make another."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{HOST}-{os.getpid()}.", suffix=TEMP_SUFFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target.

    mkstemp creates the file 0600; it gets the mode a plain open() would give (mode, 0666 unless an executable's
    0777, less the umask), so whoever may read the run dir's other files may read these too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)  # an earlier write of this file that was killed (a full-size cache entry)
    fd, tmp = locked_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:  # closing it (after the rename) drops the lock
            os.fchmod(handle.fileno(), mode & ~current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    """os.umask can only be read by setting it: set it back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(
        path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )  # strict JSON: no bare NaN


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """An flock on a side file, so two processes never build the same cache entry at once."""
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    fd = open_no_follow(lock_path, os.O_RDWR | os.O_CREAT)  # never truncated, never a link's target
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link (a planted one would redirect the write) with a ValueError naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LinkRefused(
                f"{path} is a symbolic link{link_target(path)}: prefopt does not write through links; remove it"
            ) from None
        raise


def link_target(path: str | os.PathLike) -> str:
    """Where a refused link points, for the message. ELOOP also comes from a link loop in a parent dir, where path
    itself is no link and readlink fails (EINVAL): then say that instead."""
    try:
        return f" to {os.readlink(path)}"
    except OSError:
        return " (or a link loop in its parent dirs)"


class LinkRefused(ConfigError):
    """A write would go through a symbolic link: shown as one line, like every user error."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks (weights and data files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike) -> str:
    """What must be unchanged for a file's remembered digest (file_digests) or `datasets`' Arrow copy of it to
    hold. Size and mtime alone are not enough: an edit that keeps the size, followed by `touch -r`, `cp -p` or
    `rsync -a` from a copy, restores both. The inode change time (ctime) cannot be set from user space (every
    write, chmod or utime sets it to now) and the inode number changes when a file is replaced (rsync renames a
    new file into place), so a file whose inode, size, mtime and ctime all match has not been written since it
    was hashed. (The device number is left out: one NFS file shows different ones on different nodes.)"""
    info = os.stat(path)
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def file_digests(paths: list[Path], memo_path: Path) -> str:
    """One digest of the files' contents. Each file is hashed again unless its identity (file_identity) is the
    one remembered in memo_path with its digest, so a sweep of many runs reads no file twice and an edited file
    is never taken for the old one. Used for model weights (the reference cache) and data files (the
    tokenized-pairs cache). The memo is kept where it can be written, else only used."""
    memo = {}
    if memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except ValueError:
            memo = {}
    combined = hashlib.sha256()
    changed = False
    for path in sorted(paths):
        identity = file_identity(path)
        entry = memo.get(os.path.abspath(path))
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            entry = {"identity": identity, "sha256": file_digest(path)}
            memo[os.path.abspath(path)] = entry
            changed = True
        combined.update(f"{path.name}:{entry['sha256']}|".encode())
    if changed:
        try:
            atomic_write_json(memo_path, memo)
        except OSError as error:  # a read-only cache: the digest is right, only not remembered
            logging.getLogger("prefopt").info(
                "cannot remember the files' digests in %s (%s)", memo_path, error.strerror
            )
    return combined.hexdigest()
