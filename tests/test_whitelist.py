"""`greyd whitelist add | remove | list | import` and greyd.whitelist's normalizers.

The commands run as an administrator runs them: the real `greyd` command in a
subprocess, on a real SQLite file and on a real PostgreSQL database (conftest's
`any_database`, for every command that reads or writes the store); the live tests change the whitelist of a
running `greyd start --foreground` in front of a real aiosmtpd upstream and
show the next connection decided by it, with no restart.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greyd import whitelist
from greyd.policy import Request
from greyd.whitelist import Entry, Whitelist
from greyd.clitools import when
from greyd.store import Store

from conftest import write_config
from daemon import Foreground, config_for, greyd, wait_listening
from smtpclient import deliver

pytestmark = pytest.mark.timeout(60)

ETC = Path(__file__).resolve().parent.parent / "etc"
BODY = b"From: alice@example.net\r\nSubject: whitelisted\r\n\r\nHello.\r\n"
T = 1_700_000_000


@pytest.fixture
def config(tmp_path, any_database) -> Path:
    """A config whose store (SQLite in tmp_path, then PostgreSQL) is created
    empty as `greyd start` would; nothing listens (no daemon)."""
    path = write_config(tmp_path, 10025, database=any_database.section)
    any_database.open().close()
    return path


@pytest.fixture
def plain_config(tmp_path) -> Path:
    """`config` on SQLite only: for what fails before the store is opened."""
    path = write_config(tmp_path, 10025)
    (tmp_path / "var").mkdir(exist_ok=True)
    with Store(tmp_path / "var" / "greyd.db") as store:
        store.migrate()
    return path


def run(config: Path, *args: str):
    return greyd("whitelist", *args, config=config)


def listed(config: Path, *args: str) -> list[dict]:
    result = run(config, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def explain(config: Path, client="127.0.0.1", sender="alice@example.net",
            recipient="bob@localhost") -> dict:
    result = greyd("explain", "--client", client, "--sender", sender,
                   "--recipient", recipient, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result, status: int = 1) -> str:
    """The single 'greyd: ...' line of a failed command."""
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("greyd: "), result.stderr
    return lines[0]


# -- normalizers (pure) -------------------------------------------------------------

VALID = [
    ("hostname", "B\u00fccher.example", "xn--bcher-kva.example"),   # either form: one entry
    ("hostname", ".b\u00fccher.example", ".xn--bcher-kva.example"),
    ("recipient", "@B\u00dcCHER.example", "@xn--bcher-kva.example"),
    ("recipient", "J\u00fcrgen@b\u00fccher.example", "j\u00fcrgen@xn--bcher-kva.example"),
    ("sender", "ju\u0308rgen@bu\u0308cher.example", "j\u00fcrgen@xn--bcher-kva.example"),  # NFC
    ("client", "127.0.0.1", "127.0.0.1/32"),
    ("client", " 192.0.2.7/24 ", "192.0.2.0/24"),
    ("client", "192.0.2.0/255.255.255.0", "192.0.2.0/24"),
    ("client", "2001:DB8::1", "2001:db8::1/128"),
    ("client", "2001:db8:1:2::/48", "2001:db8:1::/48"),
    ("client", "::ffff:192.0.2.1", "192.0.2.1/32"),
    ("client", "::ffff:192.0.2.0/120", "192.0.2.0/24"),
    ("client", "10.1", "10.1.0.0/16"),             # leading octets, as postgrey reads them
    ("client", "192.0.2", "192.0.2.0/24"),
    ("client", "10.", "10.0.0.0/8"),
    ("client", "192.0.2.7.", "192.0.2.7/32"),
    ("recipient", "/^postmaster@/", "/^postmaster@/"),
    ("recipient", r"/^Abuse@.*\.example\.org$/", r"/^Abuse@.*\.example\.org$/"),
    ("hostname", "MX.Example.COM", "mx.example.com"),
    ("hostname", "mx.example.com.", "mx.example.com"),
    ("hostname", "out_1.mta.example.com", "out_1.mta.example.com"),
    ("hostname", ".Example.COM", ".example.com"),
    ("hostname", r"/^Out-\d+\.example\.net$/", r"/^Out-\d+\.example\.net$/"),
    ("sender", "Alice@Example.COM", "alice@example.com"),
    ("sender", "@Example.com.", "@example.com"),
    ("sender", "Alice@", "alice@"),
    ("sender", "<carol@example.org>", "carol@example.org"),
    ("sender", "o'brien+news@example.org", "o'brien+news@example.org"),
    ("recipient", "postmaster@", "postmaster@"),
    ("recipient", "bob@localhost", "bob@localhost"),
    ("recipient", "@EXAMPLE.org", "@example.org"),
]

INVALID = [
    ("client", "", "empty"),
    ("client", "300.1.2.3", "not an IP address or network"),
    ("client", "192.0.300", "not an IP address or network: 192.0.300"),
    ("client", "010.1", "not an IP address or network"),
    ("recipient", "/list-(/", "does not compile"),
    ("recipient", "/x{99999999999}/", "does not compile"),
    ("sender", "/^alice@/", "for recipients and hostnames only"),
    ("client", "192.0.2.0/33", "not an IP address or network"),
    ("client", "example.com", "not an IP address or network"),
    ("client", "fe80::1%eth0", "zone index"),
    ("client", "0.0.0.0/0", "every IPv4 client"),
    ("client", "192.0.2.7/0", "every IPv4 client"),
    ("client", "::/0", "every IPv6 client"),
    ("client", "192.0.2.1 192.0.2.2", "no spaces"),
    ("hostname", "/", "written /like this/"),
    ("hostname", "//", "written /like this/"),
    ("hostname", "/foo(/", "does not compile"),
    ("hostname", "/x{99999999999}/", "does not compile"),
    ("hostname", "/(?P<a>x)(?P=b)/", "does not compile"),
    ("hostname", ".com", "too broad"),
    ("hostname", "mx..example.com", "not a valid domain name"),
    ("hostname", "bad!name.example", "not a valid domain name"),
    ("hostname", "x" * 64 + ".example", "not a valid domain name"),
    ("hostname", "mx.example.com:25", "not a valid domain name"),
    ("hostname", "192.0.2.1", "use --client"),
    ("hostname", "\uff42\u00fccher.example", "looks like another"),    # fullwidth b
    ("hostname", "mx.\u212aamaelia.org", "looks like another"),          # KELVIN SIGN
    ("recipient", "@\uff4cocalhost", "looks like another"),              # fullwidth l
    ("sender", "alice@b\u00fccher..example", "not a valid"),
    ("hostname", "mx.example.com\x1b[2J", "unprintable"),
    ("sender", "a@b@c", "expected user@domain"),
    ("sender", "example.com", "write @domain"),
    ("sender", "@", "names nothing"),
    ("sender", "<>", "expected user@domain"),
    ("sender", "a b@example.com", "no spaces"),
    ("sender", "alice@exa_mple..com", "not a valid domain name"),
    ("sender", "alice@[192.0.2.1]", "not a valid domain name"),
    ("sender", "alice@192.0.2.1", "not a name"),
    ("sender", ".alice@example.com", "not a plain local part"),
    ("sender", "x" * 65 + "@example.com", "longer than 64"),
    ("sender", "\u00e9" * 33 + "@example.com", "longer than 64"),        # 66 octets
    ("recipient", "bob\n@localhost", "unprintable"),
    ("recipient", "bob\udcff@localhost", "not valid UTF-8"),   # a byte 0xff, surrogate-escaped
]


@pytest.mark.parametrize("kind, given_as, stored", VALID)
def test_normalize_accepts_and_normalizes(kind, given_as, stored):
    assert whitelist.normalize(kind, given_as) == stored
    assert whitelist.normalize(kind, stored) == stored


@pytest.mark.parametrize("kind, given_as, reason", INVALID)
def test_normalize_refuses_with_a_reason(kind, given_as, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        whitelist.normalize(kind, given_as)


def test_normalize_refuses_an_unknown_kind():
    with pytest.raises(ValueError):
        whitelist.normalize("helo", "mx.example.com")


TEXT = st.one_of(
    st.text(),
    st.text(alphabet="0123456789abcdefx.:/@%<>[]()\\*+?^$ -_#\n\t\x00"),
)


@given(st.sampled_from(whitelist.KINDS), TEXT)
def test_normalize_raises_only_value_error_and_is_idempotent(kind, text):
    try:
        value = whitelist.normalize(kind, text)
    except ValueError:
        return
    assert whitelist.normalize(kind, value) == value
    Whitelist().add(Entry(kind, value))     # the daemon can index what the CLI stores


@given(st.sampled_from(whitelist.IMPORT_KINDS), st.lists(TEXT, max_size=5))
def test_reading_a_postgrey_file_never_raises(kind, lines):
    for line in whitelist.read_postgrey(lines, kind):
        assert (line.reason is None) == (line.value is not None)
        if line.value is not None:
            assert whitelist.normalize(line.kind, line.value) == line.value


@pytest.mark.parametrize("entry, name, matches", [
    ("mx.example.com", "MX.Example.com.", True),
    ("mx.example.com", "mx2.example.com", False),
    (".example.com", "example.com", True),
    (".example.com", "out-7.mta.example.com", True),
    (".example.com", "badexample.com", False),
    (r"/^out-\d+\.mta\.example\.com$/", "OUT-7.mta.example.com", True),
    (r"/^out-\d+\.mta\.example\.com$/", "out-x.mta.example.com", False),
])
def test_a_normalized_hostname_entry_matches_the_clients_verified_name(entry, name, matches):
    value = whitelist.normalize("hostname", entry.upper() if "/" not in entry else entry)
    index = Whitelist.build([Entry("hostname", value)])
    request = Request("198.51.100.7", "alice@example.net", "bob@localhost", client_name=name)
    assert index.match(request, T) == (value if matches else None)
    assert index.match(Request("198.51.100.7", "alice@example.net", "bob@localhost"), T) is None


def test_reading_postgrey_lines():
    lines = [
        "# comment", "", "   ", "192.0.2.7  # trailing comment", "10.1", "10.1.2.",
        "2001:db8::/32", "example.com", ".example.org", "/^mx\\d+\\.example\\.net$/",
        "two words", "300.1.2.3", "bad!name",
    ]
    got = [(line.number, line.kind, line.value, line.reason and line.reason.split(":")[0])
           for line in whitelist.read_postgrey(lines)]
    assert got == [
        (4, "client", "192.0.2.7/32", None),
        (5, "client", "10.1.0.0/16", None),
        (6, "client", "10.1.2.0/24", None),
        (7, "client", "2001:db8::/32", None),
        (8, "hostname", ".example.com", None),
        (9, "hostname", ".example.org", None),
        (10, "hostname", "/^mx\\d+\\.example\\.net$/", None),
        (11, None, None, "more than one word on the line"),
        (12, None, None, "client"),
        (13, None, None, "hostname"),
    ]
    recipients = [(line.value, line.reason) for line in whitelist.read_postgrey(
        ["postmaster@", "example.com", "@example.net", "bob@example.org", "/^x@/", "/x(/"],
        "recipient")]
    assert recipients[:5] == [
        ("postmaster@", None), ("@example.com", None), ("@example.net", None),
        ("bob@example.org", None), ("/^x@/", None)]
    assert recipients[5][0] is None and "/x(/ does not compile" in recipients[5][1]


# -- the store's whitelist methods, on either store ---------------------------------

@pytest.fixture
def store(any_database):
    with any_database.open() as opened:
        yield opened


def version(store) -> int:
    return int(store.conn.execute(
        "SELECT value FROM meta WHERE key = 'whitelist_version'").fetchone()[0])


def test_re_adding_an_entry_unchanged_does_not_make_the_daemon_reload(store):
    assert store.add_whitelist("client", "192.0.2.0/24", comment="office", now=T) is True
    before = version(store)
    assert store.add_whitelist("client", "192.0.2.0/24", now=T + 5) is False
    assert version(store) == before
    assert store.add_whitelist("client", "192.0.2.0/24", expires=T + 60, now=T + 5) is False
    assert version(store) > before
    assert store.whitelist_entries() == [{"kind": "client", "value": "192.0.2.0/24",
                                          "comment": "office", "added": T, "expires": T + 60}]


def test_import_keeps_live_entries_and_renews_expired_ones(store):
    store.add_whitelist("sender", "@live.example", comment="mine", expires=T + 100, now=T)
    store.add_whitelist("sender", "@dead.example", comment="old", expires=T - 1, now=T - 9)
    added = store.import_whitelist(
        [("sender", "@live.example"), ("sender", "@dead.example"), ("sender", "@new.example"),
         ("sender", "@new.example")], "imported", T)
    assert added == [False, True, True, False]
    rows = {row["value"]: (row["comment"], row["expires"]) for row in store.whitelist_entries()}
    assert rows == {"@live.example": ("mine", T + 100), "@dead.example": ("imported", None),
                    "@new.example": ("imported", None)}
    assert store.remove_whitelist("sender", "@new.example") is True
    assert store.remove_whitelist("sender", "@new.example") is False


# -- the commands ------------------------------------------------------------------

ROUND_TRIP = [
    # option, as given, as stored
    ("--client", "192.0.2.7", "192.0.2.7/32"),
    ("--client", "198.51.100.77/24", "198.51.100.0/24"),
    ("--client", "2001:db8::25", "2001:db8::25/128"),
    ("--client", "2001:DB8:1::/48", "2001:db8:1::/48"),
    ("--hostname", "MX.Example.com", "mx.example.com"),
    ("--hostname", ".example.net", ".example.net"),
    ("--hostname", r"/^out-\d+\.example\.org$/", r"/^out-\d+\.example\.org$/"),
    ("--sender", "Alice@Example.net", "alice@example.net"),
    ("--sender", "@example.org", "@example.org"),
    ("--sender", "newsletter@", "newsletter@"),
    ("--recipient", "bob@localhost", "bob@localhost"),
    ("--recipient", "@example.org", "@example.org"),
    ("--recipient", "abuse@", "abuse@"),
]


def run_all(config: Path, commands: list[list[str]]) -> list:
    """Several `greyd whitelist` commands at once, as concurrent writers."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run(config, *args), commands))


