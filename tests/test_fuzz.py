"""Fuzzing: path parsing, command lines and whole sessions (SPEC §4, §9).

Hypothesis properties over greyd.address and over what an in-process greyd
answers to generated command lines (derandomized, no example database, so
a run is repeatable and writes nothing). Then a session fuzzer: thousands
of sessions of random bytes and mutated SMTP dialogues, from a fixed seed,
against the real daemon in a subprocess, which must still serve a normal
client afterwards and be back at its baseline of threads and descriptors.
"""

from __future__ import annotations

import queue
import random
import re
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import until
from daemon import BASE_THREADS, Foreground, config_for, descriptors, threads, wait_listening
from greyd import replies
from greyd.address import MAX_PATH, PathError, parse, parse_params
from greyd.pool import KEEP as POOL_KEEP
from smtpclient import Raw, deliver, greetings
from upstream import free_port

pytestmark = pytest.mark.timeout(120)

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SESSION_PROPERTY = settings(PROPERTY, max_examples=300)

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\x20-\x7e\x80-\xff]*)\r\n")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
COMMAND_LIMIT = 512 + 26 + 15          # greyd.smtp: the longest MAIL line greyd reads whole


# -- strategies ---------------------------------------------------------------------------------

ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"
NASTY = "\r\n\0 \t<>\"\\@:,.[]()=\x7f\xe9"
INJECT = " \r\n\0\t<>\"\\@"       # what could end a path early or split a line
DOT_STRING = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}){0,3}"
QUOTED_STRING = r'"([ !#-\[\]-~]|\\[ -~]){0,10}"'
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?"
DOMAIN = rf"{LABEL}(\.{LABEL}){{0,3}}"
LITERAL = r"\[(IPv6:)?[0-9a-f.:]{1,20}\]"


def pieces(alphabet: str, max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, max_size=max_size)


def mostly(valid: st.SearchStrategy, *others: st.SearchStrategy) -> st.SearchStrategy:
    """Usually `valid` (six draws in seven or more), else one of `others`.

    (st.one_of with `valid` repeated would not weigh it: equal branches merge.)
    """
    return st.sampled_from([valid] * 6 + list(others)).flatmap(lambda chosen: chosen)


