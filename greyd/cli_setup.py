"""`greyd setup`: install greyd on this host as a mail daemon (greyd/install.py)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .clitools import GreydError, load_config
from .install import Host, InstallError, Setup, running_greyd


@click.command()
@click.option("--root", "root", metavar="DIR", type=click.Path(file_okay=False),
              help="Install everything under DIR; the host's users and groups are left alone.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.pass_context
def setup(ctx: click.Context, root: str | None, dry_run: bool) -> None:
    """Install greyd as a system daemon (as root).

    Creates the system user and group greyd, /var/lib/greyd, /var/log/greyd
    and /run/greyd (greyd:greyd 0750), writes /etc/greyd/greyd.toml if absent
    (never overwriting it), and installs the systemd unit, /etc/cron.d/greyd
    and /etc/logrotate.d/greyd, all running this greyd. A second run changes
    nothing. With -c PATH the installed files name that config (it must be
    valid) and none is written.

    \b
    Example:
      greyd setup --dry-run
      greyd setup
      greyd setup --root /tmp/greyd-root
    """
    given = load_config(ctx).source if ctx.obj["config"] else None
    if root is None and not dry_run and os.geteuid() != 0:
        raise GreydError("setup needs root (or --root DIR, or --dry-run)")
    try:
        host = Host(running_greyd(), Path(root).absolute() if root else None,
                    str(Path(given).absolute()) if given else None)
        Setup(host, click.echo, dry_run=dry_run).run()
    except InstallError as error:
        raise GreydError(str(error)) from None
    except OSError as error:
        raise GreydError(f"{error.filename or 'setup'}: {error.strerror or error}") from None
