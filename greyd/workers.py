"""server.workers > 1: one master process and its forked workers.

Python runs one thread at a time per process, so one process serves a few
hundred sessions a second however many cores the host has. With workers,
the master binds one listening socket per worker and address (SO_REUSEPORT:
the kernel spreads new connections among them), drops privileges, and forks
the workers; each is an ordinary daemon (`server.Daemon`) of its own, with
its own store connections, sharing the WAL database and the connection
limits (`admission.SharedCounts`) with the others.

The master serves no client. It forwards SIGHUP (reload, log files reopened)
and SIGTERM (graceful stop) to the workers, waits for them to finish, and
replaces a worker that died, clearing its connection counts first. A worker
whose master is gone stops by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from . import log, metrics
from .admission import SharedCounts
from .server import GRACE, Daemon

RESTART_PAUSE = 1.0     # seconds between restarts of the same worker
WATCH = 0.5             # seconds between the master's looks at its workers
CPU_SAMPLE = 0.05       # seconds a one-process greyd watches the CPUs to choose one
STOP_MARGIN = 10.0      # seconds past the grace before workers are killed

logger = logging.getLogger(__name__)


class Workers:
    """The master's view: one Daemon (bound, not started) per worker."""

    def __init__(self, daemons: list[Daemon], counts: SharedCounts,
                 run_worker: Callable[[Daemon], None]):
        self.daemons, self.counts = daemons, counts
        self.run_worker = run_worker          # serves until a stop; runs in the child
        self.pids: dict[int, int] = {}        # pid -> worker number
        self.started: dict[int, float] = {}   # worker number -> last start
        self.missing: set[int] = set()        # workers whose fork failed

    def start(self, number: int) -> None:
        pause = self.started.get(number, 0.0) + RESTART_PAUSE - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self.started[number] = time.monotonic()
        try:
            pid = os.fork()
        except OSError as error:              # EAGAIN, ENOMEM: tried again by `reap`
            self.missing.add(number)
            logger.error("cannot start worker %s", log.fields(worker=number, error=error))
            return
        self.missing.discard(number)
        if pid == 0:                          # the worker
            status = 1
            try:
                self.counts.use(number)
                bind_to_cpu(number)
                for other, daemon in enumerate(self.daemons):
                    if other != number:
                        daemon.close()
                self.run_worker(self.daemons[number])
                status = 0
            except BaseException:             # noqa: B902 - logged, then the worker exits
                logger.exception("worker failed %s", log.fields(worker=number))
            finally:
                logging.shutdown()
                os._exit(status)
        self.pids[pid] = number

    def reap(self, restart: bool) -> None:
        """Collect workers that exited; replace them (and start those that
        could not be forked) unless stopping."""
        if restart:
            for number in sorted(self.missing):
                self.start(number)
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            number = self.pids.pop(pid, None)
            if number is None:
                continue
            self.counts.clear(number)
            metrics.process_gone(pid)
            if restart:
                logger.error("worker exited, restarting it %s", log.fields(
                    worker=number, pid=pid, status=_describe(status)))
                self.start(number)

    def signal(self, signum: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = GRACE) -> None:
        """SIGTERM to every worker; wait for their graceful stop, then kill."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + STOP_MARGIN
        while self.pids and time.monotonic() < deadline:
            self.reap(restart=False)
            time.sleep(0.05)
        if self.pids:
            logger.error("workers did not stop in time, killing them %s",
                              log.fields(pids=",".join(map(str, self.pids))))
            self.signal(signal.SIGKILL)
            while self.pids:
                self.reap(restart=False)
                time.sleep(0.05)


def bind_to_cpu(number: int | None = None) -> int | None:
    """Bind the calling thread, and the threads it starts from now on, to one
    CPU: worker `number` gets the number-th of the CPUs the process may run
    on, round robin; a one-process greyd (None) the one of them least busy
    now (`quietest_cpu`). The CPU, or None where the system refuses (greyd
    then runs anywhere).

    A process's threads take turns holding the GIL anyway: on one CPU, a
    thread woken by its client's next command runs once the thread holding
    the GIL has let it go, rather than waking on another CPU beside it only
    to wait, a hand-off that costs each side a context switch and, on a
    virtual machine, the other CPU's wake-up. The other CPUs stay free for
    the other workers, the MTA, the database and the clients.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[number % len(cpus)] if number is not None else quietest_cpu(cpus)
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        return None
    return cpu


def quietest_cpu(allowed: list[int], sample: float = CPU_SAMPLE) -> int:
    """Of the `allowed` CPUs, the one that was idle longest over the next
    `sample` seconds (/proc/stat), so that a one-process greyd does not bind
    itself beside a process that keeps a CPU busy (one bound there, which the
    scheduler cannot move away); the first of them when that cannot be read."""
    before = _idle_times()
    time.sleep(sample)
    after = _idle_times()
    idle = {cpu: after[cpu] - before[cpu] for cpu in allowed if cpu in before and cpu in after}
    if not idle:
        return allowed[0]
    return max(allowed, key=lambda cpu: idle.get(cpu, -1))


def _idle_times() -> dict[int, int]:
    """Each CPU's idle and I/O-wait time so far, in clock ticks (/proc/stat)."""
    times = {}
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and len(fields) >= 5:
                    times[int(name[3:])] = int(fields[3]) + int(fields[4])
    except (OSError, ValueError):
        return {}
    return times


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def master_alive(master: int) -> bool:
    """False once the master is gone (the worker has been re-parented)."""
    return os.getppid() == master
