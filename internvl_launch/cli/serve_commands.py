"""`internvl launch`, `ps`, `stop` and `download`: serving and the process
control scripts need. Heavy imports (torch, fastapi, uvicorn) happen inside
the commands, only when a server is really started."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from internvl_launch.cli._options import json_option, model_options
from internvl_launch.cli._output import emit_json, emit_table, note
from internvl_launch.cli.plan_commands import launch_plan_json, plan_from_flags, render_plan
from internvl_launch.errors import EngineUnavailableError
from internvl_launch.prompt.thinking import supports_thinking, thinking_unsupported

#: Flags that only the parent of a detached launch uses.
_PARENT_ONLY = {"detach", "as_json", "ready_file", "log_file", "config", "start_timeout", "dry_run"}


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--config launch.yaml`: its keys are the long flag names (with - or _);
    flags given on the command line win."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except OSError as err:
        raise click.BadParameter(f"cannot read {value}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise click.BadParameter(f"{value} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must be a mapping of flag names to values")
    names: dict[str, str] = {}
    for p in ctx.command.params:
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                names[opt[2:]] = p.name  # type: ignore[assignment]
                names[opt[2:].replace("-", "_")] = p.name  # type: ignore[assignment]
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        if key not in names or names[key] == "config":
            raise click.BadParameter(f"{value}: unknown key {key!r} (keys are the long flag names, e.g. model-name)")
        defaults[names[key]] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _child_args(ctx: click.Context) -> list[str]:
    """The launch's flags again, for the detached child: everything given on
    the command line or in --config, but not the parent-only flags."""
    args = ["launch"]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in _PARENT_ONLY:
            continue
        source = ctx.get_parameter_source(p.name)  # type: ignore[arg-type]
        if source in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params.get(p.name)  # type: ignore[arg-type]
        flag = next(o for o in p.opts if o.startswith("--"))
        if p.is_flag:
            if value:
                args.append(flag)
        elif p.multiple:
            for v in value or ():
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, _flag_text(p.name, value)]  # type: ignore[arg-type]
    extra = ctx.params.get("engine_args") or ()
    if extra:
        args += ["--", *extra]
    return args


def _flag_text(name: str, value: Any) -> str:
    if name == "size" and isinstance(value, float):
        return f"{value:g}"
    return str(value)


def serve_options(f: Any) -> Any:
    decorators = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option(
            "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port)."
        ),
        click.option("--served-model-name", help="The model name clients send (default: the family name)."),
        click.option(
            "--api-key",
            envvar="INTERNVL_API_KEY",
            help="Require `Authorization: Bearer KEY` (also INTERNVL_API_KEY). Never logged.",
        ),
        click.option("--detach", is_flag=True, help="Start in the background; return once ready (or failed)."),
        click.option("--ready-file", type=click.Path(dir_okay=False), help="Write the ready JSON here when serving."),
        click.option("--log-file", hidden=True),
        click.option(
            "--start-timeout", type=float, default=600.0, show_default=True, help="Seconds --detach waits for ready."
        ),
        click.option(
            "--drain-timeout",
            type=float,
            default=30.0,
            show_default=True,
            help="On SIGTERM, seconds to let running requests finish.",
        ),
        click.option("--max-batch-size", type=click.IntRange(1, 256), default=8, show_default=True),
        click.option(
            "--max-queue",
            type=click.IntRange(1, 100000),
            default=64,
            show_default=True,
            help="Requests running or waiting before new ones get 429.",
        ),
        click.option("--max-tiles", type=click.IntRange(1, 256), help="Most tiles per image (default: the spec's)."),
        click.option("--max-images-per-request", type=click.IntRange(1, 256), default=16, show_default=True),
        click.option(
            "--allowed-local-media-path",
            type=click.Path(file_okay=False, exists=True),
            help="Let requests name local files under this directory (off by default).",
        ),
        click.option(
            "--allow-private-media-urls",
            is_flag=True,
            help="Let media URLs reach private and loopback addresses (off by default).",
        ),
        click.option(
            "--allowed-media-domain",
            "allowed_media_domains",
            multiple=True,
            help="Only fetch media URLs from this domain (and its subdomains). Repeatable.",
        ),
        click.option(
            "--media-timeout",
            type=click.FloatRange(min=0.1),
            default=15.0,
            show_default=True,
            help="Seconds one media URL may take to fetch, redirects included.",
        ),
        click.option("--allowed-origin", "allowed_origins", multiple=True, help="CORS origin to allow. Repeatable."),
        click.option(
            "--nodes",
            type=click.IntRange(1, 1024),
            default=1,
            show_default=True,
            help="vLLM only: machines of a running Ray cluster to spread the model over (one pipeline stage each).",
        ),
        click.option(
            "--on-engine-fault",
            type=click.Choice(["exit", "keep-serving"]),
            default="exit",
            show_default=True,
            help="When generation fails: stop with exit code 11, or keep the process up with /health at 503.",
        ),
        click.option(
            "--enable-thinking",
            is_flag=True,
            help="InternVL3.5's thinking mode for every request that does not set "
            "chat_template_kwargs.enable_thinking: the model cards' reasoning system prompt, and replies split "
            "into reasoning_content and content.",
        ),
        click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code (opt-in)."),
        click.option(
            "--allow-pickle",
            is_flag=True,
            help="Also fetch other pickles (*.pt, *.ckpt) and read pickle weights that hold more than tensors "
            "(the full unpickler runs code); tensor-only pytorch_model*.bin weights need no flag.",
        ),
        click.option(
            "--config",
            type=click.Path(dir_okay=False),
            is_eager=True,
            expose_value=True,
            callback=_load_config,
            help="YAML file of flag values (keys are the long flag names).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


@click.command("launch", context_settings={"ignore_unknown_options": False})
@model_options
@serve_options
@json_option
@click.option("--dry-run", is_flag=True, help="Print the plan (as `resolve --explain`) and stop.")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch_command(ctx: click.Context, as_json: bool, dry_run: bool, engine_args: tuple[str, ...], **flags: Any) -> int:
    """Launch a model behind an OpenAI-compatible server.

    \b
    Foreground by default (Ctrl-C or SIGTERM stops it, after draining); one
    JSON line {"event": "ready", "url": ...} goes to stdout when it serves.
    --detach returns once the server is ready, with its pid, url and log.
    Arguments after `--` go to the vLLM server untouched.
    """
    t_start = time.perf_counter()
    plan, env = plan_from_flags(flags)
    if flags["enable_thinking"] and not supports_thinking(plan.spec):
        raise click.UsageError(thinking_unsupported(plan.model_ref))
    if dry_run:
        if as_json:
            emit_json(launch_plan_json(plan, env))
        else:
            render_plan(plan, env, True)
        return 0
    if flags["detach"]:
        from internvl_launch.launcher.detach import spawn_detached

        ready = spawn_detached(
            _child_args(ctx), name=flags["served_model_name"] or plan.model_name, start_timeout=flags["start_timeout"]
        )
        if as_json:
            emit_json(ready)
        else:
            click.echo(f"{ready['model']} ready at {ready['url']} (pid {ready['pid']}, engine {ready['engine']})")
            click.echo(f"log: {ready['log']}")
            click.echo(f"stop with: internvl stop {ready['id']}")
        return 0

    from internvl_launch.launcher.serve import ServeOptions
    from internvl_launch.weights import locate_weights

    options = ServeOptions(
        host=flags["host"],
        port=flags["port"],
        served_model_name=flags["served_model_name"],
        api_key=flags["api_key"],
        ready_file=Path(flags["ready_file"]) if flags["ready_file"] else None,
        log_file=flags["log_file"],
        max_batch=flags["max_batch_size"],
        max_queue=flags["max_queue"],
        max_tiles=flags["max_tiles"],
        max_images=flags["max_images_per_request"],
        allowed_local_media_path=Path(flags["allowed_local_media_path"]) if flags["allowed_local_media_path"] else None,
        allow_private_media=flags["allow_private_media_urls"],
        allowed_media_domains=tuple(flags["allowed_media_domains"]),
        allowed_origins=tuple(flags["allowed_origins"]),
        media_timeout=flags["media_timeout"],
        drain_timeout=flags["drain_timeout"],
        start_timeout=flags["start_timeout"],
        trust_remote_code=flags["trust_remote_code"],
        allow_pickle=flags["allow_pickle"],
        vllm_args=engine_args,
        nodes=flags["nodes"],
        on_engine_fault=flags["on_engine_fault"],
        enable_thinking=flags["enable_thinking"],
    )

    def say(message: str) -> None:
        note(f"internvl: {message}")

    if plan.engine == "transformers" and flags["nodes"] > 1:
        raise EngineUnavailableError(
            "--nodes spreads a model over several machines with vLLM and Ray; the Transformers engine runs on one.",
            hint="Pass --model-engine vllm (with a Ray cluster running), or drop --nodes.",
        )
    if plan.engine == "transformers":
        from internvl_launch.engines.transformers_engine import require_supported

        require_supported(plan)
    weights = locate_weights(
        plan,
        trust_remote_code=flags["trust_remote_code"],
        allow_pickle=flags["allow_pickle"],
        notify=say,
    )
    if plan.engine == "vllm":
        from internvl_launch.launcher.vllm import serve_vllm

        return serve_vllm(plan, weights, options, say, t_start)
    from internvl_launch.launcher.serve import serve_transformers

    return serve_transformers(plan, weights, options, say, t_start)


@click.command("ps")
@json_option
def ps_command(as_json: bool) -> None:
    """List the servers `internvl launch` started on this machine."""
    from internvl_launch.launcher.state import list_records

    records = list_records()
    if as_json:
        emit_json([r.to_dict() for r in records])
        return
    if not records:
        note("no servers running")
        return
    now = time.time()
    emit_table(
        ["ID", "MODEL", "ENGINE", "PID", "URL", "UP"],
        [(r.id, r.model, r.engine, r.pid, r.url, f"{int(now - r.started)}s") for r in records],
    )


@click.command("stop")
@click.argument("name", required=False)
@click.option("--all", "everything", is_flag=True, help="Stop every server launched on this machine.")
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait after SIGTERM before SIGKILL."
)
@json_option
def stop_command(name: str | None, everything: bool, timeout: float, as_json: bool) -> None:
    """Stop a launched server by id, model name or pid (gracefully, then forced)."""
    from internvl_launch.launcher.state import find_records, stop_server

    if not name and not everything:
        raise click.UsageError("Name a server (see `internvl ps`), or pass --all.")
    results = [{"id": r.id, "pid": r.pid, "result": stop_server(r, timeout)} for r in find_records(name, everything)]
    if as_json:
        emit_json(results)
    else:
        for r in results:
            click.echo(f"{r['id']}: {r['result']}")


@click.command("download")
@model_options
@json_option
@click.option("--trust-remote-code", is_flag=True, help="Also fetch the repository's Python files.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also fetch other pickles (*.pt, *.ckpt); tensor-only pytorch_model*.bin weights need no flag.",
)
def download_command(as_json: bool, trust_remote_code: bool, allow_pickle: bool, **flags: Any) -> None:
    """Fetch a model's weights into the hub cache (for CI and offline use)."""
    from internvl_launch.weights import fetch_weights

    flags["no_memory_check"] = True
    plan, _env = plan_from_flags(flags)
    started = time.perf_counter()
    fetched = fetch_weights(
        plan,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        notify=lambda m: note(f"internvl: {m}"),
    )
    data = fetched.to_dict()
    data["model"] = plan.model_ref
    data["seconds"] = round(time.perf_counter() - started, 3)
    if as_json:
        emit_json(data)
    else:
        click.echo(f"{plan.model_ref}: {data['path']}")
