"""The greyd under test: one daemon on a temporary appliance root.

Owns: finding the `greyd` command that belongs to this interpreter, writing
its config (etc/greyd.toml, listening on a free loopback port; a [tls] table
when it is to offer STARTTLS; [database] path, or url for PostgreSQL), starting and
stopping it, its server.workers setting, the CPU time and RSS of the daemon
and its workers, and the problems it logged. Must not: send it load, or
import greyd (the daemon is measured as a separate process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

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

    def command(self, *args: str) -> list[str]:
        return greyd_command() + ["-c", str(self.config), *args]

    def start(self) -> None:
        self.proc = self.procs.start(self.command("start", "--foreground"), self.log,
                                     cwd=self.root)
        wait_banner(self.port, self.proc, self.log, "greyd")

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
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

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
        if self.proc is not None:
            self.procs.stop(self.proc, grace=40.0)
            self.proc = None
