"""greyd.config: defaults, the sample file, parsing, validation, lookup and roots."""

import dataclasses
import ipaddress
import json
import os
import socket
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import toml
from greyd import config, values
from greyd.config import Config, ConfigError

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "greyd.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return config.load(write(tmp_path / "etc" / "greyd.toml", text))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- defaults and the sample file ---------------------------------------------------------


def test_defaults_are_those_of_the_spec():
    c = Config()
    assert c.server.listen == (("127.0.0.1", 2525),)
    assert (c.server.hostname, c.server.banner, c.server.user) == ("", "greyd", "")
    assert (c.server.max_connections, c.server.max_connections_per_client) == (500, 20)
    assert (c.server.command_timeout, c.server.data_timeout) == (300, 600)
    assert c.server.max_message_size == 25 * 1024 * 1024
    assert (c.server.max_recipients, c.server.max_errors) == (100, 10)
    assert c.server.bare_newlines == "normalize"
    assert c.server.pidfile == Path("var/greyd.pid")
    assert c.upstream == config.UpstreamConfig("127.0.0.1", 10025, 60, False, "auto")
    assert c.relay.domains == ("localhost",)
    assert c.relay.clients == tuple(map(ipaddress.ip_network, ["127.0.0.1/32", "::1/128"]))
    assert c.greylist == config.GreylistConfig(
        300, 2 * 86400, 35 * 86400, 24, 64, 5, True, "accept")
    assert c.dns == config.DnsConfig(True, (), 2, (), ())
    assert c.log == config.LogConfig(Path("var/log/greyd.log"), None, False, "info")
    assert c.database.path == Path("var/greyd.db")
    assert (c.root, c.source) == (Path("."), None)


def test_config_is_frozen():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server.max_connections = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.root = Path("/")


def test_load_none_gives_defaults_rooted_at_cwd(tmp_path):
    c = config.load(None, cwd=tmp_path)
    root = tmp_path.resolve()
    assert c.root == root and c.source is None
    assert c.server.pidfile == root / "var" / "greyd.pid"
    assert c.log.file == root / "var" / "log" / "greyd.log"
    assert c.database.path == root / "var" / "greyd.db"
    assert c.server.hostname == socket.getfqdn()
    assert c.greylist == Config().greylist and c.relay == Config().relay


def test_sample_config_loads_and_equals_defaults():
    loaded = config.load(SAMPLE)
    defaults = config.load(None, cwd=REPO)
    assert loaded.source == SAMPLE and loaded.root == REPO
    assert loaded == dataclasses.replace(defaults, source=SAMPLE)


def test_sample_config_shows_every_key():
    with SAMPLE.open("rb") as stream:
        sample = tomllib.load(stream)
    expected = Config().as_dict()
    assert list(sample) == list(expected)
    for section, table in expected.items():
        assert list(sample[section]) == list(table), section


def test_empty_file_gives_defaults(tmp_path):
    c = load_text(tmp_path, "# nothing set\n")
    assert c == dataclasses.replace(config.load(None, cwd=tmp_path), source=c.source)


# --- durations and sizes ------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (0, 0), (300, 300), ("300", 300), ("0s", 0), ("90s", 90), ("5m", 300),
    ("2h", 7200), ("35d", 35 * 86400), ("010m", 600), (values.MAX_DURATION, values.MAX_DURATION),
    ("1w", 604800), ("5w", 35 * 86400), ("0w", 0),
])
def test_parse_duration_accepts(value, seconds):
    assert values.parse_duration(value, "greylist.delay") == seconds


@pytest.mark.parametrize("value", [
    -1, True, False, 1.5, None, [], "", "5x", "5 m", " 5m", "-5m", "5M", "m", "1W", "w", "1wk",
    "1.5h", "5m ", "٣", values.MAX_DURATION + 1, f"{values.MAX_DURATION // 86400 + 1}d",
])
def test_parse_duration_rejects(value):
    with pytest.raises(ConfigError, match=r"^greylist\.delay: "):
        values.parse_duration(value, "greylist.delay")


