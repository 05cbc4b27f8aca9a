"""Detaching from the terminal, and the pidfile.

`detach()` double-forks; the original process waits until the daemon says
it is serving (or why it could not) and exits with 0 or 1 accordingly, so
`greyd start` returns only once greyd is listening.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from pathlib import Path
from typing import Callable, Iterable


class Pidfile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> int | None:
        """The pid of a live greyd named by the pidfile; None if absent or stale."""
        pid = self.read()
        if pid is None or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        return pid if b"greyd" in cmdline else None

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.read() == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass


def alive(pid: int) -> bool:
    """True while the process exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def detach() -> Callable[[str, str], None]:
    """Become a daemon; returns `notify(error, started)`.

    An empty `error` means serving: the original process prints `started`
    and exits 0; otherwise it prints the error and exits 1.
    """
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        status, _, text = message.partition(":")
        if status != "ok":
            print(f"greyd: {message or 'daemon exited during start'}", file=sys.stderr)
            os._exit(1)
        if text:
            print(text)
        sys.stdout.flush()
        os._exit(0)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def notify(error: str, started: str = "") -> None:
        try:
            os.write(write_end, (error or f"ok:{started}").encode())
            os.close(write_end)
        except OSError:
            pass

    return notify


def batch_scheduling() -> bool:
    """Put this process under Linux's SCHED_BATCH scheduling policy; the
    threads and processes it starts afterwards inherit it. False where the
    system has no such policy or refuses it, or where greyd was started
    under a policy other than the default (chrt, systemd's
    CPUSchedulingPolicy=): greyd then runs as it was.

    Under it, a session thread woken by its client's next command waits
    for the running thread's time slice to end instead of preempting it:
    most often that thread is another session of the same process holding
    the GIL, which the woken one would only wait for.
    """
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def lookup_user(name: str) -> pwd.struct_passwd | None:
    """The account to switch to: None unless running as root with a user named.

    Raises KeyError for an unknown user.
    """
    if not name:
        return None
    account = pwd.getpwnam(name)
    return account if os.geteuid() == 0 else None


def drop_privileges(account: pwd.struct_passwd, paths: Iterable[Path]) -> None:
    """Hand `paths` to the account, then become it for good (after binding port 25).

    Directories are handed over only when they are not shared (world-writable
    or sticky, like /tmp), so the daemon can create its -wal/-shm and log
    files without greyd ever taking over a system directory.
    """
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
            continue
        if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
            os.chown(path, account.pw_uid, account.pw_gid)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