def test_every_selector_form_is_added_listed_and_removed(config):
    # Thirteen writers at once, on a database that does not exist yet.
    results = run_all(config, [["add", option, given_as, "--comment", f"via {option}"]
                               for option, given_as, _ in ROUND_TRIP])
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("added: ")

    entries = listed(config)
    expected = [(option[2:], stored, f"via {option}", None, False)
                for option, _, stored in ROUND_TRIP]
    assert sorted((e["kind"], e["value"], e["comment"], e["expires"], e["expired"])
                  for e in entries) == sorted(expected)
    assert [e["kind"] for e in entries] == (
        ["client"] * 4 + ["hostname"] * 3 + ["sender"] * 3 + ["recipient"] * 3)
    assert all(abs(e["added"] - time.time()) < 60 for e in entries)
    assert [e["value"] for e in listed(config, "--kind", "sender")] == [
        "@example.org", "alice@example.net", "newsletter@"]

    table = run(config, "list").stdout.splitlines()
    assert re.match(r"KIND +VALUE +EXPIRES +COMMENT$", table[0])
    assert len(table) == 1 + len(ROUND_TRIP)
    assert re.search(r"^hostname +/\^out-\\d\+\\\.example\\\.org\$/ +never +via --hostname$",
                     "\n".join(table), re.M)

    results = run_all(config, [["remove", option, given_as] for option, given_as, _ in ROUND_TRIP])
    for (option, _, stored), result in zip(ROUND_TRIP, results):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"removed: {option[2:]} {stored}")
    assert listed(config) == []
    assert run(config, "list").stdout == "the whitelist is empty\n"


