"""Real servers for tests: `internvl launch` in a subprocess, on a free
loopback port, ready when its ready file appears."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log: Path

    @property
    def url(self) -> str:
        return self.ready["url"]

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def server_env(cache: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTERNVL_", "HF_"))}
    env.update(
        INTERNVL_CACHE_DIR=str(cache),
        HOME=str(home),
        XDG_STATE_HOME=str(home / ".state"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def running_server(
    tmp: Path,
    cache: Path,
    *args: str,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    model: tuple[str, ...] = ("-n", "internvl-tiny"),
) -> Iterator[Server]:
    tmp.mkdir(parents=True, exist_ok=True)
    ready_file = tmp / "ready.json"
    log = tmp / "server.log"
    command = [sys.executable, "-m", "internvl_launch", "launch", *model, "--port", "0"]
    command += ["--ready-file", str(ready_file), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env or server_env(cache, tmp))
    try:
        deadline = time.monotonic() + timeout
        while not ready_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in {timeout} s:\n{log.read_text()}")
            time.sleep(0.05)
        yield Server(proc, json.loads(ready_file.read_text()), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def png_bytes(size: tuple[int, int] = (320, 200), seed: int = 0) -> bytes:
    from PIL import Image

    img = Image.effect_mandelbrot(size, (-2 + seed * 0.1, -1, 1, 1), 40).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class CountingListener:
    """A loopback listener that counts connections (and answers with a fixed
    body): proves that a refused URL was never dialled, and serves the URLs a
    test allows."""

    def __init__(
        self, body: bytes = b"", content_type: str = "image/png", drip: float | None = None, chunk: int = 1
    ) -> None:
        """`drip`: seconds between chunks of `chunk` bytes, sent without a Content-Length."""
        self.body = body
        self.chunk = chunk
        self.content_type = content_type
        self.drip = drip
        self.connections = 0
        self.paths: list[str] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                listener.paths.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", listener.content_type)
                if listener.drip is None:
                    self.send_header("Content-Length", str(len(listener.body)))
                self.end_headers()
                try:
                    if listener.drip is None:
                        self.wfile.write(listener.body)
                    else:
                        for i in range(0, len(listener.body), listener.chunk):
                            self.wfile.write(listener.body[i : i + listener.chunk])
                            self.wfile.flush()
                            time.sleep(listener.drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Counting(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn = super().get_request()
                listener.connections += 1
                return conn

        self.server = Counting(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/img.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
