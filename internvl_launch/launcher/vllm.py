"""The vLLM engine: vLLM's own OpenAI server as a supervised child process.

`vllm_command` maps a plan onto the server's flags (a pure function, so the
mapping is tested without starting anything). `serve_vllm` starts it with the
plan's interpreter, streams its log with a prefix into our stderr and a log
file, waits for its `/health`, sends one warm-up chat with an image, then
announces readiness exactly as the Transformers server does. SIGINT and
SIGTERM are forwarded; its exit code becomes ours. A child that dies during
start-up becomes a `LaunchError` carrying the last lines of its log.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from internvl_launch.errors import LaunchError
from internvl_launch.launcher.serve import ServeOptions, announce, new_record, ready_event, url_for
from internvl_launch.launcher.state import logs_dir, remove_record, write_record
from internvl_launch.prompt.thinking import THINKING_SYSTEM_PROMPT, supports_thinking
from internvl_launch.resolver import VLLM_VIDEO_ARCHS, LaunchPlan
from internvl_launch.weights import checkpoint_layout

#: Flags we set from the plan; passing them again after `--` is refused.
OWNED_FLAGS = (
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--dtype",
    "--max-model-len",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--api-key",
)


def _dtype(plan: LaunchPlan) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(plan.dtype, "auto")


def vllm_command(plan: LaunchPlan, weights: Path, options: ServeOptions, port: int) -> list[str]:
    """The child's command line for this plan."""
    spec = plan.spec
    max_tiles = min(options.max_tiles or spec.max_tiles, spec.max_tiles)
    name = options.name(plan)
    names = list(dict.fromkeys([name, plan.model_name]))
    command = [
        plan.engine_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(weights),
        "--served-model-name",
        *names,
        "--host",
        options.host,
        "--port",
        str(port),
        "--dtype",
        _dtype(plan),
        "--max-model-len",
        str(plan.max_model_len),
        "--generation-config",
        "auto",  # the checkpoint's end tokens stop generation
    ]
    if plan.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(plan.tensor_parallel_size)]
    if options.nodes > 1:
        # Several machines: one pipeline stage per machine over an existing Ray
        # cluster; tensor parallelism stays inside each machine.
        command += ["--pipeline-parallel-size", str(options.nodes), "--distributed-executor-backend", "ray"]
    if plan.quantization_config and plan.quantization_config.get("method") == "awq":
        command += ["--quantization", "awq"]
    passed = {flag.split("=", 1)[0] for flag in options.vllm_args}
    if plan.mm_encoder_tp_mode and "--mm-encoder-tp-mode" not in passed:
        # The vision tower's heads do not divide the tensor-parallel size.
        command += ["--mm-encoder-tp-mode", plan.mm_encoder_tp_mode]
    video = spec.llm.arch in VLLM_VIDEO_ARCHS  # vLLM takes InternVL video only with these language models
    command += ["--limit-mm-per-prompt", json.dumps({"image": options.max_images, "video": 1 if video else 0})]
    # Native checkpoints tile through Transformers' processor (max_patches);
    # original ones through vLLM's own InternVL code (max_dynamic_patch). What
    # vLLM gets is what is on disk: an original spec arrives converted unless
    # it is served with its own code.
    layout = checkpoint_layout(weights) if (weights / "config.json").is_file() else spec.layout
    key = "max_patches" if layout == "native" else "max_dynamic_patch"
    command += ["--mm-processor-kwargs", json.dumps({key: max_tiles})]
    if plan.device == "cpu":
        command += ["--gpu-memory-utilization", "0.3"]  # the CPU build sizes host memory from it
    if supports_thinking(spec):
        command += _thinking_flags(weights, options, passed)
    if options.api_key:
        command += ["--api-key", options.api_key]
    if options.trust_remote_code:
        command += ["--trust-remote-code"]
    for flag in options.vllm_args:
        if flag.split("=", 1)[0] in OWNED_FLAGS:
            raise LaunchError(
                f"{flag.split('=', 1)[0]} is set by internvl launch; it cannot be passed after `--`.",
                hint="Use the launch flag instead (for example --port, --served-model-name).",
            )
    command += list(options.vllm_args)
    return command


#: vLLM's parser for `<think>` ... `</think>` replies of Qwen3 backbones: it reads
#: `enable_thinking` from the request's chat_template_kwargs (merged over
#: --default-chat-template-kwargs), so an answer without thinking stays content.
REASONING_PARSER = "qwen3"


def _thinking_flags(weights: Path, options: ServeOptions, passed: set[str]) -> list[str]:
    """InternVL3.5's thinking mode on vLLM's server: the launch default as
    `enable_thinking` for requests that do not set it, vLLM's `<think>` parser
    (replies split into `reasoning` and `content`), and the checkpoint's chat
    template wrapped so that `enable_thinking` puts the model cards' reasoning
    system prompt where the default one goes, as our own server does. Flags
    given after `--` win."""
    flags: list[str] = []
    if "--default-chat-template-kwargs" not in passed:
        kwargs = {"enable_thinking": options.enable_thinking}
        flags += ["--default-chat-template-kwargs", json.dumps(kwargs)]
    if "--reasoning-parser" not in passed:
        flags += ["--reasoning-parser", REASONING_PARSER]
    base = checkpoint_chat_template(weights)
    if base is not None and "--chat-template" not in passed:
        flags += ["--chat-template", thinking_chat_template(base)]
    return flags


