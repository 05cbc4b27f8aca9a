"""`greyd setup` and the package: greyd installs itself like a mail daemon.

Everything runs the real `greyd` command into a temporary root (--root), and
the installed files are checked by their real consumers: systemd-analyze
for the unit, logrotate against a running greyd for the logrotate file. The
wheel is built and installed into a venv of its own, outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import until
from daemon import GREYD, ROOT, greyd

pytestmark = pytest.mark.timeout(120)
CHECKOUT = Path(__file__).resolve().parent.parent
INSTALLED = {   # path under the root -> mode
    "etc/greyd/greyd.toml": 0o640,
    "etc/systemd/system/greyd.service": 0o644,
    "etc/cron.d/greyd": 0o644,
    "etc/logrotate.d/greyd": 0o644,
}
DIRECTORIES = {"etc/greyd": 0o755, "var/lib/greyd": 0o750, "var/log/greyd": 0o750,
               "run/greyd": 0o750}


def setup(root: Path, *args: str, command: str = GREYD):
    result = subprocess.run([command, "setup", "--root", str(root), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def expected_first_run(root: Path) -> list[str]:
    return [
        "not creating group greyd under --root: groupadd --system greyd",
        "not creating user greyd under --root: useradd --system --gid greyd "
        "--home-dir /var/lib/greyd --shell /usr/sbin/nologin greyd",
        f"created {root}/etc/greyd (0755, owner left as is under --root)",
        f"created {root}/var/lib/greyd (0750, owner left as is under --root)",
        f"created {root}/var/log/greyd (0750, owner left as is under --root)",
        f"created {root}/run/greyd (0750, owner left as is under --root)",
        f"wrote {root}/etc/greyd/greyd.toml",
        f"installed {root}/etc/systemd/system/greyd.service",
        f"installed {root}/etc/cron.d/greyd",
        f"installed {root}/etc/logrotate.d/greyd",
        f"next: edit {root}/etc/greyd/greyd.toml (upstream, relay.domains), "
        f"then greyd -c {root}/etc/greyd/greyd.toml check",
        "next: systemctl daemon-reload && systemctl enable --now greyd",
    ]


def modes(root: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((root / name).stat().st_mode)
            for name in [*INSTALLED, *DIRECTORIES]}


@pytest.fixture
def installed(tmp_path) -> Path:
    """A root that `greyd setup --root` installed into."""
    root = tmp_path / "root"
    lines = setup(root)
    if "--shell /sbin/nologin" in lines[1]:          # a host without /usr/sbin/nologin
        lines[1] = lines[1].replace("/sbin/nologin", "/usr/sbin/nologin")
    assert lines == expected_first_run(root)
    return root


def test_setup_installs_every_file_pointing_at_this_greyd(installed):
    root = installed
    assert modes(root) == {**INSTALLED, **DIRECTORIES}
    assert not any(path.name.startswith(".") for path in root.rglob("*"))   # no temporary left

    config = tomllib.loads((root / "etc/greyd/greyd.toml").read_text())
    assert config["server"]["listen"] == ["0.0.0.0:25", "[::]:25"]
    assert config["server"]["pidfile"] == f"{root}/run/greyd/greyd.pid"
    assert config["log"]["file"] == f"{root}/var/log/greyd/greyd.log"
    assert config["database"]["path"] == f"{root}/var/lib/greyd/greyd.db"
    sample = tomllib.loads((CHECKOUT / "etc/greyd.toml").read_text())
    assert config["greylist"] == sample["greylist"] and config["relay"] == sample["relay"]

    unit = (root / "etc/systemd/system/greyd.service").read_text()
    assert f"\nExecStart={GREYD} -c {root}/etc/greyd/greyd.toml start --foreground\n" in unit
    assert f"\nExecReload={GREYD} -c {root}/etc/greyd/greyd.toml reload\n" in unit
    assert "\nUser=greyd\nGroup=greyd\n" in unit and "RuntimeDirectory=greyd" in unit
    cron = (root / "etc/cron.d/greyd").read_text()
    assert re.search(rf"^17 +\* +\* +\* +\* +greyd +{re.escape(GREYD)} -c "
                     rf"{re.escape(str(root))}/etc/greyd/greyd.toml cleanup --quiet$", cron, re.M)
    rotate = (root / "etc/logrotate.d/greyd").read_text()
    assert f"\n{root}/var/log/greyd/*.log {{\n" in rotate
    assert f"{GREYD} -c {root}/etc/greyd/greyd.toml reopen-logs" in rotate
    for text in (unit, cron, rotate):
        assert not [line for line in text.splitlines()
                    if "/opt/greyd" in line and not line.startswith("#")]

    check = greyd("check", config=root / "etc/greyd/greyd.toml")
    assert check.returncode == 0, check.stderr


def test_a_second_run_changes_nothing_and_keeps_the_edited_config(installed):
    root = installed
    config = root / "etc/greyd/greyd.toml"
    edited = config.read_text().replace('domains = ["localhost"]', 'domains = ["example.org"]')
    config.write_text(edited)
    before = modes(root)
    assert setup(root) == [
        *expected_first_run(root)[:2],
        *(f"kept {root}/{name} (exists)" for name in DIRECTORIES),
        f"kept {root}/etc/greyd/greyd.toml (exists)",
        f"kept {root}/etc/systemd/system/greyd.service (unchanged)",
        f"kept {root}/etc/cron.d/greyd (unchanged)",
        f"kept {root}/etc/logrotate.d/greyd (unchanged)",
        "nothing to change",
        *expected_first_run(root)[-2:],
    ]
    assert config.read_text() == edited and modes(root) == before

    (root / "etc/cron.d/greyd").write_text("17 * * * * root true\n")   # a stale copy
    (root / "var/log/greyd").chmod(0o755)
    assert [line for line in setup(root) if not line.startswith(("kept", "not ", "next"))] == [
        f"set {root}/var/log/greyd to 0750, owner left as is under --root",
        f"updated {root}/etc/cron.d/greyd",
    ]
    assert "cleanup --quiet" in (root / "etc/cron.d/greyd").read_text()
    assert modes(root) == before


def test_a_dry_run_changes_nothing(tmp_path, installed):
    fresh = tmp_path / "fresh"
    lines = setup(fresh, "--dry-run")
    assert not fresh.exists()
    assert lines[2:10] == [re.sub(r"^(created|wrote|installed) ", lambda m: "would " + {
        "created": "create", "wrote": "write", "installed": "install"}[m.group(1)] + " ", line)
        for line in expected_first_run(fresh)[2:10]]

    (installed / "etc/greyd/greyd.toml").unlink()
    (installed / "run/greyd").rmdir()
    files = {path: path.read_bytes() for path in installed.rglob("*") if path.is_file()}
    assert [line for line in setup(installed, "--dry-run") if line.startswith("would")] == [
        f"would create {installed}/run/greyd (0750, owner left as is under --root)",
        f"would write {installed}/etc/greyd/greyd.toml",
    ]
    assert {path: path.read_bytes() for path in installed.rglob("*") if path.is_file()} == files
    assert not (installed / "run/greyd").exists()


@pytest.mark.skipif(not ROOT, reason="needs root to run greyd as another user")
def test_without_root_setup_is_refused_in_one_line(tmp_path):
    # As nobody, but able to read and run the venv wherever the checkout is
    # (a fresh clone under a 0700 directory, on CI).
    readable = "+dac_override,+dac_read_search"
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             f"--inh-caps={readable}", f"--ambient-caps={readable}",
                             GREYD, "setup"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == "greyd: setup needs root (or --root DIR, or --dry-run)\n"
    assert result.stdout == ""


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_the_installed_unit_verifies_and_is_hardened(installed):
    """The unit setup installs from etc/greyd.service (the template itself is
    never run), checked by systemd."""
    unit = installed / "etc/systemd/system/greyd.service"
    text = unit.read_text()
    assert "start --foreground" in text and "Restart=on-failure" in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for greyd.service: ([\d.]+) (\w+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, security.stdout[-500:]


def session(port: int, helo: str) -> None:
    """One SMTP session that only says HELO: greyd logs its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        replies = client.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        client.sendall(f"HELO {helo}\r\nQUIT\r\n".encode())
        assert replies.readline().startswith(b"250 ")
        assert replies.readline().startswith(b"221 ")


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate not installed")
def test_the_installed_logrotate_file_rotates_a_running_greyd(installed, port, tmp_path):
    config = installed / "etc/greyd/greyd.toml"
    logfile = installed / "var/log/greyd/greyd.log"
    started = greyd("start", "--listen", f"127.0.0.1:{port}", config=config)
    assert started.returncode == 0, started.stderr
    try:
        session(port, "before.example")
        assert until(lambda: "helo=before.example" in logfile.read_text(), 10)
        rotate = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "lr.state"),
                                 str(installed / "etc/logrotate.d/greyd")],
                                capture_output=True, text=True, timeout=60)
        assert rotate.returncode == 0, rotate.stderr
        assert until(lambda: logfile.exists() and "log files reopened" in logfile.read_text(), 10)
        session(port, "after.example")
        assert until(lambda: "helo=after.example" in logfile.read_text(), 10)
    finally:
        assert greyd("stop", config=config).returncode == 0
    rotated = (logfile.parent / "greyd.log.1").read_text()
    assert "helo=before.example" in rotated and "helo=after.example" not in rotated
    assert "helo=before.example" not in logfile.read_text()


