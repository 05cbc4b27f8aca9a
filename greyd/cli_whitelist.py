"""`greyd whitelist add | remove | list | import`: the static whitelist (SPEC §3).

Values are checked and normalized by greyd.whitelist, then written to the
store; a running daemon sees the change at its next RCPT (the store's
whitelist version moves), so nothing needs a restart or a reload.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import values, whitelist as entries
from .values import ConfigError
from .clitools import GreydError, echo_json, load_config, open_store, when

SELECTORS = entries.KINDS


def _selector_options(command):
    """The four mutually exclusive selectors of add and remove."""
    helps = {
        "client": ("CIDR", "Client IP address or network (192.0.2.7, 192.0.2.0/24, "
                           "2001:db8::/32, 10.1 = 10.1.0.0/16)."),
        "hostname": ("PATTERN", "Client's verified reverse name: mx.example.com (exactly), "
                                ".example.com (it and every name under it) or /regex/."),
        "sender": ("ADDR", "Envelope sender: user@dom, @dom (whole domain) or user@ (local part)."),
        "recipient": ("ADDR", "Envelope recipient: user@dom, @dom, user@ or /regex/ "
                              "(searched in the whole address)."),
    }
    for name in reversed(SELECTORS):
        metavar, text = helps[name]
        command = click.option(f"--{name}", metavar=metavar, help=text)(command)
    return command


def _selected(options: dict) -> tuple[str, str]:
    """(kind, value normalized) from exactly one selector; else a usage error."""
    given = [(kind, options[kind]) for kind in SELECTORS if options[kind] is not None]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --client, --hostname, --sender, --recipient")
    kind, text = given[0]
    try:
        return kind, entries.normalize(kind, text)
    except ValueError as error:
        raise GreydError(f"--{kind}: {_strip_kind(error, kind)}") from None


def _strip_kind(error: ValueError, kind: str) -> str:
    """The normalizer's message without its own 'client: ' prefix (the option names it)."""
    message = str(error)
    for prefix in (f"{kind}: ", "address: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _comment(text: str) -> str:
    """--comment, checked; a one-line error when it is unfit for a listing."""
    try:
        return entries.check_comment(text)
    except ValueError as error:
        raise GreydError(f"--{error}") from None


def _shown(kind: str, value: str, given: str) -> str:
    """'client 192.0.2.0/24', with what the operator typed when it was rewritten."""
    if given.strip().lower() in (value, value.lower()):
        return f"{kind} {value}"
    return f"{kind} {value} (given as {given.strip()})"


@click.group(short_help="Static whitelist: add, remove, list, import.")
def whitelist() -> None:
    """The static whitelist: clients, client hostnames, senders, recipients.

    Changes take effect at the next RCPT of a running greyd; no restart.

    \b
    Examples:
      greyd whitelist add --client 192.0.2.0/24 --comment "our other office"
      greyd whitelist add --sender @partner.example --expires 30d
      greyd whitelist list
      greyd whitelist import /etc/postgrey/whitelist_clients
    """


@whitelist.command(short_help="Add an entry, or update one already there.")
@_selector_options
@click.option("--comment", metavar="TEXT", help="Why the entry is there (shown by list).")
@click.option("--expires", metavar="DURATION",
              help="Stop matching after this long: 3600, 90m, 12h, 7d "
                   "(default: a new entry never expires, an existing one keeps its expiry).")
@click.option("--permanent", is_flag=True,
              help="Never expire: makes an existing temporary entry permanent.")
@click.pass_context
def add(ctx: click.Context, comment: str | None, expires: str | None, permanent: bool,
        **selectors) -> None:
    """Add one entry; exactly one of --client, --hostname, --sender, --recipient.

    Adding an entry that is already there is not an error: it keeps its
    expiry unless --expires (a new one) or --permanent (none) is given; an
    entry that has expired is renewed as a new one would be. Its comment
    changes when --comment is given. The output says what happened.

    \b
    Examples:
      greyd whitelist add --client 2001:db8:1::/48 --comment "backup MX"
      greyd whitelist add --hostname .mail.example.com
      greyd whitelist add --hostname '/^out-[0-9]+\\.mta\\.example\\.net$/'
      greyd whitelist add --recipient abuse@ --comment "RFC 2142"
      greyd whitelist add --sender alice@example.org --expires 7d
      greyd whitelist add --sender alice@example.org --permanent
    """
    if expires is not None and permanent:
        raise click.UsageError("--expires and --permanent exclude each other")
    kind, value = _selected(selectors)
    if comment is not None:
        comment = _comment(comment)
    seconds = None
    if expires is not None:
        try:
            seconds = values.parse_duration(expires, "--expires")
        except ConfigError as error:
            raise GreydError(str(error)) from None
        if seconds <= 0:
            raise GreydError(f"--expires: must be more than 0 seconds, got {expires!r}")
    with open_store(load_config(ctx)) as store:
        now = store.now()
        until = None if seconds is None else int(now) + seconds
        before = _stored(store, kind, value)
        store.add_whitelist(kind, value, comment=comment, expires=until, now=now,
                            keep_expiry=expires is None and not permanent)
        after = _stored(store, kind, value)
    click.echo(_add_report(_shown(kind, value, selectors[kind]), before, after, now))


def _stored(store, kind: str, value: str) -> dict | None:
    """The stored entry (kind, value), or None."""
    return next((row for row in store.whitelist_entries(kind) if row["value"] == value), None)


def _add_report(what: str, before: dict | None, after: dict, now: float) -> str:
    """What `add` did, in one line: added, kept, or which expiry it changed."""
    if before is None:
        expires = after["expires"]
        return f"added: {what}" + (f", expires {when(expires)}" if expires else "")
    was, now_is = _expiry(before["expires"], now), _expiry(after["expires"], now)
    line = f"already in the whitelist: {what}, {was}, " + (
        "kept" if was == now_is else f"now {now_is}")
    if before["comment"] != after["comment"]:
        line += ", comment updated"
    return line


def _expiry(expires: int | None, now: float) -> str:
    if expires is None:
        return "permanent"
    return ("expired " if expires <= now else "expires ") + when(expires)


@whitelist.command(short_help="Remove one entry, given as it was added.")
@_selector_options
@click.pass_context
def remove(ctx: click.Context, **selectors) -> None:
    """Remove one entry, given as it was added (it is normalized the same way).

    Removing an entry that is not there exits 1, so that a typo shows;
    `greyd whitelist list` shows the entries as stored. A hostname given
    as example.com does not remove .example.com (what `import` makes of
    postgrey's example.com), nor the other way round: the error names the
    stored entry and the command that removes it.

    \b
    Examples:
      greyd whitelist remove --client 192.0.2.0/24
      greyd whitelist remove --sender @partner.example
    """
    kind, value = _selected(selectors)
    what = _shown(kind, value, selectors[kind])
    with open_store(load_config(ctx)) as store:
        if not store.remove_whitelist(kind, value):
            raise GreydError(f"not in the whitelist: {what}{_other_form(store, kind, value)}")
    click.echo(f"removed: {what}")


def _other_form(store, kind: str, value: str) -> str:
    """A hint when the other spelling of a hostname (name <-> .domain) is stored."""
    if kind != "hostname" or entries.is_regex(value):
        return ""
    other = value[1:] if value.startswith(".") else "." + value
    if _stored(store, kind, other) is None:
        return ""
    meaning = "that name only" if value.startswith(".") else "the domain and every name under it"
    return f" (stored as {other}, {meaning}: greyd whitelist remove --hostname {other})"


@whitelist.command(name="list", short_help="List the entries, with expiry and comment.")
@click.option("--kind", type=click.Choice(SELECTORS), help="Only entries of this kind.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def list_(ctx: click.Context, kind: str | None, as_json: bool) -> None:
    """List the entries: kind, value, expiry, comment.

    Expired entries are listed, marked expired; they no longer match, and
    `greyd cleanup` deletes them. With --json: a list of objects with kind,
    value, comment, added and expires (Unix times; expires null: never) and
    expired (true or false).

    \b
    Examples:
      greyd whitelist list --kind client
      greyd whitelist list --json | jq -r '.[] | select(.expired) | .value'
    """
    with open_store(load_config(ctx), write=False) as store:
        rows = store.whitelist_entries(kind)
        now = int(store.now())
    for row in rows:
        row["expired"] = row["expires"] is not None and row["expires"] <= now
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no {kind} entries" if kind else "the whitelist is empty")
        return
    table = [("KIND", "VALUE", "EXPIRES", "COMMENT")] + [
        (row["kind"], row["value"],
         when(row["expires"]) + (" (expired)" if row["expired"] else ""),
         row["comment"] or "") for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths)] + [line[3]]
        click.echo("  ".join(cells).rstrip())


@whitelist.command(name="import", short_help="Import a postgrey whitelist file.")
@click.argument("file", metavar="FILE")
@click.option("--kind", type=click.Choice(entries.IMPORT_KINDS), default="client",
              show_default=True,
              help="client: postgrey's whitelist_clients; recipient: whitelist_recipients.")
@click.option("--comment", metavar="TEXT", help="Comment of the new entries "
              "(default: 'imported from FILE').")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def import_(ctx: click.Context, file: str, kind: str, comment: str | None,
            as_json: bool) -> None:
    """Add the entries of a postgrey whitelist file ('-': standard input).

    \b
    whitelist_clients: one entry a line, '#' comments;
      192.0.2.7, 192.0.2.0/24, 2001:db8::/32, 10.1 (= 10.1.0.0/16): clients;
      example.com: that name and every name under it (.example.com);
      /^mx[0-9]+\\.example\\.net$/: a pattern for the client's name.
    whitelist_recipients: user@domain, user@, domain (= @domain);
      /^postmaster@/: a pattern searched in the whole recipient address.

    Entries already there are left as they are; lines that are not entries
    are skipped, with their number and the reason. Importing a file twice
    adds nothing the second time. Exits 1 only when FILE cannot be read.

    \b
    Examples:
      greyd whitelist import etc/whitelist_clients
      greyd whitelist import --kind recipient etc/whitelist_recipients
    """
    lines = _read_lines(file)
    if comment is None:
        comment = f"imported from {'standard input' if file == '-' else file}"
    comment = _comment(comment)
    parsed = list(entries.read_postgrey(lines, kind))
    good = [line for line in parsed if line.reason is None]
    with open_store(load_config(ctx)) as store:
        added = store.import_whitelist(((line.kind, line.value) for line in good),
                                       comment, store.now())
    report = _import_report(file, parsed, dict(zip((line.number for line in good), added)))
    if as_json:
        echo_json(report)
        return
    for status, label in (("added", "added"), ("present", "already present")):
        for item in report[status]:
            click.echo(f"line {item['line']}: {label}: {item['kind']} {item['value']}")
    for item in report["skipped"]:
        click.echo(f"line {item['line']}: skipped: {_printable(item['text'])}: "
                   f"{item['reason']}")
    click.echo(f"{'standard input' if file == '-' else file}: {len(report['added'])} added, {len(report['present'])} "
               f"already present, {len(report['skipped'])} skipped")


def _import_report(file: str, parsed: list[entries.Line], added: dict[int, bool]) -> dict:
    """What an import did, line by line: added, already present, skipped (and why)."""
    report: dict = {"file": file, "added": [], "present": [], "skipped": []}
    for line in parsed:
        if line.reason is not None:
            report["skipped"].append(
                {"line": line.number, "text": line.text, "reason": line.reason})
        else:
            report["added" if added[line.number] else "present"].append(
                {"line": line.number, "kind": line.kind, "value": line.value})
    return report


def _read_lines(file: str) -> list[str]:
    """The lines of FILE ('-': standard input)."""
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as error:
        raise GreydError(f"cannot read {file}: {error.strerror or error}") from None
    # Bytes that are not UTF-8 survive as surrogates, which the entry checks refuse.
    return data.decode("utf-8", "surrogateescape").splitlines()


def _printable(text: str) -> str:
    """A line from a file as it may be shown on a terminal: controls escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