def checkpoint_chat_template(weights: Path) -> str | None:
    """The chat template the checkpoint ships (chat_template.jinja,
    tokenizer_config.json or chat_template.json), or None."""
    jinja = weights / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = weights / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str) and template:
            return template
    return None


def thinking_chat_template(base: str) -> str:
    """`base` behind a preamble: with `enable_thinking` true and no system
    message in the conversation, the reasoning system prompt becomes its
    system message (a string or a text part, as the conversation's first
    message has it), so `base` writes it in place of its default."""
    prompt = json.dumps(THINKING_SYSTEM_PROMPT)
    return (
        "{%- if enable_thinking is defined and enable_thinking "
        "and (messages | length == 0 or messages[0]['role'] != 'system') -%}"
        "{%- if messages | length > 0 and messages[0]['content'] is not string -%}"
        "{%- set messages = [{'role': 'system', 'content': [{'type': 'text', 'text': " + prompt + "}]}] + messages -%}"
        "{%- else -%}"
        "{%- set messages = [{'role': 'system', 'content': " + prompt + "}] + messages -%}"
        "{%- endif -%}"
        "{%- endif -%}" + base
    )


def _free_port(host: str) -> int:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _LogPump:
    """Copies the child's output to our stderr with a prefix and to a log
    file, keeping the last lines for error messages. The API key is masked."""

    def __init__(self, stream: Any, log_path: Path, secret: str | None) -> None:
        self.last: collections.deque[str] = collections.deque(maxlen=30)
        self._secret = secret
        self._thread = threading.Thread(target=self._run, args=(stream, log_path), daemon=True)
        self._thread.start()

    def _run(self, stream: Any, log_path: Path) -> None:
        with log_path.open("a", encoding="utf-8") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if self._secret:
                    line = line.replace(self._secret, "***")
                self.last.append(line)
                log.write(line + "\n")
                log.flush()
                sys.stderr.write(f"[vllm] {line}\n")
                sys.stderr.flush()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def tail(self, n: int = 15) -> str:
        return "\n".join(list(self.last)[-n:])


def serve_vllm(
    plan: LaunchPlan, weights: Path, options: ServeOptions, say: Callable[[str], None], t_start: float
) -> int:
    """Run vLLM's server until it exits or we are signalled; return its exit code."""
    port = options.port or _free_port(options.host)
    command = vllm_command(plan, weights, options, port)
    name = options.name(plan)
    directory = logs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"vllm-{name.replace('/', '_')}-{port}-{os.getpid()}.log"
    shown = [("***" if options.api_key and part == options.api_key else part) for part in command]
    say("starting vLLM: " + " ".join(shown))
    say(f"its log: {log_path}")
    try:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as err:
        raise LaunchError(f"Cannot start {plan.engine_python}: {err.strerror or err}.") from None
    pump = _LogPump(child.stdout, log_path, options.api_key)
    stop_requested: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stop_requested.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    base = url_for(options.host, port).removesuffix("/v1")
    record = new_record(name, options, port, "vllm", options.log_file or str(log_path))
    try:
        _wait_ready(child, pump, base, options, stop_requested)
        warm = _warm_up(base, name, options.api_key)
        write_record(record)
        ready = ready_event(record, plan, port, t_start, engine_pid=child.pid, warmup_s=round(warm, 3))
        announce(ready, options.ready_file)
        code = child.wait()
    except BaseException:
        _terminate(child, options.drain_timeout)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_record(record.id)
        _reap_group(child.pid)
        pump.join(5)
    if stop_requested:
        say(f"vLLM stopped (exit code {code})")
        return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
    raise LaunchError(
        f"vLLM exited with code {code} while serving.\nLast lines of its log:\n{pump.tail()}",
        details={"exit_code": code, "log": str(log_path)},
    )


def _wait_ready(
    child: subprocess.Popen[bytes], pump: _LogPump, base: str, options: ServeOptions, stop: list[int]
) -> None:
    import httpx

    deadline = time.monotonic() + options.start_timeout
    while True:
        code = child.poll()
        if code is not None:
            pump.join(5)
            if stop:
                raise LaunchError("Stopped before vLLM was ready.")
            raise LaunchError(
                f"vLLM exited with code {code} during start-up.\nLast lines of its log:\n{pump.tail()}",
                hint="Read the log above; --vllm-python picks another interpreter.",
                details={"exit_code": code},
            )
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise LaunchError(f"vLLM was not ready within {options.start_timeout:g} s; it was stopped.")
        time.sleep(0.5)


def _warm_up(base: str, name: str, api_key: str | None) -> float:
    """One chat with a generated image through vLLM; a failure stops the launch."""
    import httpx

    from internvl_launch.server.service import warmup_image

    started = time.perf_counter()
    image = "data:image/png;base64," + base64.b64encode(warmup_image()).decode()
    body = {
        "model": name,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Hi"}],
            }
        ],
        "max_tokens": 2,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=300)
    except httpx.HTTPError as err:
        raise LaunchError(f"The warm-up request to vLLM failed: {type(err).__name__}.") from None
    if r.status_code != 200:
        raise LaunchError(
            f"The warm-up request with an image failed: vLLM answered HTTP {r.status_code}: {r.text[:300]}"
        )
    return time.perf_counter() - started


def _reap_group(pgid: int, timeout: float = 5.0) -> None:
    """vLLM leaves helpers (its engine core, its multiprocessing resource
    tracker) in its process group when it dies; end them with it: SIGTERM,
    then SIGKILL after `timeout`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a running (not zombie) member."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _terminate(child: subprocess.Popen[bytes], timeout: float) -> None:
    if child.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
