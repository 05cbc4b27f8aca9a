"""A throwaway PostgreSQL server on loopback, for the benchmark and the tests; its faults.

`PgServer` runs Debian's own binaries (`initdb`, `pg_ctl`, `postgres` under
/usr/lib/postgresql/<version>/bin, which Debian keeps off PATH): initdb into a
temporary directory, a superuser `postgres` with the password PASSWORD over
TCP (scram-sha-256) on 127.0.0.1 and a free port; durability off for speed
(the tests) or left at PostgreSQL's defaults (`durable`, the benchmark).
PostgreSQL refuses to run as root, so as root (the CI) it runs as `nobody`
through setpriv, in a directory of its own under /tmp that nobody can reach
(pytest's tmp_path sits under 0700 directories of root's).
It needs psycopg (greyd's `postgresql` extra), never pytest: tests/pgserver.py
hands it to the tests, scripts/bench --store postgresql runs it.
`stop`, `kill` (a crash), `pause` (a hung server: TCP connects, nothing
answers) and `resume` are the faults a test can cause.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.processes import free_port

PASSWORD = "pg-secret-7"
SUPERUSER = "postgres"
TIMEOUT = 30          # seconds for initdb, pg_ctl and waiting on processes
PROGRAMS = ("initdb", "pg_ctl", "postgres")
# postgresql.conf: loopback only; for the tests (not `durable`) durability
# against a machine crash traded for speed (FAST). A server crash (kill) still
# keeps every commit: the WAL is in the page cache. Not so with
# synchronous_commit=off, which would lose the last commits still in shared
# memory, so that one stays on.
SETTINGS = {"listen_addresses": "'127.0.0.1'", "max_connections": "300"}
FAST = {"fsync": "off", "full_page_writes": "off"}
ROOT = os.geteuid() == 0


def binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: Debian's highest
    version, else PATH's; None if there are none."""
    def version(directory: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", directory.parent.name))

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / program, os.X_OK) for program in PROGRAMS):
            return directory
    return None


class PgServer:
    """One PostgreSQL server of our own; `start()` it, `close()` it
    (or use it as a context manager). Its files live in `home`: a new
    directory under `root`, or under /tmp when running as root. `durable`
    keeps PostgreSQL's own fsync and full_page_writes (on)."""

    def __init__(self, root: Path, port: int | None = None, *, durable: bool = False):
        self.bin = binaries()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
        self.port = port or free_port()
        self.durable = durable
        # Short too: the socket path (home/.s.PGSQL.port) must fit in 107 bytes.
        self.home = Path(tempfile.mkdtemp(prefix="greyd-pg-", dir=None if ROOT else root))
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self._paused = False
        self._crashed = False
        self._admin: psycopg.Connection | None = None
        if ROOT:  # nobody must reach home, and own it
            self._user = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
            self.home.chmod(0o755)
            os.chown(self.home, *self._user)

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """initdb once, then start and wait until the server accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        if self.running:
            return
        self._remove_stale_pidfile()
        self._run("pg_ctl", "start", "-w", "-t", str(TIMEOUT), "-D", str(self.data),
                  "-l", str(self.log))
        self._crashed = False

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|immediate; nothing if it is not running."""
        self.resume()
        self._close_admin()
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-t", str(TIMEOUT), "-m", mode, "-D", str(self.data))

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server at once and remove all its files."""
        try:
            if self._crashed:   # a crash leaves shared memory behind; a start cleans it up
                self.start()
            self.stop("immediate")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> PgServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def running(self) -> bool:
        pid = self.pid
        return pid is not None and _alive(pid)

    @property
    def pid(self) -> int | None:
        """The postmaster's pid as its pid file says; None without one."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # -- faults -----------------------------------------------------------------------------

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster and every backend, and wait until they are gone."""
        self._close_admin()
        pid = self.pid
        if pid is None or not _alive(pid):
            return
        _signal(pid, signal.SIGSTOP)        # no new backends while we list them
        processes = [pid, *_children(pid)]
        for each in processes:
            _signal(each, signal.SIGKILL)
        _wait_gone(processes)
        self._paused = False
        self._crashed = True

    def pause(self) -> None:
        """A hung server: SIGSTOP the postmaster, then every child. The kernel still
        completes TCP handshakes on its listening socket; nothing ever answers."""
        pid = self.pid
        if pid is None or self._paused:
            return
        _signal(pid, signal.SIGSTOP)        # first, so that it forks nothing new
        for child in _children(pid):
            _signal(child, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo pause(): SIGCONT every child, then the postmaster."""
        pid = self.pid
        if pid is None or not self._paused:
            return
        for child in _children(pid):
            _signal(child, signal.SIGCONT)
        _signal(pid, signal.SIGCONT)
        self._paused = False

    # -- databases --------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database (from template0); its URL, with the password."""
        self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
            sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database, ending whatever sessions it still has."""
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))

    def _execute(self, statement: sql.Composable) -> None:
        """Run admin SQL on one kept connection (a new login costs a SCRAM exchange)."""
        if self._admin is None or self._admin.closed or self._admin.broken:
            self._admin = psycopg.connect(self.url(), autocommit=True, connect_timeout=10)
        try:
            self._admin.execute(statement)
        except psycopg.OperationalError:
            self._close_admin()
            raise

    def _close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    # -- setup ------------------------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self.home / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth-local=trust", "--auth-host=scram-sha-256",
                      "--encoding=UTF8", "--locale=C", "--no-sync")
        finally:
            pwfile.unlink()
        settings = {**SETTINGS, **({} if self.durable else FAST), "port": str(self.port),
                    "unix_socket_directories": f"'{self.home}'"}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# greyd's tests or benchmark\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _remove_stale_pidfile(self) -> None:
        """After a crash: the lock files of a dead postmaster (perhaps an unreaped
        zombie, which postgres would take for a live one) go, and its socket."""
        pid = self.pid
        if pid is not None and not _alive(pid):
            socket = self.home / f".s.PGSQL.{self.port}"
            for stale in (self.data / "postmaster.pid", Path(f"{socket}.lock"), socket):
                stale.unlink(missing_ok=True)

    def _own(self, path: Path) -> None:
        if ROOT:
            os.chown(path, *self._user)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run one of the server's programs, as nobody when we are root; raise on failure
        with what it said."""
        prefix = []
        if ROOT:
            uid, gid = self._user
            prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        # pg_ctl start hands its stdout to the postmaster: a file, never a pipe we would wait on
        with tempfile.TemporaryFile(mode="w+") as output:
            result = subprocess.run([*prefix, str(self.bin / program), *args], cwd=self.home,
                                    env=env, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT + 30)
            if result.returncode != 0:
                output.seek(0)
                raise RuntimeError(f"{program} {args[0]} failed ({result.returncode}): "
                                   f"{output.read().strip()} {self._log_tail()}")
        return result

    def _log_tail(self) -> str:
        try:
            return "log: " + " | ".join(self.log.read_text().splitlines()[-5:])
        except OSError:
            return ""


# -- /proc ---------------------------------------------------------------------------------

def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z...); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    """True while the process exists and has not exited (a zombie has)."""
    return _state(pid) not in (None, "Z")


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL processes still alive after SIGKILL: {pids}")
        time.sleep(0.02)
