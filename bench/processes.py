"""The benchmark's child processes: started, awaited, stopped, all on loopback.

Owns: starting commands in process groups of their own, stopping them (every
one of them at exit), bounded runs of a command, free loopback ports, waiting
for a 220 banner, finding Postfix's tools, and BenchError. Must not: speak
SMTP beyond the banner, measure anything, or listen anywhere but HOST.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 30.0                  # seconds for greyd or a sink to answer its first 220


class BenchError(Exception):
    """A measurement could not be made; the message says why."""


class Processes:
    """The child processes of this run, each in its own process group."""

    def __init__(self):
        self.running: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True, **kwargs)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `grace` seconds."""
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc, grace=5.0)


def run_bounded(argv: list[str], timeout: float, **kwargs) -> tuple[int, str, str, float]:
    """Run a command in its own process group, killed whole after `timeout`:
    (exit status, stdout, stderr, seconds). A timeout is exit status -9."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status, err = -9, err + f"\nkilled after {timeout:.0f} s".encode()
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return (status, out.decode(errors="replace"), err.decode(errors="replace"),
            time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_banner(port: int, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Wait until something on `port` greets with 220; fail with the log's tail."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                if sock.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    raise BenchError(f"{what} did not answer on {HOST}:{port}"
                     + "".join(f"\n    {line}" for line in tail))


def tool(name: str) -> str:
    """The path of a Postfix tool (smtp-source, smtp-sink, postconf), or ""."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin") or ""


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, of its children it has reaped, and of
    its live descendants (/proc): what a forking server such as Postfix's master
    has spent so far, whichever child spent it."""
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))   # utime stime cutime cstime
        pending += map(int, children)
    return total / os.sysconf("SC_CLK_TCK")
