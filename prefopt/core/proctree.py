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
last rank of an earlier one is gone (prefopt/core/rundir.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from typing import Callable, Optional

from prefopt.core.fileutil import process_alive

LAUNCHER_ENV = "PREFOPT_LAUNCHER_PID"  # set for torchrun's ranks: the `prefopt train` process they belong to
LAUNCH_ID_ENV = "PREFOPT_LAUNCH_ID"  # set for torchrun's ranks: a nonce naming this launch (runfiles.EXIT_REPORT)
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
    None where the kernel offers no parent-death signal.

    preexec_fn runs between fork and exec, which is unsafe when this process has threads (a lock another thread
    held at the fork stays held in the child). It is kept because nothing else sets PR_SET_PDEATHSIG on the child
    before it runs (Popen has no option for it, and torchrun is not ours to change), and kept minimal for that: one
    foreign call (prctl, looked up before the fork) and getppid, no Python allocation, import or lock."""
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
    launcher = os.environ.get(LAUNCHER_ENV, "")
    prctl = _prctl()
    if not launcher.isdigit() or prctl is None:  # unset, or not a pid (set by hand): not a rank of `prefopt train`
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


def running(pid: int) -> bool:
    """The process exists (fileutil.process_alive) and is not a zombie: a dead process that its parent has not
    reaped yet (a container's pid 1 may never reap the ranks it inherits) is gone for every purpose here."""
    return process_alive(pid) and state(pid) not in ("Z", "X")


def state(pid: int) -> Optional[str]:
    """The process's state letter in /proc (R, S, Z...); None when it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def processes() -> list[int]:
    """Every pid in /proc ([] where there is none)."""
    try:
        return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return []


def host_name() -> str:
    """This host's name, as every record of where a process runs says it (run-dir lock, ranks, exit reports, errors)."""
    return socket.gethostname()


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first), from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for child in processes():
        parent = parent_of(child)
        if parent is not None:
            children[parent].append(child)
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
    """Wait (bounded) until none of pids is running; returns those still running."""
    deadline = time.monotonic() + timeout_s
    left = [pid for pid in pids if running(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if running(pid)]
    return left


KILL_WAIT_S = 10.0  # how long SIGKILLed processes may take to be gone (the kernel frees their memory)


def kill_tree(process) -> None:
    """SIGKILL a Popen'd launcher (torchrun) and everything below it, and wait (bounded) until they are gone.
    Nothing once the launcher has been reaped: its pid, and those of its former children, may be another process's
    by now (its ranks die with it: prefopt/core/proctree.py)."""
    if process.poll() is not None:
        return
    below = descendants(process.pid)  # read while the launcher is alive and unreaped: these pids are still its own
    process.kill()  # Popen's own: never signals a pid it has reaped
    signal_all(below, signal.SIGKILL)
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass  # in uninterruptible sleep (a hung file system): nothing more can be done from here
    wait_gone(below, KILL_WAIT_S)
