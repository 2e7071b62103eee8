"""`internvl env`: what this machine offers to the resolver."""

from __future__ import annotations

import click

from internvl_launch.cli._options import json_option
from internvl_launch.cli._output import emit_json, emit_table
from internvl_launch.environment import probe_environment


@click.command("env")
@json_option
@click.option(
    "--vllm-python",
    envvar="INTERNVL_VLLM_PYTHON",
    help="Interpreter that has vLLM installed (default: this one). Also INTERNVL_VLLM_PYTHON.",
)
def env_command(as_json: bool, vllm_python: str | None) -> None:
    """Show GPUs, free memory, engines and their versions, cache directories.

    The JSON output can be saved and passed to `resolve --environment FILE` to
    plan for this machine from another one.
    """
    env = probe_environment(vllm_python)
    if as_json:
        emit_json(env.to_dict())
        return
    click.echo(f"GPUs ({env.gpu_probe}):")
    if env.gpus:
        emit_table(
            ("INDEX", "NAME", "TOTAL GiB", "FREE GiB", "COMPUTE"),
            [
                (
                    g.index,
                    g.name,
                    f"{g.memory_total_mib / 1024:.1f}",
                    f"{g.memory_free_mib / 1024:.1f}",
                    g.compute_capability or "-",
                )
                for g in env.gpus
            ],
        )
    else:
        click.echo("  none")
    click.echo(f"host: {env.cpu_count} CPUs, {env.host_memory_available_mib / 1024:.1f} GiB memory available")
    click.echo("engines:")
    for info in env.engines.values():
        state = (
            f"{info.version or '?'}" + (f" ({info.variant})" if info.variant else "")
            if info.available
            else f"unavailable: {info.reason}"
        )
        click.echo(f"  {info.name:<13} {state}  [{info.python}]")
    click.echo("packages:")
    for name, version in env.packages.items():
        click.echo(f"  {name:<16} {version or '-'}")
    click.echo("caches:")
    for name, path in env.cache_dirs.items():
        click.echo(f"  {name:<12} {path}")
