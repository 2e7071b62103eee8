"""The `internvl` command: the composition root. It only registers commands;
each command module parses flags, calls one core function and prints through
`_output`. Nothing here imports torch, transformers, vllm or fastapi."""

from __future__ import annotations

import sys

import click

from internvl_launch import __version__
from internvl_launch.cli import (
    chat_command,
    checkpoint_commands,
    env_command,
    plan_commands,
    registry_commands,
    serve_commands,
)
from internvl_launch.cli._errors import EXIT_INTERNAL, report
from internvl_launch.errors import InternVLError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="internvl")
def cli() -> None:
    """Launch, inspect and plan InternVL vision-language models.

    \b
    internvl list                         every family and spec
    internvl show internvl2               one family
    internvl resolve -n internvl2 -s 8 -q 4-bit --explain
    internvl launch -n internvl2 -s 8 -q 4-bit --dry-run
    internvl launch -n internvl-tiny --port 0 --detach --json
    internvl ps ; internvl stop internvl-tiny
    internvl chat -n internvl2 -s 2 --image cat.jpg "Describe it" --print-prompt
    internvl convert ./InternVL2-8B-finetuned ./InternVL2-8B-finetuned-hf
    internvl launch --model-path ./InternVL2-8B-finetuned -q 8-bit
    internvl register my-specs/finetuned.yaml ; internvl unregister my-internvl
    """


for command in (
    registry_commands.list_command,
    registry_commands.show_command,
    registry_commands.validate_command,
    registry_commands.register_command,
    registry_commands.unregister_command,
    plan_commands.resolve_command,
    serve_commands.launch_command,
    serve_commands.ps_command,
    serve_commands.stop_command,
    serve_commands.download_command,
    chat_command.chat_command,
    checkpoint_commands.convert_command,
    env_command.env_command,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; core errors become a message and a documented exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # Without standalone mode click returns the code of an `Exit` raised inside a command.
        returned = cli.main(args=args, prog_name="internvl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except InternVLError as exc:
        return report(exc, as_json="--json" in args)
    except BrokenPipeError:
        return EXIT_INTERNAL
    return returned if isinstance(returned, int) else 0


def entry_point() -> None:
    sys.exit(main())
