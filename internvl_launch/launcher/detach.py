"""`internvl launch --detach`: start the same launch as a background process
in its own session, and return once it is ready - or fail with its reason.

The child writes a ready file when it is serving; the parent waits for that
file, for the child's exit (a failed start: its exit code and the last lines
of its log become the error), or for the start timeout (the child is
stopped). A detached launch never exits 0 unless the server is ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from internvl_launch.errors import LaunchError
from internvl_launch.launcher.state import logs_dir


def tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def detached_command(args: list[str], ready_file: Path, log_path: Path) -> list[str]:
    """The child's command line: the launch's own flags, then the child's
    ready and log files, then whatever followed `--` (for vLLM), which must
    stay last: after `--` everything is vLLM's."""
    split = args.index("--") if "--" in args else len(args)
    own = ["--ready-file", str(ready_file), "--log-file", str(log_path)]
    return [sys.executable, "-m", "internvl_launch", *args[:split], *own, *args[split:]]


def spawn_detached(args: list[str], *, name: str, start_timeout: float) -> dict[str, Any]:
    """Run `internvl ARGS` in the background; return its ready JSON."""
    directory = logs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = directory / f"{name.replace('/', '_')}-{stamp}-{os.getpid()}.log"
    fd, ready_name = tempfile.mkstemp(prefix="ready-", suffix=".json", dir=directory)
    os.close(fd)
    ready_file = Path(ready_name)
    ready_file.unlink()
    command = detached_command(args, ready_file, log_path)
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + start_timeout
    try:
        while True:
            if ready_file.exists():
                ready = json.loads(ready_file.read_text())
                ready["log"] = str(log_path)
                return ready
            code = child.poll()
            if code is not None:
                last = tail(log_path, 10)
                reason = next((ln for ln in reversed(last.splitlines()) if ln.startswith("error: ")), "")
                raise LaunchError(
                    f"The server exited with code {code} before it was ready"
                    + (f" ({reason.removeprefix('error: ')})" if reason else "")
                    + ".\nLast lines of its log:\n"
                    + last,
                    hint=f"Its log is {log_path}.",
                    details={"exit_code": code, "log": str(log_path)},
                )
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                raise LaunchError(
                    f"The server was not ready within {start_timeout:g} s; it was stopped.",
                    hint=f"Raise --start-timeout, or read its log: {log_path}.",
                    details={"log": str(log_path), "last_log_lines": tail(log_path)},
                )
            time.sleep(0.05)
    finally:
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()
