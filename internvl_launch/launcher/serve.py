"""Running a plan in the foreground: load the engine, serve, announce
readiness once, drain on SIGTERM.

Readiness is announced exactly once, when the server listens *and* a warm-up
request with an image has gone through the model: one JSON line on stdout
(`{"event": "ready", ...}`), the same JSON in `--ready-file` (written
atomically), and a record in the state directory for `internvl ps` / `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.errors import LaunchError
from internvl_launch.launcher.state import ServerRecord, process_start_time, remove_record, write_record
from internvl_launch.resolver import LaunchPlan


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    ready_file: Path | None = None
    log_file: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tiles: int | None = None
    max_images: int = 16
    allowed_local_media_path: Path | None = None
    allow_private_media: bool = False
    allowed_media_domains: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    media_timeout: float = 15.0
    drain_timeout: float = 30.0
    start_timeout: float = 600.0
    trust_remote_code: bool = False
    allow_pickle: bool = False
    vllm_args: tuple[str, ...] = ()
    nodes: int = 1
    on_engine_fault: str = "exit"  # or "keep-serving"
    #: InternVL3.5's thinking mode for requests that do not set
    #: `chat_template_kwargs.enable_thinking` (only for specs with `thinking`).
    enable_thinking: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def name(self, plan: LaunchPlan) -> str:
        return self.served_model_name or plan.model_name


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the port is known before
    the server starts and no other process can take it in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise LaunchError(
            f"Cannot listen on {host}:{port}: {err.strerror or err}.",
            hint="Pick another --port (0 picks a free one), or stop what is using it (`internvl ps`).",
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/v1"


def new_record(name: str, options: ServeOptions, port: int, engine: str, log: str | None) -> ServerRecord:
    """The state record of the server this process is about to run."""
    return ServerRecord(
        id=f"{name.replace('/', '_')}-{port}",
        pid=os.getpid(),
        url=url_for(options.host, port),
        model=name,
        engine=engine,
        started=time.time(),
        log=log,
        process_start=process_start_time(os.getpid()),
    )


def ready_event(record: ServerRecord, plan: LaunchPlan, port: int, t_start: float, **extra: Any) -> dict[str, Any]:
    """The ready JSON: the same keys for both engines, plus engine-specific ones."""
    return {
        "event": "ready",
        "id": record.id,
        "url": record.url,
        "pid": record.pid,
        "model": record.model,
        "model_ref": plan.model_ref,
        "engine": record.engine,
        "port": port,
        "log": record.log,
        **extra,
        "ready_s": round(time.perf_counter() - t_start, 3),
    }


def announce(ready: dict[str, Any], ready_file: Path | None) -> None:
    """The one ready line on stdout, and the ready file."""
    line = json.dumps(ready)
    if ready_file is not None:
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(line + "\n")
        os.replace(tmp, ready_file)
    print(line, flush=True)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("internvl_launch")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _after_drain(signum: int, frame: Any) -> None:
    """Installed under uvicorn's own handlers; runs once uvicorn has drained."""


def serve_transformers(
    plan: LaunchPlan, weights: Path, options: ServeOptions, say: Callable[[str], None], t_start: float
) -> int:
    """Load the Transformers engine and serve until SIGINT/SIGTERM. Returns
    the exit code: 0 after a clean shutdown."""
    import uvicorn

    from internvl_launch.engines.transformers_engine import TransformersEngine
    from internvl_launch.server.app import ServerConfig, create_app
    from internvl_launch.server.fetch import FetchPolicy, MediaFetcher
    from internvl_launch.server.metrics import Metrics
    from internvl_launch.server.service import ChatService, ServiceLimits

    configure_logging()
    sock = bind(options.host, options.port)
    port = sock.getsockname()[1]
    say(f"loading {plan.model_ref} from {weights} ({plan.device}, {plan.dtype}, quantization {plan.quantization})")
    engine = TransformersEngine.for_plan(plan, weights)
    say(f"loaded in {engine.load_seconds:.1f} s")
    spec = plan.spec
    limits = ServiceLimits(
        max_tiles=min(options.max_tiles or spec.max_tiles, spec.max_tiles) if options.max_tiles else spec.max_tiles,
        max_images=options.max_images,
        max_model_len=plan.max_model_len,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
    )
    fetcher = MediaFetcher(
        FetchPolicy(
            allow_private=options.allow_private_media,
            allowed_domains=options.allowed_media_domains,
            allowed_local_dir=options.allowed_local_media_path,
            timeout_s=options.media_timeout,
        )
    )
    name = options.name(plan)
    service = ChatService(engine, spec, limits=limits, fetcher=fetcher, thinking=options.enable_thinking)
    app = create_app(
        service,
        ServerConfig(
            served_model_name=name,
            aliases=(plan.model_name, plan.model_ref),
            api_key=options.api_key,
            allowed_origins=options.allowed_origins,
        ),
        Metrics(),
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(options.drain_timeout)),
        lifespan="on",
        access_log=False,
    )
    server = uvicorn.Server(config)
    record = new_record(name, options, port, "transformers", options.log_file)
    outcome: dict[str, Any] = {}

    async def watch() -> None:
        while not server.started:
            await asyncio.sleep(0.02)
        state = app.state.internvl
        while not state.ready and state.status != "unhealthy":
            await asyncio.sleep(0.02)
        if state.status == "unhealthy":
            outcome["error"] = "the warm-up request with an image failed"
            server.should_exit = True
            return
        write_record(record)
        announce_ready()
        while True:  # after ready: an engine fault ends the launch, unless asked to keep serving
            await asyncio.sleep(0.1)
            if service.batcher.fault is not None and options.on_engine_fault == "exit":
                outcome["fault"] = service.batcher.fault
                server.should_exit = True
                return

    def announce_ready() -> None:
        warm = app.state.internvl.warmup_s or 0.0
        ready = ready_event(record, plan, port, t_start, load_s=round(engine.load_seconds, 3), warmup_s=round(warm, 3))
        announce(ready, options.ready_file)

    async def main() -> None:
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was installed before it: make that one a no-op, so a graceful stop
    # ends with exit code 0 rather than death by signal.
    previous = {sig: signal.signal(sig, _after_drain) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_record(record.id)
        sock.close()
    if "error" in outcome:
        raise LaunchError(f"The server did not become ready: {outcome['error']}.")
    if "fault" in outcome:
        raise LaunchError(
            f"The engine failed while serving ({outcome['fault']}); the server stopped.",
            hint="Read the log above; --on-engine-fault keep-serving keeps the process up (health answers 503).",
        )
    say("stopped")
    return 0
