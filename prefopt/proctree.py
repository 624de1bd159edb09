"""A launch's processes end with it: torchrun and every rank die with the `prefopt train` that started them.

`kill PID`, SIGHUP from a closed terminal, `kill -9` of its process group, `timeout`, systemd and container
runtimes end the parent only; torchrun and its ranks live in sessions of their own and would run on, beside
the next run in the same dir. So (Linux):
- torchrun starts with the parent-death signal SIGKILL (prctl PR_SET_PDEATHSIG, kept across exec), and each
  rank sets it for itself at start-up: the kernel ends torchrun when the parent dies and each rank when
  torchrun does, whatever killed them;
- a rank that starts after its launcher already died (the window before prctl) sees that its parent's parent
  is no longer the launcher (PREFOPT_LAUNCHER_PID) and exits;
- the parent ends what is left (the descendants of torchrun, found in /proc) when it stops on purpose.
Every rank also holds a shared lock on the run dir (rundir.hold_for_rank), so a new run there waits until the
last rank of an earlier one is gone (prefopt/rundir.py).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections import defaultdict
from typing import Callable, Optional

LAUNCHER_ENV = "PREFOPT_LAUNCHER_PID"  # set for torchrun's ranks: the `prefopt train` process they belong to
PR_SET_PDEATHSIG = 1


def _prctl() -> Optional[Callable]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent_preexec() -> Optional[Callable[[], None]]:
    """A Popen preexec_fn: the child gets SIGKILL when this process dies (and exits at once if it already has).
    None where the kernel offers no parent-death signal."""
    prctl, parent = _prctl(), os.getpid()  # looked up before the fork: the child only calls it
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def follow_launcher() -> None:
    """In a rank started by `prefopt train` (through torchrun): die with torchrun, and exit now if the launcher is
    already gone. Elsewhere (srun tasks, a worker started by hand) nothing changes."""
    launcher = os.environ.get(LAUNCHER_ENV)
    prctl = _prctl()
    if not launcher or prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_of(os.getppid()) != int(launcher):  # torchrun died, or its parent did: this launch is over
        os._exit(1)


def parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> str:
    """The process's command line, words joined by spaces ('' when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def catches(pid: int, signum: int) -> bool:
    """The process has a handler for signum (its SigCgt mask in /proc): a rank in the training loop catches SIGTERM."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            mask = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return bool(mask >> (int(signum) - 1) & 1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return False
    except (OSError, IndexError):
        pass
    try:  # no /proc: signal 0 only says the pid exists
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first), from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        parent = parent_of(int(name))
        if parent is not None:
            children[parent].append(int(name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (bounded) until none of pids is alive; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if alive(pid)]
    return left


def kill_tree(process) -> None:
    """SIGKILL a Popen'd launcher (torchrun) and everything below it, and wait until they are gone."""
    below = descendants(process.pid)
    signal_all([process.pid, *below], signal.SIGKILL)
    process.wait()
    wait_gone(below, 10.0)