def regex(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


def injected(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid piece with one troublesome character slipped in somewhere."""
    return st.tuples(valid, st.sampled_from(INJECT), st.integers(0, 80)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, drawn about as often as its weight says."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda chosen: chosen)


# Near-valid paths, so that many parse and the edges get explored; plus pure noise.
valid_local = st.one_of(regex(DOT_STRING), regex(QUOTED_STRING))
valid_domain = st.one_of(regex(DOMAIN), regex(LITERAL))
local_parts = weighted(
    (4, valid_local),
    (2, injected(valid_local)),
    (1, pieces(ATEXT + NASTY, 12)),
    (1, st.sampled_from(["postmaster", "PostMaster", "", "a..b", ".a", "a.", "a" * 65, '"a\\"'])),
)
domains = weighted(
    (4, valid_domain),
    (2, injected(valid_domain)),
    (1, pieces(ATEXT + NASTY, 12)),
    (1, st.sampled_from(["", "a-.b", "-a.b", "a..b", "[]", "[a]b", "a" * 64 + ".example" * 30])),
)
mailboxes = mostly(
    st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains),
    st.builds(lambda local, at, domain: local + at + domain,
              local_parts, st.sampled_from(["", "@@", "@@@"]), domains),
    st.sampled_from(["postmaster", "Postmaster", "POSTMASTER ", ""]),
)
routes = mostly(st.just(""), st.sampled_from(["@a.example:", "@a.example,@b.example:", "@:",
                                              "@a.example,:", "@[1.2.3.4]:"]))
paths = mostly(
    st.builds(lambda route, box: f"<{route}{box}>", routes, mailboxes),
    st.builds(lambda open_, route, box, close: open_ + route + box + close,
              st.sampled_from(["", "<<", " <", "< ", "<\"", "<("]), routes, mailboxes,
              st.sampled_from(["", ">>", " >", ">x", "\">"])),
)
params = mostly(
    st.lists(st.sampled_from(["SIZE=100", "BODY=8BITMIME", "BODY=7bit", "SIZE=0", "X-Y=z",
                              "FOO"]), max_size=2).map(" ".join),
    st.lists(st.one_of(
        st.sampled_from(["SIZE", "SIZE=", "=1", "SIZE=99999999999999999999999", "SIZE=\uff11",
                         "AUTH=<>", "a=b=c", "-X=1", "BODY=8BITMIME BODY=7BIT"]),
        pieces(ATEXT + NASTY, 15)), min_size=1, max_size=3).map(" ".join),
)


def arguments_for(*keywords: str) -> st.SearchStrategy[str]:
    """MAIL/RCPT arguments: mostly near-valid ones with one of `keywords`, else noise."""
    near_valid = st.builds(
        lambda keyword, colon, path, gap, rest: keyword + colon + path + (gap + rest if rest else ""),
        mostly(st.sampled_from(keywords), st.sampled_from([" FROM", "TO ", "FRO", "", "TOO"])),
        mostly(st.just(":"), st.sampled_from(["", "::", ": ", " :"])), paths,
        mostly(st.just(" "), st.sampled_from(["", "  ", "\t"])), params)
    return st.sampled_from([
        near_valid, near_valid, near_valid,
        st.text(max_size=80),                                    # any Unicode
        st.binary(max_size=80).map(lambda b: b.decode("utf-8", "surrogateescape")),  # as greyd reads
    ]).flatmap(lambda chosen: chosen)


# -- address.parse and parse_params -------------------------------------------------------------

def outside_quotes(text: str) -> str:
    return QUOTED.sub("", text)


def assert_clean_path(address: str) -> None:
    """Printable, UTF-8 (RFC 6531: nothing that was not UTF-8 on the wire)."""
    assert address.isprintable(), repr(address)
    assert len(address.encode("utf-8")) <= MAX_PATH
    bare = outside_quotes(address)
    for forbidden in ("\r", "\n", "\0", " ", "\t", "<", ">"):
        assert forbidden not in bare, (forbidden, address)
    assert not any(ch in address for ch in "\r\n\0"), repr(address)


def assert_clean_params(found: dict) -> None:
    for key, value in found.items():
        assert re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", key), repr(key)
        if value is not None:
            assert value and value.isprintable(), repr(value)
            value.encode("utf-8")                       # no surrogates
            assert not any(ch in value for ch in " =\r\n\0"), repr(value)


@settings(PROPERTY, max_examples=1000)
@given(arg=arguments_for("FROM", "TO", "from", "To"))
@example(arg="FROM:<a b@example.net>")
@example(arg="TO:<a@example.net b>")
@example(arg="TO:<a@example.net>\r\nRCPT TO:<b@example.net>")
@example(arg='FROM:<"a\\"b>"@example.net> SIZE=1')
@example(arg='FROM:<"a>b"@example.net>')
@example(arg="TO:<@a.example:postmaster>")
@example(arg="FROM:<a@example.net> SIZE=1\0")
def test_parse_raises_only_path_errors_and_returns_clean_paths(arg):
    for keyword, null_ok, bad in (("FROM", True, replies.BAD_SENDER),
                                  ("TO", False, replies.BAD_RECIPIENT)):
        try:
            path = parse(arg, keyword, null_ok=null_ok, bad=bad)
        except PathError as error:
            assert error.reply in (replies.SYNTAX, bad, replies.BAD_PARAMETER)
            continue
        if path.address == "":
            assert null_ok
        else:
            assert_clean_path(path.address)
            again = parse(f"{keyword}:<{path.address}>", keyword, null_ok=null_ok, bad=bad)
            assert again.address == path.address and again.params == {}   # stable round trip
        assert_clean_params(path.params)


@settings(PROPERTY, max_examples=1000)
@given(text=st.one_of(params.map(lambda p: " " + p), st.text(max_size=60),
                      st.binary(max_size=60).map(lambda b: b.decode("ascii", "surrogateescape"))))
def test_parse_params_raises_only_path_errors_and_returns_clean_words(text):
    try:
        found = parse_params(text)
    except PathError as error:
        assert error.reply == replies.BAD_PARAMETER
        return
    assert_clean_params(found)


# -- an oracle for MAIL and RCPT lines that is not greyd's parser ------------------------------
# RFC 5321's grammar (4.1.1.2, 4.1.1.3, 4.1.2, 4.1.3) and limits (4.5.3.1), written out here
# from the RFC, so that a bug in greyd.address cannot agree with itself. Where greyd is
# lenient on purpose, so is the oracle: spaces around "FROM:" / "TO:" and between
# parameters, an address literal's content taken as dcontent whatever its tag, a source
# route before <postmaster> (greyd drops routes, 4.1.1.3), and the path's 256 octets counted
# between its angle brackets. Where greyd is strict on purpose, so is the oracle: no
# RFC 2047 encoded-word in a path (RFC 2047 5).

ATEXT_SET = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"                       # RFC 5322 3.2.3
DOT_STRING_SMTP = rf"[{ATEXT_SET}]+(?:\.[{ATEXT_SET}]+)*"
QUOTED_STRING_SMTP = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'  # qtext, quoted-pair
SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"          # Let-dig [Ldh-str]
DOMAIN_SMTP = rf"{SUB_DOMAIN}(?:\.{SUB_DOMAIN})*"
ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"                      # "[" 1*dcontent "]"
AT_DOMAIN = rf"@(?:{DOMAIN_SMTP}|{ADDRESS_LITERAL})"
ROUTE = rf"{AT_DOMAIN}(?:,{AT_DOMAIN})*:"                          # A-d-l ":"
MAILBOX_PATH = (rf"<(?P<route>{ROUTE})?(?P<local>{DOT_STRING_SMTP}|{QUOTED_STRING_SMTP})"
                rf"@(?P<domain>{DOMAIN_SMTP}|{ADDRESS_LITERAL})>")
ESMTP_PARAM = r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?"
COMMANDS = {  # verb: (keyword, the path besides a mailbox)
    "MAIL": ("FROM", "<>"),
    "RCPT": ("TO", rf"<(?:{ROUTE})?(?i:postmaster)>"),
}
ENCODED_WORD = re.compile(r"=\?[^?]*\?[^?]*\?[^?]*\?=")
RCPT_LIMIT = 512                        # octets of a command line, CRLF included (4.5.3.1.4)
# What greyd answers a line it cannot parse: its own syntax refusals, as read_reply reads them.
SYNTAX_REFUSALS = [[reply.encode()] for reply in (
    replies.SYNTAX, replies.BAD_SENDER, replies.BAD_RECIPIENT, replies.BAD_PARAMETER,
    replies.BAD_CHARACTERS, replies.LINE_TOO_LONG)]


def well_formed(line: bytes, verb: str) -> re.Match | None:
    """A MAIL FROM or RCPT TO command line (CRLF included) as RFC 5321 reads it: the
    match, with its `params`, when it keeps the grammar and the limits; else None."""
    keyword, special = COMMANDS[verb]
    text = line.decode("latin-1")                # one character per octet; 8-bit ones match nothing
    found = re.fullmatch(rf"(?i:{verb}) +(?i:{keyword}) *: *(?:{special}|{MAILBOX_PATH})"
                         rf"(?P<params>(?: +{ESMTP_PARAM})*) *\r\n", text)
    if found is None or found["local"] is None:
        return found
    local, domain, route = found["local"], found["domain"], found["route"] or ""
    if len(local) > 64 or len(domain) > 255 or len(route + local + "@" + domain) > 256:
        return None
    if ENCODED_WORD.search(f"{local}@{domain}"):
        return None
    return found


def test_the_oracle_knows_rfc_5321_paths():
    good = [b"MAIL FROM:<>", b"mail from:<a.b@example.net> SIZE=10 BODY=8BITMIME",
            b'MAIL FROM:<"a b>c"@example.net>', b"MAIL FROM:<a@[192.0.2.1]>",
            b"MAIL FROM: <@a.example,@b.example:a@example.net>", b"RCPT TO:<Postmaster>",
            b"RCPT TO:<bob@localhost>", b"RCPT  TO :<@a.example:postmaster>",
            b"MAIL FROM:<" + b"a" * 64 + b"@example.net>"]
    bad = [b"MAIL FROM:<a b@example.net>", b"MAIL FROM:<a..b@example.net>",
           b"MAIL FROM:<.a@example.net>", b"MAIL FROM:<a@-example.net>",
           b"MAIL FROM:<a@example-.net>", b"MAIL FROM:<a@example.net.>", b"MAIL FROM:<a@>",
           b'MAIL FROM:<"a@example.net>', b"MAIL FROM:<a@example.net", b"MAIL FROM:a@example.net",
           b"MAIL FROM:<a@[]>", b"MAIL FROM:<postmaster>", b"RCPT TO:<>",
           b"MAIL FROM:<a@example.net>SIZE=1", b"MAIL FROM:<a@example.net> SIZE=",
           b"MAIL FROM:<a@example.net> =1", b"MAIL FROM:<@a.example:>", b"RCPT TO:<a@b@c>",
           b"MAIL FROM:<" + b"a" * 65 + b"@example.net>", b"MAIL FROM:<a\xe9@example.net>",
           b"MAIL FROM:<a@" + b"b." * 127 + b"cc>", b"MAIL FROM:<=?utf-8?q?a?=@example.net>",
           b"MAIL FROM:<a@example.net>\0", b"MAIL FROM:<a\r@example.net>", b"MAIL TO:<a@b>",
           b"RCPT FROM:<a@b>"]
    for line in good:
        assert well_formed(line + b"\r\n", line[:4].upper().decode()), line
    for line in bad:
        assert not well_formed(line + b"\r\n", line[:4].upper().decode()), line


# -- command lines against greyd in this process ------------------------------------------------

def read_reply(raw: Raw) -> list[bytes]:
    """The raw lines of one reply, checked for RFC 5321 4.2 form; [] at end of stream."""
    lines = []
    while True:
        try:
            line = raw.file.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            assert not lines, f"reply cut short: {lines}"
            return lines
        match = REPLY_LINE.fullmatch(line)
        assert match, f"malformed reply line {line!r}"
        assert not lines or line[:3] == lines[0][:3], f"codes differ within a reply: {lines + [line]}"
        lines.append(line)
        if match.group(2) == b" ":
            return lines


def code_of(lines: list[bytes]) -> int:
    return int(lines[-1][:3]) if lines else 0


def one_line(arg) -> bytes:
    """An argument as it goes on the wire, without LF (one line, one reply)."""
    raw = arg if isinstance(arg, bytes) else arg.encode("utf-8", "surrogateescape")
    return raw.replace(b"\n", b"")


@pytest.fixture
def fuzzed_greyd(start_greyd, upstream):
    return start_greyd(upstream.port, server={"command_timeout": 5, "data_timeout": 5})


def answer(g, line: bytes) -> list[bytes]:
    """greyd's reply to one MAIL or RCPT line in a session of its own, after EHLO (and,
    for RCPT, a MAIL it accepts); the session must go on after it."""
    with g.raw() as c:
        c.send(b"EHLO fuzz.example\r\n")
        assert code_of(read_reply(c)) == 250
        if line.startswith(b"RCPT "):
            c.send(b"MAIL FROM:<fuzz@example.net>\r\n")
            assert read_reply(c) == [replies.SENDER_OK.encode()]
        c.send(line)
        reply = read_reply(c)
        c.send(b"NOOP\r\n")                                   # the session goes on
        assert read_reply(c) == [replies.OK.encode()]
    return reply


def test_no_malformed_mail_line_gets_a_2xx(fuzzed_greyd):
    """A MAIL line the oracle finds malformed gets greyd's own syntax refusal, never a
    2xx; a well-formed one without parameters gets 250 Sender OK."""
    @SESSION_PROPERTY
    @given(arg=st.one_of(arguments_for("FROM", "from"), st.binary(max_size=COMMAND_LIMIT + 40)))
    @example(arg="FROM:<a b@example.net>")
    @example(arg="FROM:<a@-example.net>")
    @example(arg='FROM:<"a@example.net>')
    @example(arg='FROM:<"a b>c"@example.net>')
    @example(arg="FROM:<@a.example,@b.example:a@[192.0.2.1]>")
    def check(arg):
        line = b"MAIL " + one_line(arg) + b"\r\n"
        reply = answer(fuzzed_greyd, line)
        found = well_formed(line, "MAIL")
        if found is None:
            assert reply in SYNTAX_REFUSALS, (line, reply)
        elif not found["params"].strip(" ") and len(line) <= COMMAND_LIMIT:
            assert reply == [replies.SENDER_OK.encode()], (line, reply)
    check()


def test_no_malformed_rcpt_line_gets_a_2xx(fuzzed_greyd):
    """An RCPT line the oracle finds malformed gets greyd's own syntax refusal, so it
    reaches neither the policy nor the upstream; a well-formed one without parameters
    is never refused as syntax."""
    @SESSION_PROPERTY
    @given(arg=st.one_of(arguments_for("TO", "to"), st.binary(max_size=COMMAND_LIMIT)))
    @example(arg="TO:<a b@localhost>")
    @example(arg="TO:<a@localhost.>")
    @example(arg="TO:<a..b@localhost>")
    @example(arg="TO:<@a.example:postmaster>")
    @example(arg='TO:<"a b"@localhost>')
    def check(arg):
        line = b"RCPT " + one_line(arg) + b"\r\n"
        reply = answer(fuzzed_greyd, line)
        found = well_formed(line, "RCPT")
        if found is None:
            assert reply in SYNTAX_REFUSALS, (line, reply)
        elif not found["params"].strip(" ") and len(line) <= RCPT_LIMIT:
            assert reply not in SYNTAX_REFUSALS, (line, reply)
    check()


VERBS = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT",
         "EXPN", "STARTTLS", "AUTH", "BDAT", "XCLIENT", "helo", "Mail", "", "DATA\0"]


def test_every_reply_to_any_command_line_is_well_formed(fuzzed_greyd):
    printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                        max_size=600)
    command_lines = st.one_of(
        st.builds(lambda verb, gap, arg: verb.encode() + gap + one_line(arg),
                  st.sampled_from(VERBS), st.sampled_from([b" ", b"", b"  ", b"\t"]),
                  st.one_of(arguments_for("FROM", "TO"), printable)),
        st.binary(max_size=700).map(lambda b: b.replace(b"\n", b"")),
    )

    @SESSION_PROPERTY
    @given(line=command_lines)
    def check(line):
        with fuzzed_greyd.raw() as c:
            c.send(line + b"\r\n")
            reply = read_reply(c)
            code = code_of(reply)
            assert code, f"no reply to {line!r}"
            if code in (221, 421):                       # QUIT, or the session was ended
                assert c.closed()
                return
            c.send(b"NOOP\r\n")
            assert read_reply(c) == [replies.OK.encode()], line
    check()


# -- the session fuzzer against the real daemon -------------------------------------------------

SEED = 1234
SESSIONS = 2400
WORKERS = 8
SOURCES = [f"127.0.0.{10 + n}" for n in range(WORKERS)]
TRUSTED = SOURCES[WORKERS // 2:]        # half the workers relay straight to the upstream
BUDGET = 80.0                           # seconds: no new session starts after this
PER_CLIENT = 20                         # max_connections_per_client's default
READ_TIMEOUT = 2.0                      # bound on every socket operation of a session

SENDERS = [b"alice@example.net", b"", b"bounce-1234@lists.example.com", b'"odd user"@example.net',
           b"@relay.example:carol@example.net", b"Postmaster@example.net"]
RECIPIENTS = [b"bob@localhost", b"postmaster", b"Postmaster@localhost", b"victim@elsewhere.example",
              b"bob@example.org", b"abuse@localhost"]
BODIES = [
    [b"Subject: hello", b"", b"Hello."],
    [b"Subject: dots", b"", b".leading dot", b"..", b". ", b"end"],
    [b"Subject: smuggling", b"", b"a\n.\nMAIL FROM:<evil@example.com>", b"b\r.\rRCPT TO:<x@y>",
     b"c\r\n.\r\nDATA"],
    [b"Subject: 8bit", b"", bytes(range(128, 256)), b"\0\x01\x02"],
    [b"Subject: long", b"", b"x" * 3000],
]
INSERTS = [b"\r", b"\n", b"\0", b"\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\xff", b" ", b":<>"]


@dataclass
class Plan:
    """One fuzz session: what to send, how, and how to leave."""

    chunks: list[bytes]
    greet: bool          # wait for the greeting before sending
    pause: float         # seconds to listen between chunks (0: a pipelined burst)
    listen: float        # seconds of quiet to wait for after the last chunk (0: leave at once)
    reset: bool          # leave with a TCP reset instead of a close


def dialogue(rng: random.Random) -> list[bytes]:
    """A valid SMTP dialogue, one command or body line per item, no line ends."""
    lines = [rng.choice([b"EHLO client.example.net", b"HELO client.example.net", b"ehlo x"])]
    for _ in range(rng.randint(1, 3)):
        params = rng.choice([b"", b" SIZE=100", b" BODY=8BITMIME", b" SIZE=99999999999"])
        lines.append(b"MAIL FROM:<%s>%s" % (rng.choice(SENDERS), params))
        lines += [b"RCPT TO:<%s>" % r for r in rng.sample(RECIPIENTS, rng.randint(1, 3))]
        if rng.random() < 0.7:
            lines += [b"DATA", *rng.choice(BODIES), b"."]
        else:
            lines.append(rng.choice([b"RSET", b"NOOP", b"VRFY bob", b"HELP", b"DATA"]))
    lines.append(b"QUIT")
    return lines


def mutate(rng: random.Random, line: bytes) -> bytes:
    kind = rng.randrange(7)
    at = rng.randint(0, len(line))
    if kind == 0 and line:                               # flip a byte
        at = rng.randrange(len(line))
        return line[:at] + bytes([rng.randrange(256)]) + line[at + 1:]
    if kind == 1:                                        # insert CR, LF, NUL, a dot line ...
        return line[:at] + rng.choice(INSERTS) + line[at:]
    if kind == 2:                                        # truncate
        return line[:at]
    if kind == 3:                                        # over-long
        return line + b"A" * rng.choice([500, 600, 5000, 70000])
    if kind == 4:                                        # 8-bit noise
        return line[:at] + rng.randbytes(rng.randint(1, 8)) + line[at:]
    if kind == 5:                                        # doubled
        return line + b"\r\n" + line
    return b""                                           # dropped


def plan(rng: random.Random) -> Plan:
    kind = rng.random()
    if kind < 0.2:                                       # random bytes
        chunks = [rng.randbytes(rng.randint(1, 2000)) for _ in range(rng.randint(1, 3))]
    elif kind < 0.3:                                     # random printable lines
        chunks = [b"".join(bytes(rng.choices(range(32, 127), k=rng.randint(0, 80))) + b"\r\n"
                           for _ in range(rng.randint(1, 15)))]
    else:                                                # a dialogue, mutated
        lines = dialogue(rng)
        rate = rng.choice([0.0, 0.05, 0.2, 0.5])
        lines = [mutate(rng, line) if rng.random() < rate else line for line in lines]
        end = rng.choices([b"\r\n", b"\n", b"\r"], weights=[90, 5, 5])[0]
        stream = b"".join(line + end for line in lines)
        if rng.random() < 0.2:                           # early disconnect, maybe mid-line
            stream = stream[:rng.randint(0, len(stream))]
        if rng.random() < 0.5:                           # a pipelined burst
            chunks = [stream]
        else:                                            # line by line
            chunks = [chunk + b"\n" for chunk in stream.split(b"\n")]
            chunks[-1] = chunks[-1][:-1]
    return Plan(chunks=[c for c in chunks if c], greet=rng.random() < 0.8,
                pause=rng.choice([0.0, 0.0, 0.01, 0.05]), listen=rng.choice([0.0, 0.1, 0.3]),
                reset=rng.random() < 0.1)


def drain(sock: socket.socket, received: bytearray, quiet: float, cap: float,
          line: bool = False) -> bool:
    """Read what comes until `quiet` seconds pass without data, or a whole line when
    `line`; at most `cap` seconds. False at end of stream."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], quiet)
        if not ready:
            return True
        chunk = sock.recv(65536)
        if not chunk:
            return False
        received += chunk
        if line and received.endswith(b"\r\n"):
            return True
    return True


def run_session(port: int, source: str, plan: Plan) -> bytes:
    """Play one plan against greyd; everything greyd sent back."""
    received = bytearray()
    sock = socket.socket()
    sock.settimeout(READ_TIMEOUT)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        if plan.greet and not drain(sock, received, READ_TIMEOUT, READ_TIMEOUT, line=True):
            return bytes(received)
        for chunk in plan.chunks:
            sock.sendall(chunk)
            if plan.pause and not drain(sock, received, plan.pause, READ_TIMEOUT):
                return bytes(received)
        if plan.listen:
            drain(sock, received, plan.listen, READ_TIMEOUT)
    except OSError:
        pass                               # reset, broken pipe, timeout: greyd hung up on us
    finally:
        if plan.reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return bytes(received)


def malformed_output(received: bytes) -> list[bytes]:
    """The complete lines greyd sent that are not well-formed reply lines."""
    lines = received.split(b"\r\n")[:-1]   # the last piece may be cut by our leaving
    bad = [line for line in lines if not REPLY_LINE.fullmatch(line + b"\r\n")]
    if re.search(rb"(?<!\r)\n|\r(?!\n)", received.rpartition(b"\r\n")[0]):
        bad.append(b"bare CR or LF in " + received[:200])
    return bad


def fuzz(port: int, plans: list[Plan]) -> dict:
    """Run the plans over WORKERS threads; figures and problems found."""
    work: queue.Queue[tuple[int, Plan]] = queue.Queue()
    for item in enumerate(plans):
        work.put(item)
    stats = {"sessions": 0, "bytes_sent": 0, "replies": {}, "problems": []}
    lock = threading.Lock()
    started = time.monotonic()

    def worker(source: str) -> None:
        while time.monotonic() - started < BUDGET:
            try:
                n, current = work.get_nowait()
            except queue.Empty:
                return
            received = run_session(port, source, current)
            codes = re.findall(rb"^([2-5][0-9][0-9]) ", received, re.M)
            with lock:
                stats["sessions"] += 1
                stats["bytes_sent"] += sum(map(len, current.chunks))
                for code in codes:
                    stats["replies"][int(code)] = stats["replies"].get(int(code), 0) + 1
                stats["problems"] += [(n, line[:120]) for line in malformed_output(received)]

    pool = [threading.Thread(target=worker, args=(source,), daemon=True) for source in SOURCES]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(BUDGET + 2 * READ_TIMEOUT + 5)
    stats["seconds"] = time.monotonic() - started
    return stats


@pytest.mark.timeout(180)
def test_session_fuzzer_leaves_greyd_serving_at_its_baseline(tmp_path, upstream):
    port = free_port()
    config = config_for(tmp_path, upstream.port, port,
                        server={"command_timeout": 5, "data_timeout": 5},
                        relay={"domains": ["localhost"],
                               "clients": [f"{source}/32" for source in TRUSTED]})
    database = str(tmp_path / "var/greyd.db")
    rng = random.Random(SEED)
    plans = [plan(rng) for _ in range(SESSIONS)]
    body = b"Subject: after the fuzz\r\n\r\nStill here.\r\n"

    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        warm = deliver(port, "warm@example.net", "bob@localhost", body, source=TRUSTED[0])
        assert warm[1][0] == 250                             # pools a store connection
        assert until(lambda: threads(pid) == BASE_THREADS, 10)
        base_fds = descriptors(pid, database)

        stats = fuzz(port, plans)
        figures = (f"{stats['sessions']} sessions in {stats['seconds']:.1f} s, "
                   f"{stats['bytes_sent']} bytes sent, {len(upstream.messages)} messages relayed, "
                   f"replies {dict(sorted(stats['replies'].items()))}")
        print(f"\nsession fuzzer: {figures}")

        assert daemon.proc.poll() is None, f"greyd died under the fuzzer ({figures})"
        assert stats["sessions"] >= 2000, figures
        assert stats["problems"] == [], figures
        before = len(upstream.messages)
        rcpt, data = deliver(port, "after@example.net", "bob@localhost", body, source=TRUSTED[0])
        assert rcpt == (250, b"2.1.5 OK") and data == (250, b"2.0.0 OK queued"), figures
        message = upstream.wait_for(before + 1)[-1]
        assert message.mail_from == "after@example.net" and message.data.endswith(body)
        assert until(lambda: threads(pid) == BASE_THREADS, 30), (threads(pid), figures)
        # Sockets and other files exactly as before; the store pool may keep a few more
        # connections open after concurrent decisions, but never more than its bound (8).
        now = {}
        assert until(lambda: (now.update(descriptors(pid, database)) or
                              (now["socket"], now["other"]) ==
                              (base_fds["socket"], base_fds["other"])), 10), (now, base_fds)
        assert now["database"] <= POOL_KEEP * base_fds["database"], (now, base_fds)
        # No admission slot leaked: each fuzzing address gets its full share again.
        for source in (SOURCES[0], TRUSTED[0]):
            again = greetings(port, PER_CLIENT, source=source)
            assert [code for code, _ in again] == [220] * PER_CLIENT, source
        for got in upstream.messages:                        # smuggling-proof under fuzz
            assert not re.search(rb"(?<!\r)\n|\r(?!\n)", got.data), got.data[:300]
        assert daemon.stop() == 0
    ends = Counter(re.findall(r" session end .* end=(\S+)", daemon.stderr))
    print(f"session ends by reason: {dict(ends)}")
    for trouble in ("Traceback", "Exception", "internal error", "Logging error"):
        assert trouble not in daemon.stderr, daemon.stderr[daemon.stderr.find(trouble) - 500:][:3000]
