"""The greyd under test: one daemon on a temporary appliance root.

Owns: finding the `greyd` command that belongs to this interpreter, writing
its config (etc/greyd.toml, listening on a free loopback port; a [tls] table
when it is to offer STARTTLS; [database] path, or url for PostgreSQL), starting and
stopping it, its server.workers setting, the CPU time (user, system),
context switches and RSS of the daemon and its workers, and the problems
it logged. Must not: send it load, or
import greyd (the daemon is measured as a separate process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from bench.client import DOMAIN
from bench.processes import HOST, BenchError, Processes, free_port, wait_banner
from bench.certificate import Certificate


def greyd_command() -> list[str]:
    """The greyd that belongs to this interpreter: its venv's script, else PATH."""
    beside = Path(sys.executable).with_name("greyd")
    if beside.exists():
        return [str(beside)]
    if shutil.which("greyd"):
        return [shutil.which("greyd")]
    return [sys.executable, "-c", "import sys; from greyd.cli import main; "
            "sys.argv[0] = 'greyd'; main()"]


def workers_value(text: str) -> int | str:
    """The --workers option: "auto" or a positive number."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError('"auto" or a positive number')
    return int(text)


def toml_value(value) -> str:
    return json.dumps(value)        # strings, numbers, booleans and lists of them


class Usage(NamedTuple):
    """What greyd has used: CPU seconds in user and in system mode, and
    context switches, voluntary (a thread waited: for its client, a lock, the
    GIL) and involuntary (the scheduler took the CPU from a thread that could
    have gone on). A difference of two is what a run cost."""

    user: float
    system: float
    voluntary: int
    involuntary: int

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(*(mine - theirs for mine, theirs in zip(self, other)))

    @property
    def cpu(self) -> float:
        return self.user + self.system


class Switches:
    """The context switches of every thread of greyd's processes, ended threads
    included. Linux counts them per thread (/proc/PID/task/TID/status) and
    drops a thread's count when it exits, so a thread of the benchmark looks
    every POLL seconds and keeps each thread's last count. A session thread
    (greyd.reactor's crew) lingers after its session but those beyond the
    ones kept waiting leave at once: what such a thread did since the last
    look (at most POLL seconds' worth) is missed, so the figure errs low,
    never high. The sessions the reactor serves to their end take no thread
    of their own."""

    POLL = 0.2

    def __init__(self, pids: Callable[[], list[int]]):
        self.pids = pids
        self._last: dict[int, tuple[int, int]] = {}     # thread id: its last count
        self._ended = (0, 0)            # counts of threads whose ids came back for new ones
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="switches", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def total(self) -> tuple[int, int]:
        """(voluntary, involuntary) switches of all threads so far."""
        with self._lock:
            self._look()
            counts = list(self._last.values()) + [self._ended]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL):
            with self._lock:
                self._look()

    def _look(self) -> None:
        for pid in self.pids():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                counts = _switches(f"/proc/{pid}/task/{tid}/status")
                if counts is None:
                    continue
                last = self._last.get(int(tid))
                if last is not None and (counts[0] < last[0] or counts[1] < last[1]):
                    self._ended = (self._ended[0] + last[0], self._ended[1] + last[1])
                self._last[int(tid)] = counts


def _switches(status: str) -> tuple[int, int] | None:
    """A thread's (voluntary, involuntary) context switches; None once it is gone."""
    voluntary = involuntary = None
    try:
        with open(status) as lines:
            for line in lines:
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary = int(line.split()[1])
    except (OSError, ValueError):
        return None
    if voluntary is None or involuntary is None:
        return None
    return voluntary, involuntary


class Greyd:
    """One greyd daemon on a temporary appliance root: etc/greyd.toml, var/; its
    store the SQLite file `database` (default var/greyd.db) or PostgreSQL at `url`."""

    def __init__(self, root: Path, procs: Processes, *, upstream: int, trusted: bool,
                 workers: int | str, domains: tuple[str, ...] = (DOMAIN,),
                 database: Path | None = None, url: str | None = None,
                 tls: Certificate | None = None):
        self.root, self.procs = root, procs
        self.port = free_port()
        self.config = root / "etc" / "greyd.toml"
        self.log = root / "var" / "log" / "greyd.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.database = database or root / "var" / "greyd.db"
        sections = {
            "server": {"listen": [f"{HOST}:{self.port}"], "hostname": "greyd.bench.test",
                       "max_connections": 4000, "max_connections_per_client": 4000,
                       "pidfile": "var/greyd.pid", "workers": workers},
            "upstream": {"host": HOST, "port": upstream, "timeout": "30s"},
            "relay": {"domains": list(domains), "clients": ["127.0.0.0/8"] if trusted else []},
            "dns": {"enabled": False},
            # With --foreground greyd logs to stderr; "" keeps it from logging twice.
            # stderr goes to var/log/greyd.log: one log file, at info, as in production.
            "log": {"file": "", "level": "info"},
            "database": {"url": url} if url else {"path": str(self.database)},
        }
        if tls is not None:         # STARTTLS offered (SPEC §10 [tls])
            sections["tls"] = {"cert": str(tls.cert), "key": str(tls.key)}
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
            for name, keys in sections.items()))
        self.proc: subprocess.Popen | None = None
        self.switches = Switches(self.pids)

    def command(self, *args: str) -> list[str]:
        return greyd_command() + ["-c", str(self.config), *args]

    def start(self) -> None:
        self.proc = self.procs.start(self.command("start", "--foreground"), self.log,
                                     cwd=self.root)
        wait_banner(self.port, self.proc, self.log, "greyd")
        self.switches.start()

    @property
    def pid(self) -> int:
        pidfile = self.root / "var" / "greyd.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self.proc.pid

    def pids(self) -> list[int]:
        """The daemon and its workers (server.workers > 1: the master's children)."""
        master = self.pid
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            children = []
        return [master, *map(int, children)]

    def cpu_seconds(self) -> float:
        """User and system CPU time of the daemon and its workers so far (/proc/PID/stat)."""
        return sum(self._cpu_times())

    def usage(self) -> Usage:
        """What the daemon and its workers have used so far: CPU time in user and
        system mode (/proc/PID/stat: every thread, ended ones included) and
        context switches (`Switches`)."""
        return Usage(*self._cpu_times(), *self.switches.total())

    def _cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the daemon and its workers so far."""
        user = system = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            user, system = user + int(fields[11]), system + int(fields[12])
        tick = os.sysconf("SC_CLK_TCK")
        return user / tick, system / tick

    def rss_kib(self) -> int:
        """VmRSS of the daemon and its workers, summed (pages shared since the fork
        count once per process: an overstatement, never an understatement)."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            else:
                raise BenchError(f"no VmRSS in /proc/{pid}/status")
        return total

    def problems(self) -> Counter:
        """Error and warning lines greyd logged, without their time stamps, counted;
        and exception lines of tracebacks."""
        found: Counter = Counter()
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                _, level, rest = line.partition(": ERROR ") if ": ERROR " in line \
                    else line.partition(": WARNING ")
                if level:
                    found[level.strip(": ") + " " + rest] += 1
                elif line and not line[0].isspace() and ("Error" in line or "Exception" in line) \
                        and not line[:4].isdigit():
                    found[line] += 1
        return found

    def stop(self) -> None:
        self.switches.stop()
        if self.proc is not None:
            self.procs.stop(self.proc, grace=40.0)
            self.proc = None
