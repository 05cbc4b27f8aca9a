"""greyd.address: SMTP paths and ESMTP parameters (RFC 5321 4.1.2, 4.1.1.2-3)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greyd import replies
from greyd.address import (MAX_LOCAL, MAX_PATH, MailParams, Path, PathError, mail_params,
                           parse, parse_params, rcpt_params)

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
    "FROM:<j\udcc3\udcb6@b.example>",    # not UTF-8 on the wire (surrogate-escaped bytes)
    "FROM:<j@b\udcff.example>",
    "FROM:<j\u2028@b.example>",          # UTF-8, but unprintable
    "FROM:<j\u00a0@b.example>",
    "FROM:<j@\uff42.example>",            # fullwidth: UTS 46 maps it to "b"
    "FROM:<j@\u212aelvin.example>",       # KELVIN SIGN, a look-alike of "K"
    "FROM:<j@x\u0301\u0301--.example>",   # no U-label
    "FROM:<" + "\u00f6" * 33 + "@b.example>",   # 66 octets of local part
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
    "TO:<b\udcc3\udcb3b@localhost>",     # not UTF-8 on the wire
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
    "FROM:<a@b> BODY=8BITMIM\udcc9",    # not UTF-8 on the wire
    "FROM:<a@b> BODY=8BITMIM\u2028",    # unprintable
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
    address.encode("utf-8")                 # no surrogates: nothing that was not UTF-8
    assert address.isascii() or address.isprintable()
    assert len(address.encode()) <= MAX_PATH
    assert address or null_ok
    assert all(key == key.upper() for key in path.params)


# -- RFC 6531: UTF-8 in paths ------------------------------------------------------------

@pytest.mark.parametrize("arg, address", [
    ("FROM:<jö@b.example>", "jö@b.example"),
    ("FROM:<j@bücher.example>", "j@bücher.example"),
    ("FROM:<j@BÜCHER.example>", "j@BÜCHER.example"),             # kept as written
    ('FROM:<"jö doe"@b.example>', '"jö doe"@b.example'),
    ("FROM:<用户@例子.广告>", "用户@例子.广告"),
    ("FROM:<ju\u0308rgen@bu\u0308cher.example>", "ju\u0308rgen@bu\u0308cher.example"),  # NFD
    ("FROM:<j@xn--bcher-kva.example>", "j@xn--bcher-kva.example"),
    ("FROM:<" + "\u00f6" * 32 + "@b.example>", "\u00f6" * 32 + "@b.example"),  # 64 octets
])
def test_utf8_paths_follow_rfc_6531(arg, address):
    """The parser takes RFC 6531's grammar; the session asks for SMTPUTF8 (test_smtp)."""
    assert mail(arg) == Path(address, {})
    assert rcpt(arg.replace("FROM:", "TO:")) == Path(address, {})


# -- extension parameters: SMTPUTF8 (RFC 6531), DSN (RFC 3461, RFC 6533) --------------------

BOTH = ("SMTPUTF8", "DSN")


def mail_error(params, offered=BOTH):
    with pytest.raises(PathError) as caught:
        mail_params(parse_params(params), offered)
    return caught.value.reply


def rcpt_error(params, offered=BOTH, smtputf8=False):
    with pytest.raises(PathError) as caught:
        rcpt_params(parse_params(params, utf8_values=True), offered, smtputf8)
    return caught.value.reply


def test_smtputf8_and_dsn_on_mail_are_taken_as_written():
    params = parse_params(" SMTPUTF8 RET=hdrs ENVID=QQ314159+2B1 SIZE=10")
    assert mail_params(params, BOTH) == MailParams(
        size=10, smtputf8=True, dsn=("RET=hdrs", "ENVID=QQ314159+2B1"))


@pytest.mark.parametrize("params, offered", [
    (" SMTPUTF8", ()), (" SMTPUTF8", ("DSN",)), (" RET=FULL", ("SMTPUTF8",)),
    (" ENVID=x", ()),
])
def test_extension_parameters_not_offered_stay_unsupported(params, offered):
    assert mail_error(params, offered) == replies.UNKNOWN_PARAMETER


@pytest.mark.parametrize("params", [
    " RET=ALL", " RET", " RET=", " RET=FULL,HDRS", " ENVID", " ENVID=", " ENVID=a+2", " ENVID=a+2b",
    " ENVID=a=b",
    " ENVID=a+00b",                             # decodes to a NUL: not printable
    " ENVID=" + "x" * 101, " ENVID=" + "+41" * 101,   # over 100 characters once decoded
    " ENVID=caf\u00e9",                          # xtext is ASCII
    " RET=hdr\u017f",                            # long s: "hdrſ".upper() is "HDRS"
])
def test_bad_ret_and_envid_are_501_5_5_4(params):
    reply = mail_error(params)
    assert reply.code == 501 and reply.text.startswith("5.5.4 ")   # BAD_DSN; an empty
    assert reply in (replies.BAD_DSN, replies.BAD_PARAMETER)       # value: BAD_PARAMETER