def test_adding_twice_is_not_an_error_and_updates_the_comment(config):
    first = run(config, "add", "--sender", "@example.org", "--comment", "partner")
    assert first.returncode == 0 and first.stdout == "added: sender @example.org\n"
    again = run(config, "add", "--sender", "@EXAMPLE.org", "--comment", "partner, renewed")
    assert again.returncode == 0, again.stderr
    assert again.stdout == \
        "already in the whitelist: sender @example.org, permanent, kept, comment updated\n"
    kept = run(config, "add", "--sender", "@example.org")
    assert kept.returncode == 0
    [entry] = listed(config)
    assert (entry["value"], entry["comment"]) == ("@example.org", "partner, renewed")


def test_either_form_of_an_idn_is_one_entry_and_explain_reads_both(tmp_path, any_database):
    config = write_config(tmp_path, 10025, relay={"domains": ["b\u00fccher.example"]},
                          database=any_database.section)
    first = run(config, "add", "--recipient", "@B\u00fcCHER.example")
    assert first.returncode == 0 and first.stdout == (
        "added: recipient @xn--bcher-kva.example (given as @B\u00fcCHER.example)\n")
    again = run(config, "add", "--recipient", "@xn--bcher-kva.example")
    assert again.stdout.startswith("already in the whitelist"), again.stdout
    [entry] = listed(config)
    assert entry["value"] == "@xn--bcher-kva.example"
    for recipient in ("bob@b\u00fccher.example", "bob@xn--bcher-kva.example",
                      "bob@bu\u0308cher.example"):
        report = explain(config, recipient=recipient)
        assert (report["action"], report["reason"]) == (
            "accept", "whitelist:@xn--bcher-kva.example"), recipient
    for look_alike in ("bob@\uff42\u00fccher.example", "bob@b\u00fccher.example.evil.example"):
        report = explain(config, recipient=look_alike)
        assert (report["action"], report["reason"]) == ("reject", "relay-denied"), look_alike
    assert run(config, "add", "--recipient", "@\uff42\u00fccher.example").returncode == 1


