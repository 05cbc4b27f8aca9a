"""The first minutes with greyd, and which config a command uses.

The README's first steps, run for real: greyd on its built-in defaults
trusts only the host itself, so mail from another loopback address is
greylisted at once, and passes on its retry. Then the config search: the
host's system config before a checkout's, Debian places for a system
config's relative paths, a terminal told which config is in use, and no
command reading a database that does not exist.
"""

from __future__ import annotations

import os
import pty
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from greyd import config as configuration

from daemon import GREYD, Foreground, greyd, wait_listening
from upstream import Upstream, free_port

pytestmark = pytest.mark.timeout(60)

BODY = b"Subject: hello\r\n\r\nIt works.\r\n"


def attempt(port: int, source: str = "127.0.0.2") -> tuple[int, str]:
    """The README's try.py: one message from `source`; the RCPT reply (DATA's if sent)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as smtp:
        smtp.ehlo("mail.example.org")
        smtp.mail("alice@example.org")
        code, text = smtp.rcpt("bob@localhost")
        if code == 250:
            code, text = smtp.data(BODY)
    return code, text.decode()


def quiet_config(root: Path, **sections: dict) -> Path:
    """The built-in defaults but no DNS (tests reach only loopback), in root/etc."""
    lines = ["[dns]", "enabled = false"]
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in keys.items()]
    path = root / "etc" / "greyd.toml"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# -- 1. see it work ------------------------------------------------------------------------

def test_on_the_defaults_another_loopback_address_is_greylisted_and_the_host_trusted(
        tmp_path):
    port = free_port()
    config = quiet_config(tmp_path, upstream={"port": free_port()})    # no MTA listens there
    with Foreground(config, "--listen", f"127.0.0.1:{port}"):
        wait_listening(port)
        code, text = attempt(port, "127.0.0.2")
        assert (code, text) == (451, "4.7.1 Greylisted, please try again in 300 seconds")
        # The host itself is trusted; with no MTA on 127.0.0.1:10025 that is 451 4.4.1.
        code, text = attempt(port, "127.0.0.1")
        assert code == 451 and text.startswith("4.4.1 ")
        explained = greyd("explain", "--client", "127.0.0.2", "--sender", "alice@example.org",
                          "--recipient", "bob@localhost", config=config)
    assert explained.returncode == 0, explained.stderr
    assert "reason:     too-early" in explained.stdout
    assert "triplet:    127.0.0.0/24 alice@example.org bob@localhost" in explained.stdout


def test_the_retry_passes_and_reaches_the_mta(tmp_path):
    port = free_port()
    with Upstream() as mta:
        config = quiet_config(tmp_path, greylist={"delay": "1s"},
                              upstream={"port": mta.port})
        with Foreground(config, "--listen", f"127.0.0.1:{port}"):
            wait_listening(port)
            assert attempt(port)[0] == 451
            time.sleep(1.2)
            code, _ = attempt(port)
            [message] = mta.wait_for(1)
    assert code == 250
    assert message.rcpt_tos == ["bob@localhost"]


# -- 2. one config, found predictably --------------------------------------------------------

def test_the_system_config_comes_before_a_checkout_s(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "etc").mkdir(parents=True)
    (checkout / "etc" / "greyd.toml").write_text("")
    system = tmp_path / "host" / "etc" / "greyd" / "greyd.toml"
    assert configuration.find(None, {}, checkout, system=system) == checkout / "etc/greyd.toml"
    system.parent.mkdir(parents=True)
    system.write_text("")
    assert configuration.find(None, {}, checkout, system=system) == system
    explicit = {"GREYD_CONFIG": str(checkout / "etc/greyd.toml")}
    assert configuration.find(None, explicit, checkout, system=system) == \
        checkout / "etc/greyd.toml"


def test_a_system_config_keeps_its_files_in_the_debian_places(tmp_path):
    path = tmp_path / "etc" / "greyd" / "greyd.toml"
    path.parent.mkdir(parents=True)
    path.write_text('[log]\ndebug_file = "debug.log"\n[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
    config = configuration.load(path)
    assert config.database.path == tmp_path / "var/lib/greyd/greyd.db"
    assert config.log.file == tmp_path / "var/log/greyd/greyd.log"
    assert config.log.debug_file == tmp_path / "var/log/greyd/debug.log"
    assert config.server.pidfile == tmp_path / "run/greyd/greyd.pid"
    assert config.tls.cert == tmp_path / "etc/greyd/cert.pem"
    path.write_text('[database]\npath = "/srv/greyd.db"\n[server]\npidfile = "greyd2.pid"\n')
    config = configuration.load(path)
    assert config.database.path == Path("/srv/greyd.db")
    assert config.server.pidfile == tmp_path / "run/greyd/greyd2.pid"


def test_a_checkout_keeps_its_own_var(tmp_path):
    config = configuration.load(quiet_config(tmp_path))
    assert config.database.path == tmp_path / "var/greyd.db"
    assert config.log.file == tmp_path / "var/log/greyd.log"


@pytest.mark.parametrize("command", [["stats"], ["triplets", "list"], ["whitelist", "list"],
                                     ["cleanup"], ["explain", "--client", "127.0.0.2",
                                                   "--sender", "a@example.org",
                                                   "--recipient", "b@localhost"]])
def test_no_command_reads_a_database_that_does_not_exist(tmp_path, command):
    config = quiet_config(tmp_path)
    result = greyd(*command, config=config)
    assert result.returncode == 1
    assert result.stderr == (f"greyd: no database at {tmp_path}/var/greyd.db; is greyd "
                             "configured here? (greyd start creates it; -c names another "
                             "config)\n")
    assert not (tmp_path / "var").exists()


def test_a_write_creates_the_database_and_says_so_on_a_terminal(tmp_path):
    config = quiet_config(tmp_path)
    said = terminal_stderr("whitelist", "add", "--client", "192.0.2.1", cwd=tmp_path)
    assert said.splitlines()[:2] == [f"greyd: using config {config}",
                                     f"greyd: creating the database {tmp_path}/var/greyd.db"]
    assert greyd("stats", config=config).returncode == 0


def terminal_stderr(*args: str, cwd: Path) -> str:
    """What `greyd args` writes to a terminal on standard error."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([GREYD, *args], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=terminal, timeout=30, env={**os.environ, "COLUMNS": "200"})
        os.close(terminal)
        terminal = -1
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:          # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert result.returncode in (0, 1)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_a_terminal_is_told_which_config_is_in_use(tmp_path):
    config = quiet_config(tmp_path)
    assert greyd("whitelist", "add", "--client", "192.0.2.1", config=config).returncode == 0
    said = terminal_stderr("whitelist", "list", cwd=tmp_path)
    assert said.startswith(f"greyd: using config {config}\n")
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    said = terminal_stderr("stats", cwd=elsewhere)
    assert said.startswith(f"greyd: using built-in defaults (no config file; state under "
                           f"{elsewhere})\n")
    assert "no database at" in said
    # Not on a terminal (cron, scripts): no such line.
    assert greyd("whitelist", "list", config=config).stderr == ""


def test_a_deleted_working_directory_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    process = subprocess.Popen(
        ["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "{GREYD}" stats'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert stderr == ("greyd: the working directory no longer exists; change to another one "
                      "or give -c PATH\n")
    assert "Errno" not in stderr and shutil.which("sh")


def test_stop_says_how_many_sessions_it_waits_for(tmp_path):
    port = free_port()
    config = quiet_config(tmp_path, upstream={"port": free_port()})
    with Foreground(config, "--listen", f"127.0.0.1:{port}") as daemon:
        wait_listening(port)
        client = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0))
        client.ehlo("mail.example.org")
        client.mail("alice@example.org")             # a transaction: the stop waits for it
        stopping = subprocess.Popen([GREYD, "-c", str(config), "stop"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        first = stopping.stdout.readline()
        assert first == (f"greyd stopping (pid {daemon.proc.pid}): waiting for 1 open session "
                         "to finish (at most 30 s, then 421)\n")
        client.quit()
        rest, errors = stopping.communicate(timeout=30)
    assert stopping.returncode == 0, errors
    assert rest == f"greyd stopped (pid {daemon.proc.pid})\n"
