"""Conventions every `greyd` command keeps (SPEC §3): help with an example,
--version, one-line errors with exit 1, usage errors with exit 2, --json as
one JSON document."""

from __future__ import annotations

import json
import os
import re
import time

import click
import pytest
from click.testing import CliRunner

from daemon import greyd
from greyd import __version__
from greyd.cli import cli

pytestmark = pytest.mark.timeout(60)


def commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    """Every leaf command, as the words that name it (a group loads its
    commands when asked for them)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(commands())


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_every_command_has_help_with_an_example(words):
    result = CliRunner().invoke(cli, [*words, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"greyd {' '.join(words)}" in result.output.split("Example", 1)[1]


def test_version():
    result = greyd("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"greyd, version {__version__}"


def test_a_usage_error_exits_2():
    result = greyd("explain", "--client")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# Commands that need one of several options to be a valid call.
SELECTORS = {("whitelist", "add"): ["--client", "192.0.2.1"],
             ("whitelist", "remove"): ["--client", "192.0.2.1"],
             ("triplets", "delete"): ["--all"]}


def required_args(command: click.Command, tmp_path, words=()) -> list[str]:
    """Plausible values for a command's required options and arguments."""
    args = list(SELECTORS.get(tuple(words), []))
    for param in command.params:
        if isinstance(param, click.Option) and param.required:
            args += [param.opts[0], "192.0.2.1" if "client" in param.name else "x@y.example"]
        elif isinstance(param, click.Argument) and param.required:
            empty = tmp_path / "empty.txt"
            empty.write_text("")
            args.append(str(empty))
    return args


def test_a_missing_config_file_is_one_line_for_every_command(tmp_path):
    missing = tmp_path / "nope.toml"
    for words, command in COMMANDS:
        result = greyd(*words, *required_args(command, tmp_path, words), config=missing)
        assert result.returncode == 1, (words, result.stderr)
        assert result.stderr.splitlines() == [f"greyd: config: config file not found: {missing}"], words


def test_json_output_is_one_document(tmp_path):
    config = tmp_path / "greyd.toml"
    config.write_text(f'[database]\npath = "{tmp_path}/greyd.db"\n'
                      f'[server]\npidfile = "{tmp_path}/greyd.pid"\n[log]\nfile = ""\n')
    assert greyd("whitelist", "add", "--client", "192.0.2.1", config=config).returncode == 0
    checked = 0
    for words, command in COMMANDS:
        if not any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params):
            continue
        result = greyd(*words, *required_args(command, tmp_path, words), "--json", config=config)
        assert result.returncode in (0, 3), (words, result.stderr)   # status: 3 = not running
        json.loads(result.stdout)
        checked += 1
    assert checked >= 2


def test_expires_takes_weeks_like_the_config(tmp_path):
    config = tmp_path / "greyd.toml"
    config.write_text(f'[database]\npath = "{tmp_path}/greyd.db"\n[log]\nfile = ""\n')
    before = int(time.time())
    added = greyd("whitelist", "add", "--sender", "a@example.org", "--expires", "1w",
                  config=config)
    assert added.returncode == 0, added.stderr
    [entry] = json.loads(greyd("whitelist", "list", "--json", config=config).stdout)
    assert before + 604800 <= entry["expires"] <= int(time.time()) + 604800
    refused = greyd("whitelist", "add", "--sender", "b@example.org", "--expires", "1W",
                    config=config)
    assert refused.returncode == 1 and refused.stderr.startswith("greyd: --expires: must be")


# Every command's one-line summary in `greyd [GROUP] --help`, by group.
SUMMARIZED = {(): cli.list_commands(click.Context(cli)),
              ("triplets",): ["delete", "list"],
              ("whitelist",): ["add", "import", "list", "remove"]}


def summaries(*group: str) -> dict[str, str]:
    """The Commands section of `greyd [GROUP] --help` at 80 columns: name -> summary."""
    result = greyd(*group, "--help", env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("Commands:\n", 1)[1]
    found: dict[str, str] = {}
    for line in section.splitlines():
        if re.match(r"^  \S", line):
            name, _, text = line.strip().partition(" ")
            found[name] = text.strip()
        elif line.strip():                       # a summary wrapped onto the next line
            found[name] += " " + line.strip()
    return found


@pytest.mark.parametrize("group", list(SUMMARIZED), ids=lambda g: " ".join(g) or "greyd")
def test_command_summaries_in_help_are_whole_sentences(group):
    found = summaries(*group)
    for name in SUMMARIZED[group]:
        summary = found[name]
        assert not summary.endswith(("...", "…")), (name, summary)
        assert summary.endswith(".") and len(summary) <= 60, (name, summary)


def whitelist_commands():
    """The whitelist group and its commands, as the words that name them."""
    group = cli.get_command(click.Context(cli), "whitelist")
    return [(("whitelist",), group)] + [
        (("whitelist", name), command) for name, command in sorted(group.commands.items())]


@pytest.mark.parametrize("words, command", whitelist_commands(),
                         ids=[" ".join(words) for words, _ in whitelist_commands()])
def test_whitelist_summaries_are_whole_in_the_command_lists(words, command):
    summary = command.get_short_help_str(limit=45)    # 45: click's limit for shell completion
    assert summary == command.short_help and len(summary) <= 45 and "..." not in summary
    listing = greyd(*words[:-1], "--help", env={**os.environ, "COLUMNS": "80"})
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^  {words[-1]} +{re.escape(summary)}$", listing.stdout, re.M), \
        listing.stdout