def test_removing_an_absent_entry_says_so_and_exits_1(config):
    result = run(config, "remove", "--client", "192.0.2.9")
    assert one_line_error(result) == "greyd: not in the whitelist: client 192.0.2.9/32 (given as 192.0.2.9)"


def test_removing_a_name_that_import_stored_as_a_domain_names_the_stored_form(config, tmp_path):
    path = tmp_path / "whitelist_clients"
    path.write_text("google.com\n")
    assert run(config, "import", str(path)).returncode == 0
    assert one_line_error(run(config, "remove", "--hostname", "google.com")) == (
        "greyd: not in the whitelist: hostname google.com (stored as .google.com, the domain "
        "and every name under it: greyd whitelist remove --hostname .google.com)")
    assert [e["value"] for e in listed(config)] == [".google.com"]   # refused: nothing removed
    removed = run(config, "remove", "--hostname", ".google.com")
    assert removed.stdout == "removed: hostname .google.com\n"

    assert run(config, "add", "--hostname", "mx.example.com").returncode == 0
    assert one_line_error(run(config, "remove", "--hostname", ".mx.example.com")) == (
        "greyd: not in the whitelist: hostname .mx.example.com (stored as mx.example.com, "
        "that name only: greyd whitelist remove --hostname mx.example.com)")
    assert one_line_error(run(config, "remove", "--hostname", "other.example.com")) == \
        "greyd: not in the whitelist: hostname other.example.com"