def test_duplicate_dsn_parameters_are_501_5_5_4():
    assert mail_error(" RET=FULL RET=HDRS").text.startswith("5.5.4")
    assert mail_error(" RET=FULL RET=HDRS").code == 501
    assert rcpt_error(" NOTIFY=NEVER notify=NEVER").code == 501


def test_smtputf8_takes_no_value():
    assert mail_error(" SMTPUTF8=yes") == replies.BAD_PARAMETER


def test_utf8_values_only_when_asked_for():
    assert parse_params(" ORCPT=utf-8;j\u00fcrgen@b.example", utf8_values=True) == {
        "ORCPT": "utf-8;j\u00fcrgen@b.example"}
    assert error_of(rcpt, "TO:<a@b.example> ORCPT=utf-8;j\u00fcrgen@b.example") == \
        replies.BAD_PARAMETER
    with pytest.raises(PathError) as caught:
        parse_params(" X=\u2028", utf8_values=True)                  # unprintable
    assert caught.value.reply == replies.BAD_PARAMETER


def test_a_utf8_value_is_read_but_body_knows_no_such_type():
    with pytest.raises(PathError) as caught:
        mail_params(parse_params(" BODY=8BITMIM\u00c9", utf8_values=True), BOTH)
    assert caught.value.reply == replies.BAD_PARAMETER
    assert mail_error(" BODY=8bitm\u0131me") == replies.BAD_PARAMETER   # dotless i: "I"


def test_size_is_ascii_digits_only():
    for value in ("\uff11", "\u0661\u0662"):         # fullwidth 1, Arabic-Indic 12: isdigit()
        with pytest.raises(PathError) as caught:
            mail_params(parse_params(" SIZE=" + value, utf8_values=True), BOTH)
        assert caught.value.reply == replies.BAD_PARAMETER


@pytest.mark.parametrize("params", [
    " NOTIFY=NEVER", " NOTIFY=never", " NOTIFY=SUCCESS,FAILURE,DELAY", " NOTIFY=DELAY",
    " ORCPT=rfc822;bob@example.org", " ORCPT=RFC822;bob+2Bext@example.org",
    " NOTIFY=SUCCESS ORCPT=rfc822;" + "b" * 480 + "@example.org",
    " ORCPT=utf-8;j\\x{FC}rgen@b\\x{FC}cher.example",       # RFC 6533 utf-8-addr-xtext
    " ORCPT=x400;foo",
])
def test_good_notify_and_orcpt_are_kept_as_written(params):
    assert rcpt_params(parse_params(params), BOTH) == tuple(params.split())


@pytest.mark.parametrize("params", [
    " NOTIFY=NEVER,SUCCESS", " NOTIFY=SUCCESS,SUCCESS", " NOTIFY=ALWAYS", " NOTIFY=", " NOTIFY",
    " NOTIFY=SUCCESS,", " NOTIFY=\u017fuccess", " ORCPT=bob@example.org", " ORCPT=rfc822;", " ORCPT=;bob@example.org",
    " ORCPT=rfc822;bob+2@example.org", " ORCPT=rfc822;bob+0Aevil@example.org",
    " ORCPT=rfc822;" + "b" * 490 + "@example.org",
    " ORCPT=rfc822;j\u00fcrgen@example.org",       # raw UTF-8 is not xtext
    " ORCPT=utf-8;j\u00fcrgen@example.org",        # unitext needs SMTPUTF8
    " ORCPT=utf-8;j\\x{D800}rgen@example.org",    # a surrogate is no character
    " ORCPT=utf-8;j\\x{41}rgen@example.org",      # ASCII is written as itself
    " ORCPT=utf-8;j\\x{fc}rgen@example.org",      # HEXPOINT is upper case
    " ORCPT=utf-8;a+2Bb@example.org",               # no "+" in utf-8-addr-xtext
])
def test_bad_notify_and_orcpt_are_501_5_5_4(params):
    reply = rcpt_error(params)
    assert reply.code == 501 and reply.text.startswith("5.5.4 ")
    assert reply in (replies.BAD_DSN, replies.BAD_PARAMETER)


def test_orcpt_utf8_unitext_under_smtputf8():
    params = parse_params(" ORCPT=utf-8;j\u00fcrgen@b\u00fccher.example", utf8_values=True)
    assert rcpt_params(params, BOTH, smtputf8=True) == (
        "ORCPT=utf-8;j\u00fcrgen@b\u00fccher.example",)


@pytest.mark.parametrize("params, offered", [
    (" NOTIFY=NEVER", ()), (" ORCPT=rfc822;a@b", ("SMTPUTF8",)), (" SIZE=10", BOTH),
    (" RET=FULL", BOTH),
])
def test_rcpt_parameters_without_dsn_or_unknown_stay_555(params, offered):
    assert rcpt_error(params, offered) == replies.UNKNOWN_PARAMETER
