"""Options shared by several commands, and the conversions from flag text to
typed values (which turn bad values into usage errors, exit code 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from internvl_launch.request import RequestError, parse_engine, parse_format, parse_hub, parse_size

F = TypeVar("F", bound=Callable[..., Any])


def _converter(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except RequestError as exc:
            raise click.BadParameter(str(exc)) from exc

    return convert


def specs_dir_option(f: F) -> F:
    return click.option(
        "--specs-dir",
        "specs_dirs",
        multiple=True,
        type=click.Path(),
        help="Extra directory (or file) of spec YAML; adds to the built-in registry. Repeatable. "
        "Also INTERNVL_SPECS_PATH.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON only, on stdout.")(f)


def model_options(f: F) -> F:
    """The seed-compatible model selection flags, with their short forms."""
    decorators = [
        click.option(
            "--model-name",
            "-n",
            default="",
            help="Family name or alias, or a reference like internvl2:8b-awq. "
            "Optional with --model-path, whose checkpoint describes itself.",
        ),
        click.option(
            "--model-path",
            type=click.Path(file_okay=False),
            help="A local checkpoint directory (original or native layout) instead of a hub download; "
            "layout, backbone, template, tile limit and size are read from its config.",
        ),
        click.option(
            "--template",
            type=click.Choice(["Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5"]),
            help="Conversation template, overriding the spec's or the checkpoint's.",
        ),
        click.option(
            "--size-in-billions", "-s", "size", callback=_converter(parse_size), help="Model size: 8, 8b, 8B, 0.5."
        ),
        click.option("--model-format", "-f", "fmt", callback=_converter(parse_format), help="pytorch or awq."),
        click.option("--quantization", "-q", help="none, 8-bit, 4-bit, Int4, Int8 (case and '-' ignored)."),
        click.option(
            "--model-engine",
            "--engine",
            "-e",
            "engine",
            callback=_converter(parse_engine),
            help="vllm or transformers; chosen for the machine when omitted.",
        ),
        click.option("--hub", callback=_converter(parse_hub), help="huggingface or modelscope (also INTERNVL_HUB)."),
        click.option("--revision", help="Hub revision (branch, tag or commit) to pin."),
        click.option(
            "--device",
            type=click.Choice(["auto", "cuda", "cpu"]),
            default="auto",
            show_default=True,
            help="Where to run.",
        ),
        click.option("--gpus", type=click.IntRange(min=1), help="Number of GPUs to use (default: as few as fit)."),
        click.option("--max-model-len", type=click.IntRange(min=1), help="Context length to plan the KV cache for."),
        click.option("--no-memory-check", is_flag=True, help="Plan even when the memory estimate does not fit."),
        click.option(
            "--vllm-python",
            envvar="INTERNVL_VLLM_PYTHON",
            help="Interpreter that has vLLM installed (default: this one). Also INTERNVL_VLLM_PYTHON.",
        ),
        click.option(
            "--environment",
            "environment_file",
            type=click.Path(dir_okay=False),
            help="Plan for the machine described by this file (`internvl env --json` output) "
            "instead of probing this one.",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return specs_dir_option(f)