def expiry(config: Path, value: str):
    [entry] = [e for e in listed(config) if e["value"] == value]
    return entry["expires"]


def test_re_adding_keeps_the_expiry_unless_told_and_says_what_happened(config):
    week = run(config, "add", "--sender", "@example.org", "--expires", "7d")
    assert week.returncode == 0 and week.stdout.startswith("added: sender @example.org, expires ")
    expires = expiry(config, "@example.org")
    shown = when(expires)

    again = run(config, "add", "--sender", "@example.org", "--comment", "partner")
    assert again.stdout == (f"already in the whitelist: sender @example.org, expires {shown}, "
                            "kept, comment updated\n")
    assert expiry(config, "@example.org") == expires

    forever = run(config, "add", "--sender", "@example.org", "--permanent")
    assert forever.stdout == (f"already in the whitelist: sender @example.org, expires {shown}, "
                              "now permanent\n")
    assert expiry(config, "@example.org") is None
    assert run(config, "add", "--sender", "@example.org").stdout == \
        "already in the whitelist: sender @example.org, permanent, kept\n"
    assert expiry(config, "@example.org") is None

    day = run(config, "add", "--sender", "@example.org", "--expires", "1d")
    assert day.stdout.startswith("already in the whitelist: sender @example.org, permanent, "
                                 "now expires ")
    assert abs(expiry(config, "@example.org") - (time.time() + 86400)) < 60

    both = run(config, "add", "--sender", "@example.org", "--permanent", "--expires", "7d")
    assert both.returncode == 2 and "--expires and --permanent exclude each other" in both.stderr
    assert abs(expiry(config, "@example.org") - (time.time() + 86400)) < 60


def test_re_adding_an_expired_entry_renews_it_as_a_new_one(config, any_database):
    with any_database.open() as store:
        store.add_whitelist("client", "192.0.2.0/24", expires=T, now=T - 60)
    renewed = run(config, "add", "--client", "192.0.2.0/24")
    assert renewed.stdout == ("already in the whitelist: client 192.0.2.0/24, "
                              f"expired {when(T)}, now permanent\n")
    assert expiry(config, "192.0.2.0/24") is None


