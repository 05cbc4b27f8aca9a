"""greyd.address: SMTP paths and ESMTP parameters (RFC 5321 4.1.2, 4.1.1.2-3)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greyd import replies
from greyd.address import MAX_LOCAL, MAX_PATH, Path, PathError, parse, parse_params

pytestmark = pytest.mark.timeout(30)


def mail(arg):
    return parse(arg, "FROM", null_ok=True, bad=replies.BAD_SENDER)


def rcpt(arg):
    return parse(arg, "TO", null_ok=False, bad=replies.BAD_RECIPIENT)


def error_of(call, arg):
    with pytest.raises(PathError) as caught:
        call(arg)
    assert str(caught.value) == caught.value.reply.text
    return caught.value.reply


# -- good paths -----------------------------------------------------------------

@pytest.mark.parametrize("arg, address", [
    ("FROM:<a@b.example>", "a@b.example"),
    ("from:<a@b.example>", "a@b.example"),
    ("FROM:<>", ""),
    ("FROM: <a@b>", "a@b"),
    ("FROM:<first.last+tag@sub.b.example>", "first.last+tag@sub.b.example"),
    ("FROM:<bounce-123=x=y@lists.example>", "bounce-123=x=y@lists.example"),
    ("FROM:<SRS0=HHH=TT=orig.example=alice@fwd.example>",
     "SRS0=HHH=TT=orig.example=alice@fwd.example"),
])
def test_mail_from_good(arg, address):
    assert mail(arg) == Path(address, {})


@pytest.mark.parametrize("arg, address", [
    ("TO:<postmaster>", "postmaster"),
    ("TO:<PostMaster>", "PostMaster"),
    ("to:<POSTMASTER>", "POSTMASTER"),
    ('TO:<"john doe"@example.org>', '"john doe"@example.org'),
    (r'TO:<"a\"b>c"@example.org>', r'"a\"b>c"@example.org'),
    ("TO:<u@[192.0.2.1]>", "u@[192.0.2.1]"),
    ("TO:<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]"),
    ("TO:<@a.example,@b.example:u@c.example>", "u@c.example"),
    ("TO:<@a.example:u@c.example>", "u@c.example"),
    ("TO:<@a.example:postmaster>", "postmaster"),
    ("TO: <bob@localhost>", "bob@localhost"),
    ("TO:<" + "l" * MAX_LOCAL + "@example.org>", "l" * MAX_LOCAL + "@example.org"),
])
def test_rcpt_to_good(arg, address):
    assert rcpt(arg) == Path(address, {})


def test_params():
    path = mail("FROM:<a@b.example> SIZE=100 BODY=8BITMIME")
    assert path == Path("a@b.example", {"SIZE": "100", "BODY": "8BITMIME"})


def test_param_keywords_are_upper_cased_and_may_lack_a_value():
    assert mail("FROM:<> size=1 SMTPUTF8").params == {"SIZE": "1", "SMTPUTF8": None}
    assert parse_params("") == {}
    assert parse_params(" RET=HDRS  ENVID=abc+2Bdef") == {"RET": "HDRS", "ENVID": "abc+2Bdef"}


# -- bad paths ----------------------------------------------------------------------

LONG_LOCAL = "l" * (MAX_LOCAL + 1)
LONG_DOMAIN = ".".join(["d" * 60] * 4) + ".example"   # 251: with a local part, over 256


@pytest.mark.parametrize("arg", [
    "FROM:a@b.example",                 # missing brackets
    "FROM:",                            # nothing
    "FROM:<a@b",                        # unbalanced
    "FROM:a@b>",
    "FROM:<<a@b>>",
    "FROM:<a b@c.example>",             # spaces inside
    "FROM:< a@b.example>",
    "FROM:<a@b.example >",
    "FROM:<a@b .example>",
    "FROM:<jö@b.example>",              # non-ASCII
    "FROM:<j@bü.example>",
    'FROM:<"jö"@b.example>',
    f"FROM:<{LONG_LOCAL}@b.example>",   # local part over 64
    "FROM:<a@-b.example>",              # label starting with '-'
    "FROM:<a@b-.example>",
    "FROM:<a@b..example>",
    "FROM:<a@b.example.>",
    "FROM:<a@.b.example>",
    "FROM:<a..b@c.example>",
    "FROM:<.a@c.example>",
    "FROM:<a@>",
    "FROM:<@b.example>",
    "FROM:<a>",
    "FROM:<postmaster>",                # only a recipient may be bare postmaster
    "FROM:<a@b@c.example>",
    "FROM:<a@[]>",
    "FROM:<a\x00b@c.example>",
    "FROM:<a\r\nb@c.example>",
    f"FROM:<{'a' * 10}@{LONG_DOMAIN}>",  # path over 256
])
def test_bad_sender(arg):
    assert error_of(mail, arg) == replies.BAD_SENDER


@pytest.mark.parametrize("arg", [
    "TO:<>",                            # null not allowed for RCPT
    "TO:bob@localhost",
    "TO:<bob@localhost",
    "TO:<bob @localhost>",
    "TO:<bób@localhost>",
    f"TO:<{LONG_LOCAL}@localhost>",
    "TO:<bob@-localhost>",
    f"TO:<{'b' * 10}@{LONG_DOMAIN}>",
    "TO:<postmaster@>",
    "TO:<@a.example:>",
    "TO:<@a.example,u@c.example>",      # malformed route
    "TO:<postmaster x>",
])
def test_bad_recipient(arg):
    assert error_of(rcpt, arg) == replies.BAD_RECIPIENT


def test_path_limit_counts_the_whole_path():
    domain = ".".join(["d" * 63] * 3)                               # 191 characters
    fits = "l" * 62 + "@" + domain                   # 256 with its brackets: RFC maximum
    assert len(f"<{fits}>") == MAX_PATH
    assert rcpt(f"TO:<{fits}>").address == fits
    over = "l" * 60 + "@ddddd." + domain             # 258 without brackets; parts fine
    assert error_of(rcpt, f"TO:<{over}>") == replies.BAD_RECIPIENT
    routed = f"@relay.example:{'l' * 50}@{domain}"   # the route counts too
    assert len(routed) > MAX_PATH
    assert error_of(rcpt, f"TO:<{routed}>") == replies.BAD_RECIPIENT


@pytest.mark.parametrize("call, arg", [
    (mail, "TO:<a@b>"),                 # FROM vs TO mix-up
    (rcpt, "FROM:<a@b>"),
    (mail, "FROM<a@b>"),                # no colon
    (mail, "<a@b>"),
    (mail, ""),
    (mail, "FROMAGE:<a@b>"),
    (rcpt, "TOO:<a@b>"),
])
def test_wrong_keyword_is_a_syntax_error(call, arg):
    assert error_of(call, arg) == replies.SYNTAX


def test_keyword_check_uses_the_keyword_given():
    with pytest.raises(PathError) as caught:
        parse("TO:<a@b>", "FROM", null_ok=True, bad=replies.BAD_SENDER)
    assert caught.value.reply == replies.SYNTAX


@pytest.mark.parametrize("arg", [
    "FROM:<a@b> SIZE==1",               # value starting with '='
    "FROM:<a@b> SIZE=1 SIZE=2",         # duplicate
    "FROM:<a@b> SIZE=1 size=2",         # duplicate, other case
    "FROM:<a@b> ENVID=a=b",             # '=' inside a value
    "FROM:<a@b> SIZE=",                 # empty value
    "FROM:<a@b> =1",                    # no keyword
    "FROM:<a@b> -SIZE=1",               # keyword must start alnum
    "FROM:<a@b> SI_ZE=1",
    "FROM:<a@b> BODY=8BITMIMÉ",         # non-ASCII value
    "FROM:<a@b>SIZE=1",                 # no space after the path
    "FROM:<a@b>x",
])
def test_malformed_params(arg):
    assert error_of(mail, arg) == replies.BAD_PARAMETER


def test_malformed_params_on_rcpt_too():
    assert error_of(rcpt, "TO:<bob@localhost> NOTIFY==NEVER") == replies.BAD_PARAMETER


# -- properties --------------------------------------------------------------------------

ADDRESS_PIECES = st.sampled_from([
    "<", ">", "@", ":", ",", ".", '"', "\\", " ", "\t", "\r", "\n", "\x00", "[", "]",
    "a", "Z", "0", "-", "+", "=", "postmaster", "example.org", "ö", "\u2028",
])
ARGS = st.one_of(
    st.text(),
    st.builds(lambda k, body: k + body,
              st.sampled_from(["FROM:", "TO:", "from:<", "TO:<", "TO: <", "FROM:<@a:"]),
              st.lists(ADDRESS_PIECES, max_size=20).map("".join)),
)


def unquoted(address: str) -> str:
    """The address with its quoted strings taken out."""
    out, quoted, escaped = [], False, False
    for ch in address:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted:
            out.append(ch)
    return "".join(out)


@given(ARGS, st.sampled_from([("FROM", True, replies.BAD_SENDER),
                              ("TO", False, replies.BAD_RECIPIENT)]))
def test_parse_only_ever_raises_path_error(arg, how):
    keyword, null_ok, bad = how
    try:
        path = parse(arg, keyword, null_ok=null_ok, bad=bad)
    except PathError as error:
        assert error.reply in (replies.SYNTAX, bad, replies.BAD_PARAMETER)
        return
    address = path.address
    assert not any(ch in address for ch in "\r\n\x00")
    assert " " not in unquoted(address)
    assert address.isascii()
    assert len(address) <= MAX_PATH
    assert address or null_ok
    assert all(key == key.upper() for key in path.params)
