"""Records of running servers, so `internvl ps` and `internvl stop` find what
`internvl launch` started: one JSON file per server in the state directory,
written atomically when the server is ready and removed when it exits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from internvl_launch.errors import LaunchError
from internvl_launch.paths import state_dir


@dataclass(frozen=True)
class ServerRecord:
    id: str
    pid: int
    url: str
    model: str
    engine: str
    started: float
    log: str | None = None
    process_start: str | None = None  # /proc start time, to tell a reused pid apart

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def servers_dir() -> Path:
    return state_dir() / "servers"


def logs_dir() -> Path:
    return state_dir() / "logs"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(record: ServerRecord) -> bool:
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if record.process_start is not None:
        started = process_start_time(record.pid)
        if started is not None and started != record.process_start:
            return False
        if _zombie(record.pid):
            return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def write_record(record: ServerRecord) -> Path:
    directory = servers_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=2))
    os.replace(tmp, path)
    return path


def remove_record(record_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (servers_dir() / f"{record_id}.json").unlink()


def list_records(prune: bool = True) -> list[ServerRecord]:
    """Live servers, oldest first; records of dead ones are removed."""
    out = []
    directory = servers_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*.json")):
        try:
            record = ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if alive(record):
            out.append(record)
        elif prune:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return sorted(out, key=lambda r: r.started)


def find_records(name: str | None, everything: bool) -> list[ServerRecord]:
    records = list_records()
    if everything:
        return records
    chosen = [r for r in records if name in (r.id, r.model, str(r.pid))]
    if not chosen:
        running = ", ".join(r.id for r in records) or "none"
        raise LaunchError(f"No running server matches {name!r}.", hint=f"Running: {running}. See `internvl ps`.")
    return chosen


def stop_server(record: ServerRecord, timeout: float) -> str:
    """SIGTERM, wait up to `timeout` for a graceful exit, then SIGKILL.
    Returns "stopped" or "killed"."""
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        remove_record(record.id)
        return "stopped"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(record):
            remove_record(record.id)
            return "stopped"
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        if _leads_group(record.pid):  # a detached launch: its children go with it
            os.killpg(record.pid, signal.SIGKILL)
        else:
            os.kill(record.pid, signal.SIGKILL)
    for _ in range(100):
        if not alive(record):
            break
        time.sleep(0.05)
    remove_record(record.id)
    return "killed"


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