def test_client_takes_leading_octets_as_import_does(tmp_path):
    config = write_config(tmp_path, 10025)
    added = run(config, "add", "--client", "127.0")
    assert added.stdout == "added: client 127.0.0.0/16 (given as 127.0)\n"
    path = tmp_path / "whitelist_clients"
    path.write_text("127.0\n")
    report = json.loads(run(config, "import", str(path), "--json").stdout)
    assert [(p["line"], p["value"]) for p in report["present"]] == [(1, "127.0.0.0/16")]
    report = explain(config, client="127.0.9.9")
    assert (report["action"], report["reason"]) == ("accept", "whitelist:127.0.0.0/16")
    removed = run(config, "remove", "--client", "127.0.")
    assert removed.stdout == "removed: client 127.0.0.0/16 (given as 127.0.)\n"
    assert one_line_error(run(config, "add", "--client", "127.300")) == \
        "greyd: --client: not an IP address or network: 127.300"


RECIPIENTS_FILE = """\
# postgrey whitelist_recipients
postmaster@                    # role accounts
abuse@localhost
example.org                    # the whole domain
/^postmaster@/
/^abuse@.*\\.example\\.net$/       # anchored as written
/^list-(/
"""


def test_recipient_patterns_are_imported_added_removed_and_matched(tmp_path, any_database):
    config = write_config(tmp_path, 10025,
                          relay={"domains": ["localhost", "example.net", ".example.net"]},
                          database=any_database.section)
    path = tmp_path / "whitelist_recipients"
    path.write_text(RECIPIENTS_FILE)
    result = run(config, "import", "--kind", "recipient", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "line 5: added: recipient /^postmaster@/" in lines
    assert "line 6: added: recipient /^abuse@.*\\.example\\.net$/" in lines
    assert lines[-2] == ("line 7: skipped: /^list-(/: regular expression /^list-(/ does not "
                         "compile: missing ), unterminated subpattern at position 6")
    assert lines[-1] == f"{path}: 5 added, 0 already present, 1 skipped"

    for recipient, reason in [
            ("Abuse@Lists.Example.NET", "whitelist:/^abuse@.*\\.example\\.net$/"),
            ("abuse@example.net", "new"),                   # the pattern wants a subdomain
            ("notabuse@lists.example.net", "new"),          # anchored at the start
            ("postmaster@lists.example.net", "whitelist:postmaster@"),
            ("bob@localhost", "new")]:
        assert explain(config, client="198.51.100.7", recipient=recipient)["reason"] == reason, \
            recipient

    added = run(config, "add", "--recipient", "/^BOB@/", "--comment", "pattern")
    assert added.stdout == "added: recipient /^BOB@/\n"
    assert explain(config, client="198.51.100.7")["reason"] == "whitelist:/^BOB@/"
    assert run(config, "remove", "--recipient", "/^BOB@/").stdout == "removed: recipient /^BOB@/\n"
    assert explain(config, client="198.51.100.7")["reason"] == "new"
    assert one_line_error(run(config, "add", "--recipient", "/bob(/")).startswith(
        "greyd: --recipient: regular expression /bob(/ does not compile: ")
    assert one_line_error(run(config, "add", "--sender", "/^alice@/")) == (
        "greyd: --sender: a /regex/ entry is for recipients and hostnames only: /^alice@/")


def test_expires_is_listed_and_an_expired_entry_no_longer_matches(config):
    assert explain(config)["action"] == "greylist"
    week = run(config, "add", "--client", "127.0.0.1", "--expires", "7d", "--comment", "trial")
    assert week.returncode == 0, week.stderr
    assert ", expires " in week.stdout
    [entry] = listed(config)
    assert abs(entry["expires"] - (time.time() + 7 * 86400)) < 60 and not entry["expired"]
    assert re.search(r"^client +127\.0\.0\.1/32 +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} +trial$",
                     run(config, "list").stdout, re.M)
    report = explain(config)
    assert (report["action"], report["reason"]) == ("accept", "whitelist:127.0.0.1/32")

    soon = run(config, "add", "--client", "127.0.0.1", "--expires", "1s")
    assert soon.returncode == 0 and soon.stdout.startswith("already in the whitelist")
    assert ", now expires " in soon.stdout
    time.sleep(1.1)
    report = explain(config)
    assert (report["action"], report["reason"]) == ("greylist", "new")
    [entry] = listed(config)
    assert entry["expired"] is True and entry["comment"] == "trial"
    assert re.search(r"^client +127\.0\.0\.1/32 +\S+ \S+ \S+ \(expired\) +trial$",
                     run(config, "list").stdout, re.M)


@pytest.mark.parametrize("args, message", [
    (["--client", "192.0.2.300"], "greyd: --client: not an IP address or network: 192.0.2.300"),
    (["--client", "10.0.0.0/33"], "greyd: --client: not an IP address or network: 10.0.0.0/33"),
    (["--hostname", "/mx(/"], "greyd: --hostname: regular expression /mx(/ does not compile: "),
    (["--sender", "a@b@c"], "greyd: --sender: expected user@domain, @domain or user@: a@b@c"),
    (["--recipient", "bob"], "greyd: --recipient: expected user@domain, @domain or user@: bob"),
    (["--client", "192.0.2.1", "--expires", "soon"], "greyd: --expires: must be a duration"),
    (["--client", "192.0.2.1", "--expires", "0"], "greyd: --expires: must be more than 0"),
    (["--client", "192.0.2.1", "--comment", "two\nlines"], "greyd: --comment: no control"),
])
def test_invalid_input_is_one_line_and_exit_1(plain_config, args, message):
    assert one_line_error(run(plain_config, "add", *args)).startswith(message)
    assert listed(plain_config) == []


@pytest.mark.parametrize("args", [
    [], ["--client", "192.0.2.1", "--sender", "@example.org"], ["--comment", "nothing"]])
def test_not_exactly_one_selector_is_a_usage_error(plain_config, args):
    config = plain_config
    for command in ("add", "remove"):
        if command == "remove" and "--comment" in args:
            continue
        result = run(config, command, *args)
        assert result.returncode == 2
        assert "give exactly one of --client, --hostname, --sender, --recipient" in result.stderr
        assert "Traceback" not in result.stderr


def test_every_command_shows_an_example_in_its_help(plain_config):
    config = plain_config
    for command in ([], ["add"], ["remove"], ["list"], ["import"]):
        result = run(config, *command, "--help")
        assert result.returncode == 0
        assert re.search(r"^  Examples?:\n    greyd whitelist ", result.stdout, re.M), command


# -- import --------------------------------------------------------------------------

CLIENTS_FILE = """\
# postgrey whitelist_clients, as an operator might have it
   # an indented comment

192.0.2.7            # one address
198.51.100.0/24
10.1                 # leading octets: 10.1.0.0/16
2001:db8:25::/48
example.com          # the domain and every name under it
mail.example.net
/^mx[0-9]+\\.example\\.org$/
/unclosed(/
300.1.2.3
bad!name
192.0.2.7            # again
"""


def test_import_reports_added_present_and_skipped_lines(config, tmp_path):
    path = tmp_path / "whitelist_clients"
    path.write_text(CLIENTS_FILE)
    result = run(config, "import", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(a["line"], a["kind"], a["value"]) for a in report["added"]] == [
        (4, "client", "192.0.2.7/32"), (5, "client", "198.51.100.0/24"),
        (6, "client", "10.1.0.0/16"), (7, "client", "2001:db8:25::/48"),
        (8, "hostname", ".example.com"), (9, "hostname", ".mail.example.net"),
        (10, "hostname", r"/^mx[0-9]+\.example\.org$/")]
    assert [(p["line"], p["value"]) for p in report["present"]] == [(14, "192.0.2.7/32")]
    assert [(s["line"], s["text"]) for s in report["skipped"]] == [
        (11, "/unclosed(/"), (12, "300.1.2.3"), (13, "bad!name")]
    assert "does not compile" in report["skipped"][0]["reason"]
    assert "not an IP address" in report["skipped"][1]["reason"]
    assert "not a valid domain name" in report["skipped"][2]["reason"]
    assert {e["comment"] for e in listed(config)} == {f"imported from {path}"}

    again = run(config, "import", str(path))
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[-1] == f"{path}: 0 added, 8 already present, 3 skipped"
    assert "line 4: already present: client 192.0.2.7/32" in lines
    assert [line for line in lines if "skipped:" in line] == [
        "line 11: skipped: /unclosed(/: regular expression /unclosed(/ does not compile: "
        "missing ), unterminated subpattern at position 8",
        "line 12: skipped: 300.1.2.3: client: not an IP address or network: 300.1.2.3",
        "line 13: skipped: bad!name: hostname: not a valid domain name: bad!name"]
    assert len(listed(config)) == 7


def test_import_of_recipients_with_a_comment_of_ones_own(config, tmp_path):
    path = tmp_path / "whitelist_recipients"
    path.write_bytes(b"postmaster@\nexample.com\n@example.net\nbob@example.org\n"
                     b"/^list-.*@/\na@b@c\nbad\xff@example.org\n/list-(/\n")
    result = run(config, "import", "--kind", "recipient", "--comment", "from postgrey",
                 str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [a["value"] for a in report["added"]] == [
        "postmaster@", "@example.com", "@example.net", "bob@example.org", "/^list-.*@/"]
    assert [(s["line"], s["reason"].split(":")[0]) for s in report["skipped"]] == [
        (6, "address"), (7, "address"), (8, "regular expression /list-(/ does not compile")]
    assert {(e["kind"], e["comment"]) for e in listed(config)} == {("recipient", "from postgrey")}


def test_an_unreadable_import_file_is_one_line_and_exit_1(plain_config, tmp_path):
    missing = tmp_path / "nowhere"
    assert one_line_error(run(plain_config, "import", str(missing))) == \
        f"greyd: cannot read {missing}: No such file or directory"


def test_the_shipped_whitelists_import_cleanly(config):
    for kind, name in (("client", "whitelist_clients"), ("recipient", "whitelist_recipients")):
        result = run(config, "import", "--kind", kind, str(ETC / name), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["skipped"] == [] and report["present"] == []
        assert report["added"]
    values = {(e["kind"], e["value"]) for e in listed(config)}
    assert {("recipient", "postmaster@"), ("recipient", "abuse@"),
            ("hostname", ".google.com")} <= values
    assert {kind for kind, _ in values} == {"hostname", "recipient"}


# -- live: a running daemon sees the change at the next RCPT ------------------------

LIVE = {
    "client": [("--client", "127.0.0.1", "127.0.0.1/32"),
               ("--client", "127.0.0.0/8", "127.0.0.0/8")],
    "sender": [("--sender", "alice@example.net", "alice@example.net"),
               ("--sender", "@Example.NET", "@example.net"),
               ("--sender", "alice@", "alice@")],
    "recipient": [("--recipient", "bob@localhost", "bob@localhost"),
                  ("--recipient", "@localhost", "@localhost"),
                  ("--recipient", "bob@", "bob@"),
                  ("--recipient", "/^BOB@local/", "/^BOB@local/")],
}


@pytest.mark.parametrize("kind", sorted(LIVE))
def test_a_running_daemon_sees_adds_and_removes_at_the_next_rcpt(tmp_path, upstream, port, kind):
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "1h"})
    with Foreground(config) as daemon:
        wait_listening(port)
        first, _ = deliver(port, "alice@example.net", "bob@localhost", BODY)
        assert first[0] == 451 and first[1].startswith(b"4.7.1 Greylisted")
        for number, (option, given_as, stored) in enumerate(LIVE[kind], 1):
            assert greyd("whitelist", "add", option, given_as, config=config).returncode == 0
            rcpt, data = deliver(port, "alice@example.net", "bob@localhost", BODY)
            assert rcpt == (250, b"2.1.5 OK") and data[0] == 250, stored
            [*_, message] = upstream.wait_for(number)
            assert message.rcpt_tos == ["bob@localhost"] and message.data.endswith(BODY)

            assert greyd("whitelist", "remove", option, given_as, config=config).returncode == 0
            rcpt, data = deliver(port, "alice@example.net", "bob@localhost", BODY)
            assert rcpt[0] == 451 and data is None, stored
        assert daemon.stop() == 0
    assert len(upstream.messages) == len(LIVE[kind])
    reasons = re.findall(r" decision .*reason=(\S+)", daemon.stderr)
    expected = ["new"]
    for _, _, stored in LIVE[kind]:
        expected += [f"whitelist:{stored}", "too-early"]
    assert reasons == expected