@pytest.mark.parametrize("value, size", [
    (0, 0), (1, 1), ("100", 100), ("100B", 100), ("512K", 512 * 1024), ("512k", 512 * 1024),
    ("25M", 25 * 1024**2), ("1G", 1024**3), (10**12, 10**12),
])
def test_parse_size_accepts(value, size):
    assert values.parse_size(value, "server.max_message_size") == size


@pytest.mark.parametrize("value", [
    -1, True, 2.0, None, "", "1T", "1.5M", "25MB", "M", "-1K", "1 K", ["25M"],
])
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError, match=r"^server\.max_message_size: .*got"):
        values.parse_size(value, "server.max_message_size")


@given(st.integers(min_value=0, max_value=values.MAX_DURATION))
def test_duration_round_trips_plain_seconds(n):
    assert values.parse_duration(n, "k") == n
    assert values.parse_duration(str(n), "k") == n
    assert values.parse_duration(f"{n}s", "k") == n


@given(st.integers(min_value=0, max_value=values.MAX_DURATION // 86400))
def test_duration_units_multiply(n):
    assert values.parse_duration(f"{n}m", "k") == n * 60
    assert values.parse_duration(f"{n}h", "k") == n * 3600
    assert values.parse_duration(f"{n}d", "k") == n * 86400


@given(st.integers(min_value=0, max_value=values.MAX_DURATION // (7 * 86400)))
def test_weeks_are_seven_days(n):
    assert values.parse_duration(f"{n}w", "k") == values.parse_duration(f"{7 * n}d", "k")


def test_a_duration_in_weeks_is_refused_beyond_ten_years():
    weeks = values.MAX_DURATION // (7 * 86400) + 1
    with pytest.raises(ConfigError, match=r"^k: must be at most"):
        values.parse_duration(f"{weeks}w", "k")


def test_config_durations_take_weeks(tmp_path):
    c = load_text(tmp_path, '[greylist]\nretry_window = "1w"\nmax_age = "5w"\n')
    assert (c.greylist.retry_window, c.greylist.max_age) == (604800, 35 * 86400)
    message = error_of(tmp_path, '[greylist]\nmax_age = "5 w"\n')
    assert message.startswith("greylist.max_age: must be a duration") and '"1w"' in message


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trips(n):
    assert values.parse_size(n, "k") == n
    assert values.parse_size(str(n), "k") == n
    assert values.parse_size(f"{n}K", "k") == n * 1024
    assert values.parse_size(f"{n}M", "k") == n * 1024**2


# --- host:port ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, default, expected", [
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("[::1]:2525", None, ("::1", 2525)),
    ("[2001:DB8::0001]:25", None, ("2001:db8::1", 25)),
    ("localhost:25", None, ("localhost", 25)),
    ("mx.example.org:65535", None, ("mx.example.org", 65535)),
    ("127.0.0.1", 53, ("127.0.0.1", 53)),
    ("::1", 53, ("::1", 53)),
    ("[::1]", 53, ("::1", 53)),
    ("[::1]:5353", 53, ("::1", 5353)),
])
def test_parse_hostport_accepts(text, default, expected):
    assert values.parse_hostport(text, "k", default) == expected


@pytest.mark.parametrize("text, default", [
    ("127.0.0.1", None), ("::1:25", None), ("[::1]", None), ("127.0.0.1:", None),
    ("127.0.0.1:0", None), ("127.0.0.1:65536", None), ("127.0.0.1:99999999", None),
    ("127.0.0.1:-1", None), ("127.0.0.1:2x", None), (":25", None), ("[]:25", None),
    ("[::1]x", None), ("[nothex]:25", None), ("999.1.1.1:25", None), ("bad host:25", None),
    ("-bad.:25", None), ("a\nb:25", None), ("::g", 53), (2525, None), (None, 53),
])
def test_parse_hostport_rejects(text, default):
    with pytest.raises(ConfigError, match=r"^upstream\.x: "):
        values.parse_hostport(text, "upstream.x", default)


def test_parse_hostport_port_zero_only_when_allowed():
    assert values.parse_hostport("127.0.0.1:0", "k", min_port=0) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="from 1 to 65535"):
        values.parse_hostport("127.0.0.1:0", "k")


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_hostport_round_trips(address, port):
    text = values.format_hostport(str(address), port)
    assert values.parse_hostport(text, "k", min_port=0) == (str(address), port)


# --- validation: unknown keys, wrong types, impossible values -----------------------------


@pytest.mark.parametrize("text, key", [
    ("[server]\nlistn = []\n", "server.listn: unknown key"),
    ("[greylist]\ndelay_seconds = 1\n", "greylist.delay_seconds: unknown key"),
    ("[serve]\nlisten = []\n", "serve: unknown section"),
    ("[database]\npath = 'x'\n[database.extra]\nkey = 1\n", "database.extra:"),
    ("listen = ['127.0.0.1:25']\n", "listen: unknown key"),
    ("[server]\n\"max connections\" = 1\n", 'server."max connections": unknown key'),
])
def test_unknown_section_or_key_is_named(tmp_path, text, key):
    assert key in error_of(tmp_path, text)


def test_error_for_odd_key_stays_on_one_line(tmp_path):
    message = error_of(tmp_path, '[server]\n"evil\\nkey\\u0000" = 1\n')
    assert message.startswith('server."evil\\nkey\\u0000": unknown key')


WRONG_TYPES = [
    ("server", "listen", '"127.0.0.1:2525"'), ("server", "listen", "[2525]"),
    ("server", "hostname", "1"), ("server", "banner", "true"), ("server", "user", "[]"),
    ("server", "max_connections", "true"), ("server", "max_connections", '"500"'),
    ("server", "max_connections", "1.5"), ("server", "max_connections_per_client", "false"),
    ("server", "command_timeout", "1.5"), ("server", "data_timeout", "true"),
    ("server", "max_message_size", "1.5"), ("server", "max_recipients", '"x"'),
    ("server", "max_errors", "false"), ("server", "bare_newlines", "1"),
    ("server", "pidfile", "1"), ("server", "workers", "true"), ("server", "workers", '"2"'),
    ("upstream", "host", "1"), ("upstream", "port", '"10025"'), ("upstream", "port", "true"),
    ("upstream", "timeout", "false"), ("upstream", "starttls", "1"),
    ("upstream", "starttls", '"yes"'), ("upstream", "xclient", "true"),
    ("relay", "domains", '"localhost"'), ("relay", "domains", "[1]"),
    ("relay", "clients", '"127.0.0.1"'), ("relay", "clients", "[1]"),
    ("greylist", "delay", "true"), ("greylist", "retry_window", "1.5"),
    ("greylist", "max_age", "[]"), ("greylist", "ipv4_prefix", '"24"'),
    ("greylist", "ipv6_prefix", "true"), ("greylist", "auto_whitelist_after", "1.0"),
    ("greylist", "header", "1"), ("greylist", "on_store_error", "false"),
    ("dns", "enabled", "1"), ("dns", "nameservers", '"1.1.1.1"'), ("dns", "nameservers", "[53]"),
    ("dns", "timeout", "true"), ("dns", "dnswl", '"list.dnswl.org"'), ("dns", "dnsbl", "[1]"),
    ("log", "file", "1"), ("log", "debug_file", "false"), ("log", "syslog", "0"),
    ("log", "level", "1"), ("database", "path", "1"), ("database", "path", "{ a = 1 }"),
    ("server", "max_connections", "1979-05-27"),
]


@pytest.mark.parametrize("section, key, value", WRONG_TYPES)
def test_wrong_type_is_named(tmp_path, section, key, value):
    message = error_of(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert message.startswith(f"{section}.{key}: ") and "must be" in message


def test_section_that_is_not_a_table(tmp_path):
    assert error_of(tmp_path, "server = 1\n").startswith("server: must be a table")


IMPOSSIBLE = [
    ("server", "listen", "[]"), ("server", "listen", '["127.0.0.1"]'),
    ("server", "listen", '["127.0.0.1:70000"]'), ("server", "listen", '["::1:25"]'),
    ("server", "listen", '["[::1]:"]'), ("server", "listen", '["bad host:25"]'),
    ("server", "listen", '["[nothex]:25"]'), ("server", "listen", '["127.0.0.1:25", "x y:1"]'),
    ("server", "max_connections", "0"), ("server", "max_connections", "-3"),
    ("server", "max_connections_per_client", "0"), ("server", "max_recipients", "0"),
    ("server", "max_errors", "0"), ("server", "command_timeout", "0"),
    ("server", "command_timeout", '"0s"'), ("server", "data_timeout", "0"),
    ("server", "command_timeout", "-5"), ("server", "max_message_size", "0"),
    ("server", "max_message_size", '"0K"'), ("server", "bare_newlines", '"strip"'),
    ("server", "hostname", '"mx example.org"'), ("server", "hostname", '"mx\\u0001.org"'),
    ("server", "hostname", '"' + "a" * 256 + '"'), ("server", "banner", '"greyd\\r\\n250 ok"'),
    ("server", "banner", '"' + "b" * 256 + '"'), ("server", "user", '"mail user"'),
    ("server", "pidfile", '""'), ("server", "pidfile", '"var/\\u0000pid"'),
    ("server", "workers", "0"), ("server", "workers", "65"), ("server", "workers", '"many"'),
    ("upstream", "port", "0"), ("upstream", "port", "65536"), ("upstream", "timeout", "0"),
    ("upstream", "xclient", '"always"'), ("upstream", "host", '""'),
    ("upstream", "host", '"mx .example"'), ("upstream", "host", '"::g"'),
    ("relay", "clients", '["not-an-ip"]'), ("relay", "clients", '["10.0.0.0/33"]'),
    ("relay", "domains", '[""]'), ("relay", "domains", '["ex ample.org"]'),
    ("relay", "domains", '["user@example.org"]'), ("relay", "domains", '["."]'),
    ("relay", "domains", '["example..org"]'),
    ("greylist", "ipv4_prefix", "33"), ("greylist", "ipv4_prefix", "-1"),
    ("greylist", "ipv6_prefix", "129"), ("greylist", "auto_whitelist_after", "-1"),
    ("greylist", "on_store_error", '"reject"'), ("greylist", "delay", '"-5m"'),
    ("dns", "timeout", '"0s"'), ("dns", "dnswl", '[""]'), ("dns", "dnswl", '[".list.dnswl.org"]'),
    ("dns", "dnsbl", '["zen spamhaus.org"]'), ("dns", "nameservers", '["dns.google"]'),
    ("dns", "nameservers", '["1.1.1.1:0"]'), ("dns", "nameservers", '["1.1.1.1:99999"]'),
    ("dns", "nameservers", '["[::1]:53:1"]'),
    ("dns", "nameservers", '["[127.0.0.1]:53"]'),
    ("log", "level", '"verbose"'), ("log", "level", '"INFO"'), ("log", "file", '"a\\u0000b"'),
    ("database", "path", '""'),
]


@pytest.mark.parametrize("section, key, value", IMPOSSIBLE)
def test_impossible_value_is_named(tmp_path, section, key, value):
    message = error_of(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert message.startswith(f"{section}.{key}: ")


SHORTER = "greylist.delay: must be shorter than greylist.retry_window"
LONGER = "greylist.max_age: must be longer than greylist.delay"


@pytest.mark.parametrize("text, message", [
    ('delay = "3d"', SHORTER),
    ('delay = "1h"\nretry_window = "1h"', SHORTER),
    ('max_age = "1m"', LONGER),
    ('delay = "10m"\nmax_age = "10m"', LONGER),
])
def test_greylist_durations_must_be_ordered(tmp_path, text, message):
    assert error_of(tmp_path, f"[greylist]\n{text}\n") == message


def test_max_age_may_be_shorter_than_retry_window(tmp_path):
    c = load_text(tmp_path, '[greylist]\ndelay = 0\nmax_age = "1d"\n')
    assert (c.greylist.delay, c.greylist.retry_window, c.greylist.max_age) == (0, 172800, 86400)


def test_message_shows_the_bad_value(tmp_path):
    message = error_of(tmp_path, "[server]\nmax_connections = -3\n")
    assert message == "server.max_connections: must be a positive integer, got -3"
    assert error_of(tmp_path, "[greylist]\nheader = 1\n").endswith("got 1")
    assert error_of(tmp_path, "[server]\nmax_errors = true\n").endswith("got true")


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path / "bad.toml", "[server]\nbanner = = 1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML: ") and "line 2" in message
    assert "\n" not in message


def test_unreadable_files_are_config_errors(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[server]\nbanner = \"\xff\"\n")
    with pytest.raises(ConfigError, match="binary.toml"):
        config.load(binary)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml")
    (tmp_path / "adir.toml").mkdir()
    with pytest.raises(ConfigError, match="adir.toml: cannot read"):
        config.load(tmp_path / "adir.toml")


# --- accepted values and their normal form ------------------------------------------------


def test_values_are_parsed_and_normalised(tmp_path):
    c = load_text(tmp_path, """
[server]
listen = ["0.0.0.0:25", "[::]:25", "127.0.0.1:0"]
hostname = "mx.example.org"
banner = "greyd at your service"
max_message_size = "10M"
command_timeout = 30
data_timeout = "1h"
[upstream]
host = "[::1]"
port = 25
starttls = true
xclient = "never"
[relay]
domains = ["Example.ORG.", ".Sub.Example.net"]
clients = ["192.0.2.7", "10.1.2.3/8", "2001:db8::/32", "2001:db8::1"]
[greylist]
delay = "90s"
auto_whitelist_after = 0
header = false
on_store_error = "tempfail"
[dns]
enabled = false
nameservers = ["127.0.0.1", "127.0.0.1:5353", "[::1]:5353", "::1"]
timeout = 1
dnswl = ["List.DNSWL.org."]
dnsbl = ["zen.spamhaus.org"]
[log]
file = ""
debug_file = "/var/log/greyd-debug.log"
syslog = true
level = "debug"
""")
    assert c.server.listen == (("0.0.0.0", 25), ("::", 25), ("127.0.0.1", 0))
    assert c.server.hostname == "mx.example.org"
    assert c.server.banner == "greyd at your service"
    assert (c.server.max_message_size, c.server.command_timeout, c.server.data_timeout) == (
        10 * 1024**2, 30, 3600)
    assert c.upstream == config.UpstreamConfig("::1", 25, 60, True, "never")
    assert c.relay.domains == ("example.org", ".sub.example.net")
    assert c.relay.clients == tuple(map(ipaddress.ip_network, [
        "192.0.2.7/32", "10.0.0.0/8", "2001:db8::/32", "2001:db8::1/128"]))
    assert c.greylist == config.GreylistConfig(90, 172800, 35 * 86400, 24, 64, 0, False, "tempfail")
    assert c.dns == config.DnsConfig(False, (("127.0.0.1", 53), ("127.0.0.1", 5353),
                                             ("::1", 5353), ("::1", 53)),
                                     1, ("list.dnswl.org",), ("zen.spamhaus.org",))
    assert c.log == config.LogConfig(None, Path("/var/log/greyd-debug.log"), True, "debug")


def test_empty_lists_are_allowed(tmp_path):
    c = load_text(tmp_path, "[relay]\ndomains = []\nclients = []\n")
    assert c.relay == config.RelayConfig(domains=(), clients=())


# --- lookup order -------------------------------------------------------------------------


@pytest.fixture
def candidates(tmp_path):
    """A working directory with etc/greyd.toml, plus an env file, a cli file and a system file."""
    cwd = tmp_path / "work"
    return {
        "cwd": cwd,
        "local": write(cwd / "etc" / "greyd.toml", ""),
        "env": write(tmp_path / "env" / "env.toml", ""),
        "cli": write(cwd / "cli.toml", ""),
        "system": write(tmp_path / "system" / "greyd.toml", ""),
    }


def test_find_cli_path_beats_everything(candidates):
    c = candidates
    found = config.find("cli.toml", {"GREYD_CONFIG": str(c["env"])}, c["cwd"], system=c["system"])
    assert found == c["cli"]
    assert config.find(str(c["cli"]), {}, Path("/"), system=c["system"]) == c["cli"]


def test_find_env_beats_local_etc(candidates):
    c = candidates
    assert config.find(None, {"GREYD_CONFIG": str(c["env"])}, c["cwd"]) == c["env"]


def test_find_empty_env_counts_as_unset(candidates):
    c = candidates
    assert config.find(None, {"GREYD_CONFIG": ""}, c["cwd"]) == c["local"]


def test_find_the_system_config_beats_a_local_etc(candidates, tmp_path):
    """On a host greyd is installed on, a command typed in a checkout still
    uses the host's config; the checkout's is for development."""
    c = candidates
    assert config.find(None, {}, c["cwd"], system=c["system"]) == c["system"]
    assert config.find(None, {}, c["cwd"], system=tmp_path / "nowhere.toml") == c["local"]


def test_find_system_when_no_local(candidates, tmp_path):
    c = candidates
    empty = tmp_path / "empty"
    empty.mkdir()
    assert config.find(None, {}, empty, system=c["system"]) == c["system"]
    assert config.find(None, {}, empty, system=tmp_path / "nowhere.toml") is None


@pytest.mark.skipif(config.SYSTEM_CONFIG.exists(), reason="/etc/greyd/greyd.toml exists here")
def test_find_nothing_means_builtin_defaults(tmp_path):
    assert config.find(None, {}, tmp_path) is None


@pytest.mark.parametrize("cli, env", [("missing.toml", None), (None, "/nonexistent/greyd.toml"),
                                      ("missing.toml", "also-missing.toml")])
def test_find_missing_explicit_path_is_an_error(candidates, cli, env):
    environ = {} if env is None else {"GREYD_CONFIG": env}
    with pytest.raises(ConfigError, match="^config file not found: "):
        config.find(cli, environ, candidates["cwd"])


def test_found_file_is_the_one_loaded(candidates):
    c = candidates
    write(c["env"], '[server]\nbanner = "from env"\n')
    found = config.find(None, {"GREYD_CONFIG": str(c["env"])}, c["cwd"])
    assert config.load(found).server.banner == "from env"


# --- the appliance root -------------------------------------------------------------------


def test_root_is_parent_of_etc(tmp_path):
    c = config.load(write(tmp_path / "appliance" / "etc" / "greyd.toml", ""))
    root = (tmp_path / "appliance").resolve()
    assert c.root == root
    assert c.server.pidfile == root / "var" / "greyd.pid"
    assert c.log.file == root / "var" / "log" / "greyd.log"
    assert c.database.path == root / "var" / "greyd.db"


def test_root_is_own_directory_otherwise(tmp_path):
    path = write(tmp_path / "X" / "conf" / "g.toml", """
[server]
pidfile = "run/greyd.pid"
[log]
debug_file = "debug.log"
[database]
path = "../db/greyd.db"
""")
    c = config.load(path)
    root = (tmp_path / "X" / "conf").resolve()
    assert c.root == root and c.source == path
    assert c.server.pidfile == root / "run" / "greyd.pid"
    assert c.log.debug_file == root / "debug.log"
    assert c.database.path == root / ".." / "db" / "greyd.db"


def test_absolute_paths_are_kept(tmp_path):
    c = load_text(tmp_path, f'[database]\npath = "{tmp_path}/abs.db"\n[log]\nfile = "/tmp/g.log"\n')
    assert c.database.path == tmp_path / "abs.db"
    assert c.log.file == Path("/tmp/g.log")


def test_relative_config_path_uses_given_cwd(tmp_path):
    write(tmp_path / "etc" / "greyd.toml", "")
    c = config.load(Path("etc/greyd.toml"), cwd=tmp_path)
    assert c.root == tmp_path.resolve()
    assert c.source == tmp_path / "etc" / "greyd.toml"


def test_empty_hostname_becomes_fqdn_and_set_one_is_kept(tmp_path):
    assert load_text(tmp_path, "").server.hostname == socket.getfqdn()
    c = load_text(tmp_path, '[server]\nhostname = "mx.example.org"\n')
    assert c.server.hostname == "mx.example.org"


# --- with_listen --------------------------------------------------------------------------


def test_with_listen_replaces_addresses():
    base = config.load(None)
    c = config.with_listen(base, ["127.0.0.1:2526", "[::1]:2527", "127.0.0.1:0"])
    assert c.server.listen == (("127.0.0.1", 2526), ("::1", 2527), ("127.0.0.1", 0))
    assert dataclasses.replace(c, server=base.server) == base
    assert base.server.listen == (("127.0.0.1", 2525),)


def test_with_listen_empty_keeps_config():
    base = Config()
    assert config.with_listen(base, []) is base


@pytest.mark.parametrize("bad", ["::1:25", "127.0.0.1", "127.0.0.1:65536", "[::1]", "x y:25"])
def test_with_listen_rejects_bad_address(bad):
    with pytest.raises(ConfigError, match="^--listen: "):
        config.with_listen(Config(), ["127.0.0.1:25", bad])


# --- as_dict ------------------------------------------------------------------------------


def test_as_dict_is_json_with_the_config_keys():
    c = config.load(SAMPLE)
    settings = json.loads(json.dumps(c.as_dict()))
    assert list(settings) == ["server", "upstream", "tls", "relay", "greylist", "dns", "log", "database",
                              "metrics"]
    for section, table in settings.items():
        fields = [f.name for f in dataclasses.fields(getattr(c, section))]
        assert list(table) == fields
    assert settings["server"]["listen"] == ["127.0.0.1:2525"]
    assert settings["server"]["command_timeout"] == 300
    assert settings["server"]["max_message_size"] == 25 * 1024 * 1024
    assert settings["relay"]["clients"] == ["127.0.0.1/32", "::1/128"]
    assert settings["greylist"]["retry_window"] == 172800
    assert settings["log"]["debug_file"] == ""
    assert settings["database"]["path"] == str(REPO / "var" / "greyd.db")
    assert settings["metrics"]["listen"] == ""


def test_as_dict_round_trips_through_toml(tmp_path):
    original = load_text(tmp_path, """
[server]
listen = ["[::1]:2525", "127.0.0.1:0"]
hostname = "mx.example.org"
banner = "greyd \\"quoted\\" \u00e9"
max_message_size = "1G"
[relay]
domains = [".example.org"]
clients = ["192.0.2.0/24"]
[dns]
nameservers = ["[::1]:5353", "127.0.0.1"]
dnsbl = ["zen.spamhaus.org"]
[log]
file = ""
""")
    copy = write(tmp_path / "copy" / "greyd.toml", toml(original.as_dict()))
    again = config.load(copy)
    assert again.as_dict() == original.as_dict()
    assert dataclasses.replace(again, root=original.root, source=original.source) == original


def test_workers_default_to_one_and_auto_is_two_per_usable_cpu(tmp_path):
    assert load_text(tmp_path, "").server.workers == 1
    assert load_text(tmp_path, "[server]\nworkers = 3\n").server.workers == 3
    assert load_text(tmp_path, '[server]\nworkers = "auto"\n').server.workers == \
        min(64, 2 * len(os.sched_getaffinity(0)))
