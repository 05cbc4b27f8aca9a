"""The `greyd` command (click): the group, `check` and `explain`.

The other commands live in cli_*.py modules, named at the bottom (COMMANDS)
and imported only when one of theirs is run or listed.

Errors are one line on standard error and exit status 1 (usage errors 2);
never a traceback. Listings take --json for scripts.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
import sys

import click

from . import __version__, policy, replies
from .clitools import (GreydError, describe, echo_json, load_certificate, load_config,
                       open_greylister, when)
from .ip import client_address
from .storage import StoreError


class Commands(click.Group):
    """The group, whose commands from cli_*.py (COMMANDS) are imported only
    when run or listed: `greyd whitelist add` need not load the daemon's
    modules, nor `greyd stop` the store's."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module, attribute = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(f"{__package__}.{module}"),
                                     attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="PATH",
              help="Config file (default: $GREYD_CONFIG, ./etc/greyd.toml, /etc/greyd/greyd.toml).")
@click.version_option(__version__, prog_name="greyd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """greyd: a greylisting SMTP proxy in front of your MTA."""
    ctx.obj = {"config": config_path}


@cli.command(short_help="Validate the config and print the effective settings.")
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the config and print the effective settings.

    \b
    Example:
      greyd check
      greyd -c /etc/greyd/greyd.toml check
    """
    config = load_config(ctx)
    certificate = load_certificate(config)
    click.echo(f"# config: {config.source or 'built-in defaults'}")
    click.echo(f"# root:   {config.root}")
    if certificate is not None:
        for line in certificate.describe():
            click.echo(f"# tls {line}")
    for section, values in config.as_dict().items():
        click.echo(f"[{section}]")
        for key, value in values.items():
            click.echo(f"{key} = {json.dumps(value)}")
    click.echo("config OK", err=True)


@cli.command(short_help="Show what greyd would decide now for a recipient, and why.")
@click.option("--client", required=True, metavar="IP", help="Client address.")
@click.option("--sender", required=True, metavar="ADDR", help="Envelope sender ('' or <> for null).")
@click.option("--recipient", required=True, metavar="ADDR", help="Envelope recipient.")
@click.option("--helo", default="", metavar="NAME", help="HELO name the client gave.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def explain(ctx, client, sender, recipient, helo, as_json) -> None:
    """Show what greyd would decide now for one recipient, and why; changes nothing.

    Looks the client up in the DNS as the daemon does (verified name, DNSWL,
    DNSBL), waiting at most dns.timeout.

    \b
    Example:
      greyd explain --client 192.0.2.7 --sender a@example.com --recipient b@localhost
    """
    from .dns import NO_SPF, Lookup
    config = load_config(ctx)
    if sender == "<>":
        sender = ""
    try:
        client = str(client_address(client))
    except ValueError:
        raise GreydError(f"--client: not an IP address: {client}") from None
    lookup = Lookup(config.dns)
    try:
        facts = lookup.check(client)
        request = policy.Request(client, sender, recipient, helo=helo, client_name=facts.name,
                                 dnswl=facts.dnswl, dnsbl=facts.dnsbl)
        with open_greylister(config) as greylister:
            spf = lookup.spf(client, sender, helo) if greylister.spf_may_matter(
                request._replace(recipient="")) else NO_SPF
            verdict, seen, request = greylister.explain(request, spf.result)
    finally:
        lookup.close()
    report = _explanation(request, verdict, seen)
    if as_json:
        echo_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key + ':':<11} {value if value is not None else '-'}")


def _explanation(request, verdict: policy.Verdict, seen: policy.Seen | None) -> dict:
    reply = {
        policy.REJECT: replies.RELAY_DENIED,
        policy.GREYLIST: replies.greylisted(verdict.retry_in),
    }.get(verdict.action)
    triplet = verdict.triplet
    return {
        "action": verdict.action,
        "reason": verdict.reason,
        "client": request.client,
        "name": request.client_name,
        "dnswl": request.dnswl,
        "dnsbl": request.dnsbl,
        "spf": f"{request.spf} ({request.spf_domain})" if request.spf else None,
        "network": verdict.network,
        "sender": request.sender or "<>",
        "recipient": request.recipient,
        "triplet": None if triplet is None else
                   f"{triplet.network} {triplet.sender} {triplet.recipient}",
        "first_seen": when(seen.first) if seen else None,
        "last_seen": when(seen.last) if seen else None,
        "passed_at": when(seen.passed) if seen and seen.passed else None,
        "delayed": verdict.delayed,
        "retry_in": verdict.retry_in,
        "reply": f"{reply.code} {reply.text}" if reply else "the upstream MTA's reply to RCPT",
    }


# -- command modules: each command is imported when it is run -----------------------
COMMANDS = {        # command: its module (cli_*.py) and the attribute there
    "start": "cli_daemon:start", "stop": "cli_daemon:stop", "status": "cli_daemon:status",
    "reload": "cli_daemon:reload", "reopen-logs": "cli_daemon:reopen_logs",
    "whitelist": "cli_whitelist:whitelist", "triplets": "cli_maintenance:triplets",
    "cleanup": "cli_maintenance:cleanup", "stats": "cli_maintenance:stats",
    "setup": "cli_setup:setup", "store": "cli_store:store",
}


def main() -> None:
    """Console entry point: any unforeseen error is still one line, exit 1."""
    try:
        cli(prog_name="greyd")
    except (OSError, sqlite3.Error, StoreError) as error:
        click.echo(f"greyd: {describe(error)}", err=True)
        sys.exit(1)
