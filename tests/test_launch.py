"""Process control for scripts, for real: `launch --detach`, `ps`, `stop`,
the ready line and ready file, SIGTERM draining, `--config`, and failed
starts that must never exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servers import running_server, server_env

LAUNCH = [sys.executable, "-m", "internvl_launch"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launch-cache")


def internvl(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, env=env, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_detach_ps_stop(tmp_path: Path, cache: Path) -> None:
    env = server_env(cache, tmp_path)
    started = internvl(env, "launch", "-n", "internvl-tiny", "--port", "0", "--detach", "--json")
    assert started.returncode == 0, started.stderr
    ready = json.loads(started.stdout)
    assert ready["event"] == "ready" and ready["engine"] == "transformers" and Path(ready["log"]).is_file()
    assert httpx.get(ready["url"].removesuffix("/v1") + "/health").json() == {"status": "ok"}
    listed = json.loads(internvl(env, "ps", "--json").stdout)
    assert [(r["id"], r["pid"], r["url"]) for r in listed] == [(ready["id"], ready["pid"], ready["url"])]
    stopped = internvl(env, "stop", "internvl-tiny", "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout) == [
        {"id": ready["id"], "pid": ready["pid"], "result": "stopped"}
    ]
    assert gone(ready["pid"])
    assert json.loads(internvl(env, "ps", "--json").stdout) == []
    missing = internvl(env, "stop", "internvl-tiny")
    assert missing.returncode == 11 and "No running server matches" in missing.stderr


def test_detached_child_keeps_its_own_flags_before_the_vllm_passthrough(tmp_path: Path, cache: Path) -> None:
    from internvl_launch.launcher.detach import detached_command

    command = detached_command(["launch", "-n", "x", "--", "--enforce-eager"], Path("r.json"), Path("l.log"))
    assert command[3:] == [
        "launch",
        "-n",
        "x",
        "--ready-file",
        "r.json",
        "--log-file",
        "l.log",
        "--",
        "--enforce-eager",
    ]
    # For real: before, the child's --ready-file went to the engine after `--`, so the parent waited forever.
    env = server_env(cache, tmp_path)
    args = ("launch", "-n", "internvl-tiny", "--port", "0", "--detach", "--json", "--start-timeout", "60")
    started = internvl(env, *args, "--", "--enforce-eager")
    assert started.returncode == 0, started.stderr
    ready = json.loads(started.stdout)
    assert internvl(env, "stop", str(ready["pid"]), "--json").returncode == 0
    assert gone(ready["pid"])


def test_foreground_prints_one_ready_line_and_drains_on_sigterm(tmp_path: Path, cache: Path) -> None:
    with running_server(tmp_path / "fg", cache) as server:
        lines = [ln for ln in server.log_text().splitlines() if ln.startswith("{")]
        assert len(lines) == 1 and json.loads(lines[0]) == server.ready
        assert json.loads((tmp_path / "fg" / "ready.json").read_text()) == server.ready
        body = {
            "model": "internvl-tiny",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 300,
            "stream": True,
        }
        with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # the request is being served
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        # The request in flight when the signal came still got its whole answer.
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.base + "/health")


def test_config_file_mirrors_the_flags(tmp_path: Path, cache: Path) -> None:
    env = server_env(cache, tmp_path)
    config = tmp_path / "launch.yaml"
    config.write_text("model-name: internvl-tiny\nport: 0\nserved_model_name: from-yaml\nmax-batch-size: 2\n")
    started = internvl(env, "launch", "--config", str(config), "--detach", "--json")
    assert started.returncode == 0, started.stderr
    ready = json.loads(started.stdout)
    try:
        assert ready["model"] == "from-yaml"
        models = httpx.get(ready["url"] + "/models").json()
        assert [m["id"] for m in models["data"]] == ["from-yaml"]
    finally:
        assert internvl(env, "stop", "--all").returncode == 0
    config.write_text("model-name: internvl-tiny\nno-such-flag: 1\n")
    bad = internvl(env, "launch", "--config", str(config), "--dry-run")
    assert bad.returncode == 2 and "unknown key 'no-such-flag'" in bad.stderr


def test_failed_start_is_never_exit_zero(tmp_path: Path, cache: Path) -> None:
    env = server_env(cache, tmp_path)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    try:
        fg = internvl(env, "launch", "-n", "internvl-tiny", "--port", port)
        assert fg.returncode == 11 and "Cannot listen on 127.0.0.1:" + port in fg.stderr and fg.stdout == ""
        bg = internvl(env, "launch", "-n", "internvl-tiny", "--port", port, "--detach")
        assert bg.returncode == 11
        assert "exited with code 11 before it was ready (Cannot listen on" in bg.stderr
    finally:
        taken.close()
    slow = internvl(env, "launch", "-n", "internvl-tiny", "--port", "0", "--detach", "--start-timeout", "0.5")
    assert slow.returncode == 11 and "not ready within 0.5 s; it was stopped" in slow.stderr
    assert json.loads(internvl(env, "ps", "--json").stdout) == []
