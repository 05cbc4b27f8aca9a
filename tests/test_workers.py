"""server.workers > 1: a master and forked workers sharing the port, the
database and the connection limits (the real `greyd` command, real sockets,
a real upstream, a real SQLite file)."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import greeted, until
from daemon import DELAY, Foreground, config_for, greyd, wait_listening
from smtpclient import Raw, deliver

pytestmark = pytest.mark.timeout(90)
WORKERS = 2


def children(pid: int) -> set[int]:
    return {int(task) for task in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def running_workers(master: int, replacing: set[int] = frozenset()) -> set[int]:
    """The master's WORKERS workers once all run (none of them one of `replacing`)."""
    workers = until(lambda: len(children(master)) == WORKERS and
                    not children(master) & replacing and children(master), 10)
    assert workers, f"the workers did not start: {children(master)}"
    return workers


def gone(pid: int) -> bool:
    """True once the process has exited (a zombie nobody reaped has exited too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def serving_pids(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"greyd\[(\d+)\]: INFO session end ", log)}


@pytest.fixture
def workers_config(tmp_path, upstream, port):
    return config_for(tmp_path, upstream.port, port,
                      server={"workers": WORKERS, "max_connections_per_client": 3},
                      log={"file": str(tmp_path / "var/log/greyd.log")})


def test_workers_share_the_port_the_database_and_stop_with_the_master(
        tmp_path, workers_config, port, upstream):
    with Foreground(workers_config) as daemon:
        wait_listening(port)
        master = daemon.proc.pid
        workers = running_workers(master)
        first = deliver(port, "alice@example.net", "bob@localhost")[0]
        # Many sessions: the kernel spreads them over both workers.
        for i in range(40):
            deliver(port, f"s{i}@example.net", f"r{i}@localhost")
        time.sleep(DELAY + 0.2)
        passed = deliver(port, "alice@example.net", "bob@localhost", b"Subject: x\r\n\r\nx\r\n")
        assert daemon.stop() == 0
    assert first[0] == 451
    assert passed[0] == (250, b"2.1.5 OK") and passed[1][0] == 250
    assert len(upstream.messages) == 1
    log = (tmp_path / "var/log/greyd.log").read_text()
    assert serving_pids(log) == workers                 # both served; the master none
    assert log.count("INFO stopped") == WORKERS
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "var/greyd.pid").exists()


def thread_policies(pids) -> dict[tuple[int, int], int]:
    """The scheduling policy of every thread of these processes (a thread
    that ends while they are looked at is left out)."""
    policies = {}
    for pid in pids:
        for task in map(int, os.listdir(f"/proc/{pid}/task")):
            try:
                policies[pid, task] = os.sched_getscheduler(task)
            except ProcessLookupError:
                pass
    return policies


@pytest.mark.parametrize("chrt, policy", [((), os.SCHED_BATCH),
                                          (("chrt", "--idle", "0"), os.SCHED_IDLE)],
                         ids=["default", "started-under-chrt"])
def test_threads_run_under_sched_batch_and_each_worker_on_one_cpu(
        workers_config, port, chrt, policy):
    """greyd asks for SCHED_BATCH before it starts a thread or a worker
    (greyd.daemonize.batch_scheduling), and the threads of live sessions have
    it too; a policy greyd was started under (here by chrt) is kept. Each
    worker is bound to one CPU (greyd.workers.bind_to_cpu)."""
    with Foreground(workers_config, prefix=list(chrt)) as daemon:
        wait_listening(port)
        master = daemon.proc.pid
        workers = running_workers(master)
        clients = [Raw(port) for _ in range(3)]
        assert [client.greeting[0] for client in clients] == [220] * 3
        for client in clients:              # a line too long: read on a thread of its own
            client.send(b"x" * 2000)
        assert until(lambda: len(thread_policies({master, *workers}))
                     >= 1 + WORKERS * 3 + len(clients), 5)
        policies = thread_policies({master, *workers})
        cpus = sorted(os.sched_getaffinity(master))
        bound = sorted(sorted(os.sched_getaffinity(pid)) for pid in workers)
        for client in clients:
            client.close()
        assert daemon.stop() == 0
    assert len(policies) >= 1 + WORKERS * 3 + len(clients)   # main, writer, reactor, sessions
    assert set(policies.values()) == {policy}, policies
    # Each worker on one CPU of the master's, round robin; the master unbound.
    assert cpus == sorted(os.sched_getaffinity(0))
    assert bound == sorted([cpu] for cpu in (cpus * WORKERS)[:WORKERS])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("how", ["anywhere", "under-taskset", "beside-a-busy-cpu"])
def test_a_one_process_greyd_runs_all_its_threads_on_one_cpu(tmp_path, upstream, port, how):
    """workers = 1 (the default): greyd binds itself to one CPU before it starts
    a thread (greyd.workers.bind_to_cpu), so the threads of its sessions hand
    the GIL to each other on that CPU: started under taskset, one of those;
    and not the CPU that a process bound there keeps busy."""
    allowed = sorted(os.sched_getaffinity(0))
    prefix = ["taskset", "-c", str(allowed[-1])] if how == "under-taskset" else []
    busy = None
    if how == "beside-a-busy-cpu":
        busy = subprocess.Popen(["taskset", "-c", str(allowed[0]), sys.executable, "-c",
                                 "while True: pass"])
        time.sleep(0.3)
    try:
        with Foreground(config_for(tmp_path, upstream.port, port), prefix=prefix) as daemon:
            wait_listening(port)
            clients = [Raw(port) for _ in range(3)]
            assert [client.greeting[0] for client in clients] == [220] * 3
            for client in clients:          # a line too long: read on a thread of its own
                client.send(b"x" * 2000)
            pid = daemon.proc.pid
            assert until(lambda: len(os.listdir(f"/proc/{pid}/task")) >= 4 + len(clients), 5)
            cpus = {}
            for task in map(int, os.listdir(f"/proc/{pid}/task")):
                try:
                    cpus[task] = sorted(os.sched_getaffinity(task))
                except ProcessLookupError:
                    pass
            for client in clients:
                client.close()
            assert daemon.stop() == 0
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    assert len(cpus) >= 4 + len(clients)        # main, log, store, reactor, sessions
    assert len({tuple(bound) for bound in cpus.values()}) == 1, cpus
    (bound,) = set(map(tuple, cpus.values()))
    assert len(bound) == 1 and bound[0] in allowed
    if how == "under-taskset":
        assert bound == (allowed[-1],)
    if how == "beside-a-busy-cpu":
        assert bound != (allowed[0],)


def test_the_per_client_limit_holds_across_workers(workers_config, port):
    with Foreground(workers_config) as daemon:
        wait_listening(port)
        running_workers(daemon.proc.pid)
        held = [Raw(port) for _ in range(3)]
        try:
            for client in held:
                assert client.greeting[0] == 220
            with socket.create_connection(("127.0.0.1", port), timeout=5) as fourth:
                assert fourth.recv(200).startswith(b"421 4.7.0 ")
            held.pop().close()
            # a slot is free again, whichever worker it was counted in
            replacement = greeted(port, timeout=10)
            assert replacement, "no slot came free"
            held.append(replacement)
        finally:
            for client in held:
                client.close()
        assert daemon.stop() == 0


def _delivered(port: int) -> tuple | None:
    """The RCPT reply of one transaction, or None when greyd said 421 at connect."""
    try:
        return deliver(port, "a@example.net", "b@localhost")[0]
    except smtplib.SMTPConnectError as refused:
        assert refused.smtp_code == 421
        return None


def test_a_dead_worker_is_replaced_and_its_connections_uncounted(workers_config, port, tmp_path):
    with Foreground(workers_config) as daemon:
        wait_listening(port)
        master = daemon.proc.pid
        before = running_workers(master)
        held = [Raw(port) for _ in range(3)]        # the client's whole allowance
        for client in held:
            assert client.greeting[0] == 220
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        after = running_workers(master, replacing=before)
        for client in held:
            client.close()
        # The killed workers' three connections no longer count against the client.
        fresh = [greeted(port, timeout=10) for _ in range(3)]
        for client in filter(None, fresh):
            client.close()
        assert all(fresh), "the killed workers' connections still count"
        # Their slots come free as their sessions see the close; then it serves on.
        rcpt = until(lambda: _delivered(port), 10)
        assert rcpt, "no slot came free"
        assert rcpt[0] == 451
        assert daemon.stop() == 0
    log = (tmp_path / "var/log/greyd.log").read_text()
    assert log.count("worker exited, restarting it") == WORKERS
    assert serving_pids(log) <= before | after


def test_reload_reaches_every_worker(workers_config, port, tmp_path):
    with Foreground(workers_config) as daemon:
        wait_listening(port)
        running_workers(daemon.proc.pid)
        assert deliver(port, "a@example.net", "b@new.example")[0][0] == 550
        workers_config.write_text(workers_config.read_text().replace(
            'domains = ["localhost", "example.org"]', 'domains = ["new.example"]'))
        assert greyd("reload", config=workers_config).returncode == 0
        log = tmp_path / "var/log/greyd.log"
        assert until(lambda: log.read_text().count("INFO reloaded ") == WORKERS, 10), \
            "not every worker reloaded"
        # Every worker now relays for the new domain (sessions land on both).
        assert {deliver(port, f"s{i}@example.net", f"r{i}@new.example")[0][0]
                for i in range(20)} == {451}
        assert daemon.stop() == 0


MASTER_GONE_BOUND = 15   # seconds: a worker looks for its master every 0.5 s, then stops


def test_a_worker_whose_master_is_gone_stops(workers_config, port, tmp_path):
    """Killed outright, the master cannot tell its workers to stop: each must
    find out by itself and stop gracefully, freeing the port, instead of
    serving on as an orphan nobody supervises."""
    with Foreground(workers_config) as daemon:
        wait_listening(port)
        workers = running_workers(daemon.proc.pid)
        try:
            assert deliver(port, "a@example.net", "b@localhost")[0][0] == 451   # they serve
            daemon.proc.kill()
            daemon.proc.wait()
            stopped = until(lambda: all(gone(pid) for pid in workers), MASTER_GONE_BOUND)
            running = sorted(pid for pid in workers if not gone(pid))
            assert stopped, f"workers {running} outlived their master by {MASTER_GONE_BOUND} s"
        finally:
            for pid in workers:            # a worker that does not stop must not outlive the test
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "var/log/greyd.log").read_text()
    assert log.count("master process gone, stopping") == WORKERS
    assert log.count("INFO stopped") == WORKERS
    with socket.socket() as probe:     # nothing serves the port any more
        probe.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
