"""A run dir has one owner, and a finished or checkpointed run is never overwritten by a new one.

The owner holds an advisory lock (flock on RUN_DIR/.prefopt.lock) for the whole run: `prefopt train`
takes it before writing anything and keeps it until its workers (torchrun ranks are its children) are
done; an sbatch job's rank 0 takes it itself (PREFOPT_RUN_DIR_LOCK tells children that a parent holds
it). The kernel drops an flock when its holder dies, so a lock left by a killed run is never stale: the
next run takes it at once. The lock file records who holds it, for the message a second run gets.

A rank outlives its launcher for as long as it takes the kernel to end it (prefopt/core/proctree.py), and on a
system without a parent-death signal it could run on: so every rank of a launch holds a shared lock on
RUN_DIR/.prefopt.ranks.lock for its whole life, and `prefopt train` takes the run dir only once that lock is
free (waiting a few seconds for dying ranks), so a resumed run never writes beside the ranks of the last one.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from prefopt.core import proctree
from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import open_no_follow
from prefopt.core.runfiles import (
    CHECKPOINTS,
    HYDRA_DIR,
    LOCK_FILE,
    RANKS_FILE,
    RANKS_LOCK_FILE,
    RUN_FILES,
    WANDB_DIR,
    checkpoint_dirs,
)

RANKS_GONE_WAIT_S = 10.0  # how long a new owner waits for the ranks of an ended launch to be gone
PROBE_GRACE_S = 1.0  # how long acquire retries a lock held for an instant by a probe (lock_is_held), not an owner
LOCK_ENV = "PREFOPT_RUN_DIR_LOCK"  # set for child processes: this run dir's lock is held by a parent

_held: dict[Path, int] = {}  # run dir -> open lock file descriptor (this process's)
_rank_locks: dict[Path, int] = {}  # run dir -> this rank's shared lock on its ranks lock file, held until exit


class RunDirBusyError(ConfigError):
    """Another live process owns the run dir."""


def acquire(run_dir: Path, wait_for_ranks: bool = True) -> None:
    """Take the run dir's lock for this process (idempotent), or fail at once naming the holder. wait_for_ranks: also
    wait (bounded) until no rank of an earlier launch lives (off for a job's own rank 0, whose peers hold it)."""
    run_dir = run_dir.resolve()
    if run_dir in _held or os.environ.get(LOCK_ENV) == str(run_dir):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = open_no_follow(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # a planted link is refused, never written through
    if not take_lock(fd, fcntl.LOCK_EX, PROBE_GRACE_S):
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirBusyError(
            f"run dir {run_dir} is in use by another prefopt run ({describe(holder)}); wait for it to "
            f"finish, or give this run another dir (hydra.run.dir=...)"
        ) from None
    if wait_for_ranks and not ranks_gone(run_dir, RANKS_GONE_WAIT_S):
        os.close(fd)
        raise RunDirBusyError(
            f"run dir {run_dir} still has live ranks of an earlier launch ({describe_ranks(run_dir)}) "
            f"{RANKS_GONE_WAIT_S:.0f} s after it ended; end them (kill PID) and run again"
        ) from None
    info = json.dumps(
        {
            "pid": os.getpid(),
            "host": proctree.host_name(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)
    _held[run_dir] = fd
    os.environ[LOCK_ENV] = str(run_dir)  # torchrun workers and other children inherit it


def take_lock(fd: int, operation: int, timeout_s: float) -> bool:
    """flock(fd, operation) without blocking, tried again for up to timeout_s: whether it was taken."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process owns the run dir (`prefopt report`: the job is running). Probed with a shared lock taken
    without blocking and dropped at once: probes never hold each other off (a probe of a probe would read as a live
    owner), and the kernel drops a killed owner's lock, so a killed job reads as not running. An owner's acquire that
    meets a probe's lock tries again for PROBE_GRACE_S instead of failing. Opened read-only and never created: a
    probe leaves a job dir as it found it."""
    try:
        fd = open_no_follow(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except (OSError, ConfigError):  # no lock file: never owned; a planted link: not a prefopt lock
        return False
    try:
        return not take_lock(fd, fcntl.LOCK_SH, 0.0)
    finally:
        os.close(fd)


def release(run_dir: Path) -> None:
    run_dir = run_dir.resolve()
    fd = _held.pop(run_dir, None)
    if fd is not None:
        os.close(fd)  # closing drops the flock
        if os.environ.get(LOCK_ENV) == str(run_dir):
            del os.environ[LOCK_ENV]


def ranks_gone(run_dir: Path, timeout_s: float) -> bool:
    """Wait (bounded) until no process holds the run dir's ranks lock."""
    fd = open_no_follow(run_dir / RANKS_LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        return take_lock(fd, fcntl.LOCK_EX, timeout_s)  # exclusive: the ranks hold it shared
    finally:
        os.close(fd)


def hold_for_rank(run_dir: Path) -> None:
    """This rank holds the run dir's ranks lock (shared with its peers) until it exits."""
    run_dir = run_dir.resolve()
    if run_dir in _rank_locks:
        return
    fd = open_no_follow(run_dir / RANKS_LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a new owner checks that no earlier rank lives
    _rank_locks[run_dir] = fd


def describe_ranks(run_dir: Path) -> str:
    """The ranks of the dir's last launch, from its ranks.json (prefopt/core/distributed.py records them)."""
    try:
        ranks = json.loads((run_dir / RANKS_FILE).read_text()).get("ranks", [])
        return (
            ", ".join(f"rank {rank['rank']}: pid {rank['pid']} on {rank['host']}" for rank in ranks) or "pids unknown"
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "pids unknown"


def describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


LINK_CHECKED_DIRS = (CHECKPOINTS, WANDB_DIR, HYDRA_DIR)  # subdirs whose entries are checked too (one level)


def outside_links(run_dir: Path) -> list[tuple[Path, str]]:
    """(link, where it points) for every symbolic link in the run dir (its entries, and those of LINK_CHECKED_DIRS)
    that points outside it, dangling ones included: a write through one would change a file that is not the run's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    root = run_dir.resolve()
    found = []
    for directory in [run_dir, *(run_dir / name for name in LINK_CHECKED_DIRS)]:
        try:
            entries = list(os.scandir(directory)) if directory == run_dir or not directory.is_symlink() else []
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if target != root and root not in target.parents:
                    found.append((Path(entry.path), os.readlink(entry.path)))
    return found


def refuse_outside_links(run_dir: Path) -> None:
    """One line naming a link in the run dir that points out of it (nothing is written through one)."""
    links = outside_links(run_dir)
    if links:
        link, target = links[0]
        more = (
            f" (and {len(links) - 1} more: {', '.join(str(path.name) for path, _ in links[1:])})"
            if len(links) > 1
            else ""
        )
        raise ConfigError(
            f"{link} is a symbolic link to {target}, outside the run dir{more}: prefopt writes there and does not "
            f"write through links; remove it (or use another run dir); nothing was written"
        )


def existing_run(run_dir: Path) -> Optional[str]:
    """What in run_dir shows a run already lives there, or None."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    checkpoints = checkpoint_dirs(run_dir / CHECKPOINTS)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s)")
    return ", ".join(found) or None


def refuse_reuse(run_dir: Path, resuming: bool) -> None:
    """A fresh run may not start in a dir that holds another run: nothing of it is deleted."""
    if resuming:
        return
    found = existing_run(run_dir)
    if found:
        raise ConfigError(
            f"run dir {run_dir} already holds a run ({found}). Continue it with trainer.resume=true, or start "
            f"fresh in a new dir (leave hydra.run.dir out for a new timestamped one); nothing was deleted"
        )