def test_the_wheel_carries_the_templates_and_sets_up_from_its_own_venv(tmp_path):
    """Built from a clean copy of the checkout, installed outside it: its
    dependencies come from this test's site-packages through a .pth file."""
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        "var"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--no-index", "-q", "-w", str(wheels),
                            str(source)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    wheel, = wheels.glob("greyd-*.whl")
    with zipfile.ZipFile(wheel) as packed:
        for name in ("greyd.toml", "greyd.service", "greyd.cron", "greyd.logrotate"):
            assert packed.read(f"greyd/data/{name}") == (CHECKOUT / "etc" / name).read_bytes()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    Path(site, "greyd-test-deps.pth").write_text("".join(f"{path}\n" for path in ours))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    command = str(venv / "bin/greyd")
    where = subprocess.run([python, "-c", "import greyd; print(greyd.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.startswith(site)

    root = tmp_path / "root"
    lines = setup(root, command=command)
    assert f"installed {root}/etc/systemd/system/greyd.service" in lines
    unit = (root / "etc/systemd/system/greyd.service").read_text()
    assert f"\nExecStart={command} -c {root}/etc/greyd/greyd.toml start --foreground\n" in unit
    assert f"{command} -c {root}" in (root / "etc/cron.d/greyd").read_text()
    check = subprocess.run([command, "-c", str(root / "etc/greyd/greyd.toml"), "check"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if k != "GREYD_CONFIG"})
    assert check.returncode == 0, check.stderr
    assert f'path = "{root}/var/lib/greyd/greyd.db"' in check.stdout


def test_a_config_given_with_c_is_named_by_the_files_and_not_written(installed, tmp_path):
    mine = installed / "etc/greyd/greyd.toml"
    other = tmp_path / "other"
    result = subprocess.run([GREYD, "-c", str(mine), "setup", "--root", str(other)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"kept {mine} (given with -c)" in result.stdout.splitlines()
    assert not (other / "etc/greyd/greyd.toml").exists()
    unit = (other / "etc/systemd/system/greyd.service").read_text()
    assert f"\nExecReload={GREYD} -c {mine} reload\n" in unit
    assert f"{GREYD} -c {mine} reopen-logs" in (other / "etc/logrotate.d/greyd").read_text()


def test_a_dry_run_on_the_host_says_what_it_would_do_and_does_nothing():
    watched = [Path(p) for p in ("/etc/greyd", "/etc/systemd/system/greyd.service",
                                 "/etc/cron.d/greyd", "/etc/logrotate.d/greyd", "/var/lib/greyd")]
    before = {path: path.exists() for path in watched}
    result = subprocess.run([GREYD, "setup", "--dry-run"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] in ("would create group greyd: groupadd --system greyd",
                        "kept group greyd (exists)")
    assert all(line.startswith(("would ", "kept ", "nothing to change", "next: ")) for line in lines)
    assert lines[-1] == "next: systemctl daemon-reload && systemctl enable --now greyd"
    assert {path: path.exists() for path in watched} == before


def test_the_installed_cron_job_runs_silently(installed):
    """The job line as cron runs it: its SHELL, its PATH, the rest of the line;
    on the database a first `greyd start` (here: a first write) created."""
    config = installed / "etc/greyd/greyd.toml"
    created = subprocess.run([GREYD, "-c", str(config), "whitelist", "add", "--client",
                              "192.0.2.1"], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    lines = [line for line in (installed / "etc/cron.d/greyd").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    settings = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    job, = (line for line in lines if not re.match(r"^[A-Z_]+=", line))
    command = job.split(None, 6)[6]
    result = subprocess.run([settings["SHELL"], "-c", command], capture_output=True, text=True,
                            timeout=60, env={"PATH": settings["PATH"], "HOME": str(installed)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
