"""`greyd triplets list|delete`, `greyd cleanup`, `greyd stats`: the operator's toolkit.

Reads the options and the config, calls maintenance.py (which owns the SQL),
and prints: a table or block for people, one JSON document with --json.
"""

from __future__ import annotations

import sys

import click

from . import maintenance
from .clitools import GreydError, echo_json, load_config, open_store, when
from .storage import SESSION_KINDS

DEFAULT_LIMIT = 100
ACTION_LABELS = {"greylist": "deferred", "accept": "accepted", "reject": "relay-denied",
                 "tempfail": "tempfailed"}
KIND_LABELS = {"pending_triplets": "pending triplets (not retried within retry_window)",
               "passed_triplets": "passed triplets (unseen for max_age)",
               "auto_whitelist": "auto-whitelisted networks (unseen for max_age)",
               "whitelist": "expired whitelist entries",
               "counters": "decision counters (older than eight days)"}


def _filter_options(command):
    """--pending/--passed, --client, --sender, --recipient: shared by list and delete."""
    options = [
        click.option("--pending", is_flag=True, help="Only triplets that have not passed yet."),
        click.option("--passed", is_flag=True, help="Only triplets that have passed."),
        click.option("--client", metavar="IP",
                     help="The client's address: matches the network greyd records for it "
                          "(cut to greylist.ipv4_prefix/ipv6_prefix); a network as listed "
                          "(192.0.2.0/24) works too, and so does a key such as "
                          "spf:example.com (triplets keyed by an SPF pass)."),
        click.option("--sender", metavar="ADDR",
                     help="Envelope sender, normalized as greyd stores it (case folded, "
                          "+extension, BATV and SRS tags removed, digits as #); the stored "
                          "value matches too; <> for the null sender; @domain for a domain."),
        click.option("--recipient", metavar="ADDR",
                     help="Envelope recipient (case-insensitive); @domain for a domain."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _where(config, pending: bool, passed: bool, client, sender, recipient):
    if pending and passed:
        raise click.UsageError("--pending and --passed exclude each other")
    try:
        return maintenance.triplet_filter(
            state="pending" if pending else "passed" if passed else None,
            client=client, sender=sender, recipient=recipient,
            ipv4_prefix=config.greylist.ipv4_prefix, ipv6_prefix=config.greylist.ipv6_prefix)
    except ValueError as error:
        raise GreydError(f"--client: {error}") from None


@click.group(short_help="Inspect and remove greylisting triplets.")
def triplets() -> None:
    """Inspect and remove greylisting triplets (client network, sender, recipient).

    \b
    Examples:
      greyd triplets list --client 192.0.2.7
      greyd triplets delete --sender alice@example.net --recipient bob@example.org
    """


@triplets.command("list", short_help="List triplets; the filters combine.")
@_filter_options
@click.option("--limit", type=click.IntRange(min=0), default=DEFAULT_LIMIT, show_default=True,
              metavar="N",
              help="At most this many (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def list_(ctx: click.Context, pending, passed, client, sender, recipient, limit: int,
          as_json: bool) -> None:
    """List triplets, in key order: the filters combine (all must match).

    \b
    Examples:
      greyd triplets list --pending --limit 20
      greyd triplets list --client 192.0.2.7 --sender Alice+news@Example.NET
      greyd triplets list --recipient @example.org --json
    """
    config = load_config(ctx)
    where = _where(config, pending, passed, client, sender, recipient)
    with open_store(config, write=False) as store:
        rows, more = maintenance.list_triplets(store.conn, where, limit)
    if as_json:
        echo_json({"triplets": [row.as_dict() for row in rows], "count": len(rows),
                   "limit": limit, "more": more})
        return
    if rows:
        _table(["NETWORK", "SENDER", "RECIPIENT", "FIRST SEEN", "LAST SEEN", "STATE"],
               [[row.network, row.sender, row.recipient, when(row.first_seen, zone=False),
                 when(row.last_seen, zone=False), row.state] for row in rows])
    else:
        click.echo("no matching triplets")
    if more:
        click.echo(f"(showing the first {limit}; more match: --limit 0 lists all)", err=True)


@triplets.command(short_help="Delete the matching triplets, in short batches.")
@_filter_options
@click.option("--all", "everything", is_flag=True, help="Delete every triplet (no filter).")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.pass_context
def delete(ctx: click.Context, pending, passed, client, sender, recipient, everything: bool,
           dry_run: bool) -> None:
    """Delete the triplets that match (in short batches, safe beside the daemon).

    Without a filter it refuses, unless --all says every triplet is meant.
    A deleted triplet's next delivery is greylisted again as new.

    \b
    Examples:
      greyd triplets delete --client 192.0.2.7 --dry-run
      greyd triplets delete --sender alice@example.net --recipient bob@example.org
      greyd triplets delete --all
    """
    config = load_config(ctx)
    where = _where(config, pending, passed, client, sender, recipient)
    if where.empty and not everything:
        raise click.UsageError("no filter given: refusing to delete every triplet "
                               "(add --all if that is what you mean)")
    if everything and not where.empty:
        raise click.UsageError("--all takes no filter")
    with open_store(config, create=False) as store:
        count = maintenance.delete_triplets(store.conn, where, dry_run=dry_run)
    noun = "triplet" if count == 1 else "triplets"
    click.echo(f"{'would delete' if dry_run else 'deleted'} {count} {noun}")


@click.command(short_help="Forget expired triplets and (auto-)whitelist entries.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; change nothing.")
@click.option("--quiet", is_flag=True, help="Print nothing unless something fails (for cron).")
@click.pass_context
def cleanup(ctx: click.Context, dry_run: bool, quiet: bool) -> None:
    """Forget expired state: triplets, auto-whitelist entries, whitelist entries.

    Removes pending triplets first seen longer ago than greylist.retry_window,
    passed triplets and auto-whitelisted networks unseen for greylist.max_age,
    and whitelist entries whose expiry has passed. It deletes in short
    batches, so it is safe to run while the daemon serves mail; run it hourly
    from cron (etc/greyd.cron, scripts/greyd-cleanup).

    \b
    Examples:
      greyd cleanup --dry-run
      greyd -c /etc/greyd/greyd.toml cleanup --quiet
    """
    config = load_config(ctx)
    greylist = config.greylist
    with open_store(config, create=False) as store:
        if not dry_run and not store.lock_cleanup():
            if not quiet:
                click.echo("another cleanup is running on this store (another host's cron?);"
                           " nothing done")
            return
        total = 0
        if not (quiet or dry_run) and sys.stdout.isatty():
            total = maintenance.count_triplets(store.conn)
        with _progressbar(total) as progress:
            removed = maintenance.cleanup(
                store.conn, retry_window=greylist.retry_window, max_age=greylist.max_age,
                now=store.now(), dry_run=dry_run, progress=progress)
    if quiet:
        return
    verb = "would remove" if dry_run else "removed"
    for kind in maintenance.CLEANUP_KINDS:
        click.echo(f"{verb} {removed[kind]} {KIND_LABELS[kind]}")


class _progressbar:
    """click's progress bar over the triplet walk, when the store is large; else nothing."""

    def __init__(self, total: int):
        self.bar = None
        if total > maintenance.LARGE_STORE:
            self.bar = click.progressbar(length=total, label="cleaning triplets")

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.__enter__()
        return self._update

    def _update(self, table: str, walked: int, removed: int) -> None:
        if table == "triplets":
            self.bar.update(walked)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@click.command(short_help="Store sizes, recent decisions, greylisting delays.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Sizes of the store, recent decisions and sessions, greylisting delays.

    Triplets, auto-whitelist and whitelist sizes; the decisions and sessions
    (over TLS, in plaintext) of the last hour and day; and what greylisting
    cost the mail that passed.

    Decisions are counted per minute: "last hour" is the last 60 minutes,
    "last day" the last 24 hours (from the minute they began). An action with one reason of its own name (relay-denied) is
    not broken down. Whitelist sizes count live entries; expired ones,
    which cleanup removes, are counted apart. The greylisting delay of a
    triplet is from its first try to the retry that passed; median, 90th
    percentile (nearest rank) and longest are over the triplets that
    passed in the last 24 hours and the last 7 days, and the five sender
    domains held longest over the week are listed.

    \b
    Examples:
      greyd stats
      greyd stats --json | jq .decisions.hour.actions
      greyd stats --json | jq .greylist_delay.week
    """
    config = load_config(ctx)
    greylist = config.greylist
    with open_store(config, write=False) as store:
        report = maintenance.stats(store.conn, auto_whitelist_after=greylist.auto_whitelist_after,
                                   max_age=greylist.max_age, now=store.now())
    report = {"database": config.database.where, **report}
    if as_json:
        echo_json(report)
        return
    _print_stats(report)


def _print_stats(report: dict) -> None:
    t, auto, wl = report["triplets"], report["auto_whitelist"], report["whitelist"]
    click.echo(f"database:        {report['database']}")
    click.echo(f"triplets:        {t['total']} ({t['pending']} pending, {t['passed']} passed)")
    if auto["after"]:
        click.echo(f"auto-whitelist:  {auto['whitelisted']} networks whitelisted, "
                   f"{auto['tracked']} tracked "
                   f"(whitelisted after {auto['after']} passed deliveries)")
    else:
        click.echo(f"auto-whitelist:  off, {auto['tracked']} networks tracked")
    kinds = ", ".join(f"{kind} {count}" for kind, count in wl.items() if kind != "expired")
    click.echo(f"whitelist:       {kinds}; {wl['expired']} expired (cleanup removes them)")
    hour, day = report["decisions"]["hour"], report["decisions"]["day"]
    click.echo("")
    rows = [["decisions", "last hour", "last day"]]
    for action in dict.fromkeys([*hour["actions"], *day["actions"]]):
        label = ACTION_LABELS.get(action, action)
        rows.append([f"  {label}", hour["actions"].get(action, 0),
                     day["actions"].get(action, 0)])
        reasons = day["reasons"].get(action, {})
        if list(reasons) in ([label], [action]):
            continue      # relay-denied's one reason is relay-denied: its count is shown
        for reason in reasons:
            rows.append([f"    {reason}", hour["reasons"].get(action, {}).get(reason, 0),
                         reasons[reason]])
    rows.append(["  total", hour["total"], day["total"]])
    hour, day = report["sessions"]["hour"], report["sessions"]["day"]
    rows.append(["sessions", "", ""])
    for kind in SESSION_KINDS:
        rows.append([f"  {'over TLS' if kind == 'tls' else kind}", hour[kind], day[kind]])
    for name, *counts in rows:
        click.echo(f"{name:<28} {counts[0]:>15} {counts[1]:>15}".rstrip())
    click.echo("(counted per minute: the last 60 minutes, the last 24 hours)")
    click.echo("")
    _print_delay(report["greylist_delay"], report["held_longest"])


def _print_delay(delay: dict, held: list[dict]) -> None:
    """What greylisting cost the mail that passed: delays over the day and week,
    and the sender domains held longest."""
    day, week = delay["day"], delay["week"]
    if not week["passed"]:
        click.echo("greylisting delay: no mail delayed (no triplet passed in the last week)")
        return
    rows = [("greylisting delay", "last day", "last week"),
            ("  passed triplets", day["passed"], week["passed"])]
    for key, label in (("median", "median"), ("p90", "90th percentile"), ("max", "longest")):
        rows.append((f"  {label}", duration(day[key]), duration(week[key])))
    for name, *cells in rows:
        click.echo(f"{name:<28} {cells[0]:>14} {cells[1]:>14}")
    click.echo("(delay: first try to the retry that passed; percentiles by nearest rank)")
    click.echo("")
    width = max(28, *(len(row["domain"]) + 2 for row in held))
    click.echo(f"{'held longest (last week)':<{width}} {'passed':>8} {'longest':>14} "
               f"{'median':>14}")
    for row in held:
        click.echo(f"{'  ' + row['domain']:<{width}} {row['passed']:>8} "
                   f"{duration(row['max']):>14} {duration(row['median']):>14}")


def duration(seconds: int | None) -> str:
    """A delay as stats shows it: '45s', '5m 12s', '2h 0m 5s', '1d 3h 0m 0s'; None is '-'."""
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    while parts and not parts[0][0]:
        parts.pop(0)
    return " ".join([f"{n}{unit}" for n, unit in parts] + [f"{seconds}s"])


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
