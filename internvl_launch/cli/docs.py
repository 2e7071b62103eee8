"""Render docs/cli.md from the click commands: `python -m internvl_launch.cli.docs`."""

from __future__ import annotations

import click

from internvl_launch.cli import cli
from internvl_launch.cli._errors import EXIT_CODES


def render() -> str:
    """The CLI reference as Markdown; a test fails when docs/cli.md differs."""
    lines = [
        "# `internvl` command reference",
        "",
        "Generated from the click commands by `make docs`; do not edit by hand.",
        "",
    ]
    root = click.Context(cli, info_name="internvl", terminal_width=100, **cli.context_settings)
    lines += ["```text", cli.get_help(root).rstrip(), "```", ""]
    for name in sorted(cli.list_commands(root)):
        command = cli.get_command(root, name)
        assert command is not None
        ctx = click.Context(command, info_name=name, parent=root, terminal_width=100)
        lines += [f"## internvl {name}", "", "```text", command.get_help(ctx).rstrip(), "```", ""]
    lines += ["## Exit codes", "", "| code | meaning |", "| --- | --- |"]
    lines += [f"| {code} | {meaning} |" for _, code, meaning in EXIT_CODES]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    click.echo(render(), nl=False)
