"""The real `greyd` command in a subprocess, and what a test sees of it in /proc.

`greyd(...)` runs one command to completion; `Foreground` is `greyd start
--foreground`, stopped with SIGTERM at the end; `config_for` writes the
config such a daemon reads (conftest's base config, a port of its own and
the short DELAY). `threads` and `descriptors` count what the daemon holds.
This is a helper module, not a test module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import write_config

GREYD = shutil.which("greyd", path=os.path.dirname(sys.executable)) or "greyd"
ROOT = os.geteuid() == 0
# As root, drop the capabilities that would hide permission errors.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-net_bind_service", "--"]
DELAY = 3   # seconds: short, yet long enough that an early retry is early on a busy machine
BASE_THREADS = 4   # an idle daemon: main, log and store writers, the listener's reactor


def greyd(*args: str, config: Path | None = None, prefix: list[str] = (), **kwargs):
    """Run `greyd [-c config] args...` to completion."""
    command = [*prefix, GREYD, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, **kwargs)


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
    """Return once greyd greets a connection on (host, port); raise after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.settimeout(2)
                assert sock.recv(100).startswith(b"220 ")
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Foreground:
    """`greyd start --foreground` in a subprocess, stopped with SIGTERM at the end.

    `prefix` runs it under another command (UNPRIVILEGED, chrt ...); what it
    wrote to standard error is `stderr` once stopped.
    """

    def __init__(self, config: Path, *extra: str, prefix: list[str] = ()):
        # A file, not a pipe: a chatty daemon must never block on a full pipe.
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([*prefix, GREYD, "-c", str(config), "start", "--foreground",
                                      *extra],
                                     stdout=subprocess.DEVNULL, stderr=self._log, text=True)
        self.stderr = ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.seek(0)
        self.stderr = self._log.read()
        return self.proc.returncode

    def __enter__(self) -> "Foreground":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def config_for(tmp_path: Path, upstream_port: int, port: int, **overrides) -> Path:
    """conftest's config listening on 127.0.0.1:`port`, with the greylisting DELAY."""
    overrides.setdefault("greylist", {})
    overrides["greylist"] = {"delay": DELAY, **overrides["greylist"]}
    overrides["server"] = {"listen": [f"127.0.0.1:{port}"], **overrides.get("server", {})}
    return write_config(tmp_path, upstream_port, **overrides)


# -- /proc ---------------------------------------------------------------------------------

def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def descriptors(pid: int, database: str) -> dict[str, int]:
    """The process's open descriptors by kind: sockets, database files, the rest."""
    kinds = {"socket": 0, "database": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:              # closed while we looked
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith(database):
            kinds["database"] += 1
        else:
            kinds["other"] += 1
    return kinds


# -- SQLite ---------------------------------------------------------------------------------

def take_backup(db: Path, backup: Path) -> None:
    """A consistent copy of the SQLite database `db` at `backup` (SQLite's backup API)."""
    source, target = sqlite3.connect(db), sqlite3.connect(backup)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
