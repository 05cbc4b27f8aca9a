"""greyd as a daemon on a mail host: start/stop/status/reload/reopen-logs, privileges,
init and log files.

Everything runs the real `greyd` command; where root would hide an error,
capabilities are dropped; where a system tool is the peer (systemd-analyze,
logrotate, a syslog socket), the real tool is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import until
from daemon import GREYD, Foreground, config_for, greyd, wait_listening
from smtpclient import deliver

pytestmark = pytest.mark.timeout(90)
ETC = Path(__file__).resolve().parent.parent / "etc"


@pytest.fixture
def detached(tmp_path, upstream, port):
    """A config whose daemon is started detached; stopped at teardown whatever happens."""
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "1h"},
                        log={"file": str(tmp_path / "var/log/greyd.log")})
    yield config
    pid = (tmp_path / "var/greyd.pid")
    if pid.exists():
        greyd("stop", config=config)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_start_detaches_and_stop_status_follow_it(detached, tmp_path, port):
    started = greyd("start", config=detached)
    assert started.returncode == 0 and started.stderr == ""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(100).startswith(b"220 ")   # listening as soon as start returned
    pid = int((tmp_path / "var/greyd.pid").read_text())
    assert started.stdout == f"greyd started (pid {pid}), listening on 127.0.0.1:{port}\n"
    assert Path(f"/proc/{pid}").exists()

    status = greyd("status", config=detached)
    assert status.returncode == 0
    assert f"greyd is running (pid {pid})" in status.stdout
    assert re.search(r"^uptime: +0h 0m \d+s, since ", status.stdout, re.M)
    assert f"listen:   127.0.0.1:{port}" in status.stdout
    report = json.loads(greyd("status", "--json", config=detached).stdout)
    assert report["pid"] == pid and report["listen"] == [f"127.0.0.1:{port}"]

    again = greyd("start", config=detached)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"greyd: already running (pid {pid}, pidfile {tmp_path}/var/greyd.pid)"]

    stopped = greyd("stop", config=detached)
    assert stopped.returncode == 0 and stopped.stdout == f"greyd stopped (pid {pid})\n"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not (tmp_path / "var/greyd.pid").exists()
    after = greyd("status", config=detached)
    assert after.returncode == 3 and after.stdout == "greyd is not running\n"
    assert greyd("stop", config=detached).stdout == "greyd is not running\n"


def test_a_detached_start_reports_its_own_failure(detached, port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = greyd("start", config=detached)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"greyd: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_stale_pidfile_is_replaced(detached, tmp_path, port):
    pidfile = tmp_path / "var/greyd.pid"
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{dead_pid()}\n")
    assert greyd("status", config=detached).returncode == 3
    assert greyd("start", config=detached).returncode == 0
    pid = int(pidfile.read_text())
    assert (Path(f"/proc/{pid}/cmdline").read_bytes().find(b"greyd") >= 0)
    assert greyd("stop", config=detached).returncode == 0


def test_reload_rereads_the_config_for_new_sessions_only(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "1h"})
    with Foreground(config) as daemon:
        wait_listening(port)
        early = socket.create_connection(("127.0.0.1", port), timeout=5)
        early_file = early.makefile("rb")
        assert early_file.readline().startswith(b"220 ")
        assert deliver(port, "a@example.net", "b@new.example")[0][0] == 550

        text = config.read_text().replace(
            'domains = ["localhost", "example.org"]',
            'domains = ["localhost", "example.org", "new.example"]')
        assert "new.example" in text
        config.write_text(text)
        reloaded = greyd("reload", config=config)
        assert reloaded.returncode == 0, reloaded.stderr
        assert until(lambda: deliver(port, "a@example.net", "b@new.example")[0][0] == 451,
                     10, step=0.1), "reload did not take effect"

        early.sendall(b"EHLO old.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@new.example>\r\n")
        replies = [early_file.readline() for _ in range(7)]   # EHLO (5 lines), MAIL, RCPT
        assert replies[-1].startswith(b"550 5.7.1"), replies   # the session kept the old config
        early.close()

        config.write_text(text + "\n[bogus]\nkey = 1\n")
        refused = greyd("reload", config=config)
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
        assert "bogus" in refused.stderr
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    assert "reloaded" in daemon.stderr


def test_a_detached_daemon_reloads_the_config_it_found_at_start(tmp_path, upstream, port):
    """Found as ./etc/greyd.toml, not named with -c: the detached daemon runs in /."""
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "1h"},
                        log={"file": "var/log/greyd.log"})
    run = dict(cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "GREYD_CONFIG"})
    assert greyd("start", **run).returncode == 0
    try:
        assert deliver(port, "a@example.net", "b@new.example")[0][0] == 550
        config.write_text(config.read_text().replace(
            'domains = ["localhost", "example.org"]', 'domains = ["new.example"]'))
        assert greyd("reload", **run).returncode == 0
        assert until(lambda: deliver(port, "a@example.net", "b@new.example")[0][0] == 451,
                     10, step=0.1), "reload did not take effect"
    finally:
        assert greyd("stop", **run).returncode == 0
    assert "reloaded config=" + str(config) in (tmp_path / "var/log/greyd.log").read_text()


def test_reload_reopens_the_log_file(detached, tmp_path, port):
    assert greyd("start", config=detached).returncode == 0
    logfile = tmp_path / "var/log/greyd.log"
    deliver(port, "a@example.net", "b@localhost")
    logfile.rename(logfile.with_suffix(".log.1"))
    assert greyd("reload", config=detached).returncode == 0
    assert until(logfile.exists, 10), "greyd did not reopen its log"
    deliver(port, "c@example.net", "d@localhost")
    assert greyd("stop", config=detached).returncode == 0
    assert "from=c@example.net" in logfile.read_text()
    assert "from=c@example.net" not in logfile.with_suffix(".log.1").read_text()
    assert "from=a@example.net" in logfile.with_suffix(".log.1").read_text()


def test_reopen_logs_reopens_every_workers_log_and_keeps_the_config(tmp_path, upstream, port):
    """SIGUSR1, for logrotate: the master and each worker reopen their log
    files; the config, edited meanwhile, is not re-read."""
    logfile = tmp_path / "var/log/greyd.log"
    config = config_for(tmp_path, upstream.port, port, server={"workers": 2},
                        greylist={"delay": "1h"}, log={"file": str(logfile)})
    assert greyd("start", config=config).returncode == 0
    try:
        pid = int((tmp_path / "var/greyd.pid").read_text())
        deliver(port, "a@example.net", "b@localhost")
        assert until(lambda: "from=a@example.net" in logfile.read_text(), 10)
        logfile.rename(logfile.with_suffix(".log.1"))
        config.write_text(config.read_text().replace(
            'domains = ["localhost", "example.org"]',
            'domains = ["localhost", "example.org", "new.example"]'))
        reopened = greyd("reopen-logs", config=config)
        assert reopened.returncode == 0, reopened.stderr
        assert reopened.stdout == f"greyd reopening its log files (pid {pid})\n"
        assert until(lambda: logfile.exists() and len(set(re.findall(
            r"greyd\[(\d+)\]: INFO log files reopened", logfile.read_text()))) == 3, 10), \
            "the master and both workers should have reopened the log"
        for number in range(8):
            deliver(port, f"c{number}@example.net", "d@localhost")
        assert deliver(port, "a@example.net", "b@new.example")[0][0] == 550   # old config
    finally:
        assert greyd("stop", config=config).returncode == 0
    new, old = logfile.read_text(), logfile.with_suffix(".log.1").read_text()
    assert all(f"from=c{number}@example.net" in new for number in range(8))
    assert "from=c" not in old and "from=a@example.net" in old
    assert "reloaded" not in new


def test_reopen_logs_without_a_daemon_is_one_line(detached):
    result = greyd("reopen-logs", config=detached)
    assert result.returncode == 1 and result.stderr == "greyd: not running\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_started_as_root_it_serves_as_server_user(upstream, port):
    root = Path(tempfile.mkdtemp(prefix="greyd-user-"))   # reachable by nobody, unlike tmp_path
    try:
        root.chmod(0o755)
        config = config_for(root, upstream.port, port, server={"user": "nobody"},
                            greylist={"delay": "1h"}, log={"file": str(root / "var/log/greyd.log")})
        assert greyd("start", config=config).returncode == 0
        pid = int((root / "var/greyd.pid").read_text())
        uids = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
        assert uids.split() == ["65534"] * 4
        rcpt, _ = deliver(port, "a@example.net", "b@localhost")
        assert rcpt[0] == 451 and rcpt[1].startswith(b"4.7.1 Greylisted")   # the store is writable
        stopped = greyd("stop", config=config)
        assert stopped.returncode == 0
        log = (root / "var/log/greyd.log").read_text()
        assert "action=greylist reason=new" in log and "store failure" not in log
        assert not (root / "var/greyd.pid").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_unknown_server_user_is_one_line(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port, server={"user": "no-such-user-greyd"})
    result = greyd("start", "--foreground", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["greyd: server.user: no such user: no-such-user-greyd"]


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate not installed")
def test_logrotate_rotates_and_greyd_writes_to_the_new_file(detached, tmp_path, port):
    logfile = tmp_path / "var/log/greyd.log"
    rules = (ETC / "greyd.logrotate").read_text()
    rules = rules.replace("/var/log/greyd/*.log", str(logfile.parent / "*.log"))
    rules = rules.replace("/opt/greyd/.venv/bin/greyd -c /etc/greyd/greyd.toml",
                          f"{GREYD} -c {detached}")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(rules)
    assert greyd("start", config=detached).returncode == 0
    deliver(port, "before@example.net", "b@localhost")
    # log lines are written a moment later, in batches
    assert until(lambda: "from=before@example.net" in logfile.read_text(), 10), \
        "the decision was never logged"
    rotate = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "lr.state"), str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert rotate.returncode == 0, rotate.stderr
    assert until(logfile.exists, 10), "greyd did not reopen its log"
    deliver(port, "after@example.net", "b@localhost")
    assert greyd("stop", config=detached).returncode == 0
    assert "from=after@example.net" in logfile.read_text()
    assert "from=before@example.net" in (logfile.parent / "greyd.log.1").read_text()


@pytest.mark.skipif(os.path.exists("/dev/log") or os.geteuid() != 0,
                    reason="needs root and no syslog daemon owning /dev/log")
def test_syslog_lines_go_to_the_mail_facility(tmp_path, upstream, port):
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/dev/log")
    sink.settimeout(5)
    try:
        config = config_for(tmp_path, upstream.port, port, log={"file": "", "syslog": True})
        with Foreground(config) as daemon:
            wait_listening(port)
            deliver(port, "a@example.net", "b@localhost")
            lines = []
            while not any(b"action=greylist" in line for line in lines):
                lines.append(sink.recv(4096))
            assert daemon.stop() == 0
    finally:
        sink.close()
        os.unlink("/dev/log")
    decision = next(line for line in lines if b"action=greylist" in line)
    assert decision.startswith(b"<22>greyd[")          # facility mail (2) * 8 + info (6)
    assert b"reason=new" in decision
