"""postgrey for the benchmark: Debian's greylisting policy server, a private instance.

Owns: finding postgrey, starting one on a free loopback port with its own
database directory under the bench's temporary directory (no system daemon,
no /var/lib/postgrey), waiting until it answers a policy request, and how to
get it. Must not: configure Postfix, or measure.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

from bench.processes import HOST, START_TIMEOUT, BenchError, Processes, free_port, tool

GET_POSTGREY = ("sudo apt-get install -y postgrey   # the bench runs its own; "
                "no system daemon needs to run")
DELAY = 300                 # seconds, greyd's default greylist.delay too: every session deferred


def postgrey_path() -> str:
    return tool("postgrey")


def run_as() -> tuple[str, str]:
    """The user and group postgrey runs as: the bench's own (its database sits in
    the bench's private temporary directory)."""
    return pwd.getpwuid(os.geteuid()).pw_name, str(os.getegid())


def start_postgrey(procs: Processes, workdir: Path) -> tuple[int, subprocess.Popen]:
    """postgrey on a free loopback port, with Debian's default whitelists and a
    fresh database: (port, process)."""
    if not postgrey_path():
        raise BenchError(f"postgrey not found; get it with:\n  {GET_POSTGREY}")
    dbdir = workdir / "postgrey"
    dbdir.mkdir(parents=True, exist_ok=True)
    user, group = run_as()
    log = workdir / "postgrey.log"
    for _ in range(3):              # a free port can be taken between probe and bind
        port = free_port()
        argv = [postgrey_path(), f"--inet={HOST}:{port}", f"--dbdir={dbdir}",
                f"--pidfile={dbdir / 'postgrey.pid'}", f"--delay={DELAY}",
                f"--user={user}", f"--group={group}", "--listen-queue-size=1024"]
        proc = procs.start(argv, log)
        if wait_policy(port, proc):
            return port, proc
        procs.stop(proc)
        if "in use" not in log.read_text(errors="replace"):
            break
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    raise BenchError("postgrey did not answer on a loopback port"
                     + "".join(f"\n    {line}" for line in tail))


def wait_policy(port: int, proc: subprocess.Popen) -> bool:
    """Wait until postgrey answers one policy request (Postfix's SMTPD_POLICY_README)."""
    request = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
               b"client_address=192.0.2.1\nclient_name=unknown\nhelo_name=probe.bench.test\n"
               b"sender=probe@sender.bench.test\nrecipient=probe@bench.test\n\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                sock.sendall(request)
                if sock.recv(512).startswith(b"action="):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
