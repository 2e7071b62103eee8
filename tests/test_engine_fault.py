"""An engine that fails, through a real server process: readiness is never
announced when the warm-up fails; a failure while serving gives in-flight
requests an error (an SSE error event, never a normal end), turns /health to
503, and ends the launch with exit code 11 unless asked to keep serving.
The failure is injected at the N-th generate call (INTERNVL_INJECT_ENGINE_FAULT)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from servers import running_server, server_env

CHAT = {"model": "internvl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def env_with_fault(tmp: Path, call: int) -> dict[str, str]:
    env = server_env(tmp / "cache", tmp)
    env["INTERNVL_INJECT_ENGINE_FAULT"] = str(call)
    return env


def test_failed_warm_up_is_never_ready(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "internvl_launch", "launch", "-n", "internvl-tiny", "--port", "0"],
        capture_output=True, text=True, env=env_with_fault(tmp_path, 1), timeout=300,
    )  # fmt: skip
    assert done.returncode == 11 and done.stdout == ""
    assert "did not become ready: the warm-up request with an image failed" in done.stderr


def test_fault_while_serving_keep_serving(tmp_path: Path) -> None:
    env = env_with_fault(tmp_path, 2)
    with running_server(tmp_path, tmp_path / "cache", "--on-engine-fault", "keep-serving", env=env) as server:
        with httpx.stream("POST", server.url + "/chat/completions", json={**CHAT, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "data: [DONE]" not in events
        assert json.loads(events[-1][6:])["error"]["code"] == "engine_unavailable"
        assert httpx.get(server.base + "/health").status_code == 503
        again = httpx.post(server.url + "/chat/completions", json=CHAT, timeout=60)
        assert again.status_code == 503 and again.json()["error"]["type"] == "server_error"
        assert "Traceback" not in again.text and server.proc.poll() is None


def test_fault_while_serving_ends_the_launch(tmp_path: Path) -> None:
    env = env_with_fault(tmp_path, 2)
    with running_server(tmp_path, tmp_path / "cache", env=env) as server:
        r = httpx.post(server.url + "/chat/completions", json=CHAT, timeout=60)
        assert r.status_code == 503
        assert server.proc.wait(60) == 11
        assert "The engine failed while serving (RuntimeError)" in server.log_text()
