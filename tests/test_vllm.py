"""The vLLM engine: how a plan maps onto vLLM's server flags (always run),
and the supervisor against a real vLLM child (marked `vllm`): a child that
dies during start-up, and one killed while serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_env
from servers import server_env

from internvl_launch.errors import LaunchError
from internvl_launch.launcher.serve import ServeOptions
from internvl_launch.launcher.vllm import group_alive, vllm_command
from internvl_launch.registry import load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import resolve_plan


def plan_for(model: str, size: float, quantization: str | None = None, fmt: str | None = None, gpus: int = 1):
    env = make_env([("NVIDIA H100 80GB HBM3", 80)] * gpus)
    request = LaunchRequest(model_name=model, size=size, quantization=quantization, format=fmt, engine="vllm")
    return resolve_plan(load_registry(), request, env)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_maps_the_plan() -> None:
    plan = plan_for("internvl2.5", 8)
    options = ServeOptions(host="0.0.0.0", served_model_name="vl", api_key="k", max_images=4, max_tiles=6)
    command = vllm_command(plan, Path("/w"), options, 9000)
    assert command[:3] == [plan.engine_python, "-m", "vllm.entrypoints.openai.api_server"]
    assert (
        flag(command, "--model") == "/w" and flag(command, "--port") == "9000" and flag(command, "--host") == "0.0.0.0"
    )
    served = command[command.index("--served-model-name") + 1 : command.index("--host")]
    assert served == ["vl", "internvl2.5"]
    assert flag(command, "--dtype") == "bfloat16" and flag(command, "--max-model-len") == str(plan.max_model_len)
    assert json.loads(flag(command, "--limit-mm-per-prompt")) == {"image": 4, "video": 0}  # InternLM2 backbone
    assert json.loads(flag(command, "--mm-processor-kwargs")) == {"max_dynamic_patch": 6}  # original layout
    assert (
        flag(command, "--api-key") == "k" and "--quantization" not in command and "--trust-remote-code" not in command
    )
    assert "--gpu-memory-utilization" not in command


def test_awq_tensor_parallel_and_passthrough() -> None:
    awq = plan_for("internvl2.5", 78, quantization="Int4", fmt="awq")
    command = vllm_command(awq, Path("/w"), ServeOptions(vllm_args=("--enforce-eager", "--seed", "3")), 8000)
    assert flag(command, "--quantization") == "awq" and "--tensor-parallel-size" not in command
    assert command[-3:] == ["--enforce-eager", "--seed", "3"]
    big = plan_for("internvl2.5", 78, gpus=4)  # bf16 78B needs several GPUs
    assert big.tensor_parallel_size > 1
    command = vllm_command(big, Path("/w"), ServeOptions(), 8000)
    assert flag(command, "--tensor-parallel-size") == str(big.tensor_parallel_size)
    ray = vllm_command(big, Path("/w"), ServeOptions(nodes=2), 8000)
    assert flag(ray, "--pipeline-parallel-size") == "2" and flag(ray, "--distributed-executor-backend") == "ray"
    assert "--distributed-executor-backend" not in command
    with pytest.raises(LaunchError, match="--port is set by internvl launch"):
        vllm_command(awq, Path("/w"), ServeOptions(vllm_args=("--port=1",)), 8000)


def test_vision_heads_that_do_not_divide_run_the_encoder_data_parallel() -> None:
    env = make_env([("NVIDIA H100 80GB HBM3", 80)] * 2)
    request = LaunchRequest(model_name="internvl2", size=26, engine="vllm", gpus=2)
    plan = resolve_plan(load_registry(), request, env)  # InternViT-6B: 25 heads over 2 GPUs
    command = vllm_command(plan, Path("/w"), ServeOptions(), 8000)
    assert flag(command, "--tensor-parallel-size") == "2" and flag(command, "--mm-encoder-tp-mode") == "data"
    mine = vllm_command(plan, Path("/w"), ServeOptions(vllm_args=("--mm-encoder-tp-mode", "weights")), 8000)
    assert mine.count("--mm-encoder-tp-mode") == 1 and mine[-2:] == ["--mm-encoder-tp-mode", "weights"]
    assert "--mm-encoder-tp-mode" not in vllm_command(
        plan_for("internvl2", 8, gpus=2), Path("/w"), ServeOptions(), 8000
    )


def test_cpu_plan_for_the_tiny_model() -> None:
    env = make_env([], vllm="cpu")
    plan = resolve_plan(load_registry(), LaunchRequest(model_name="internvl-tiny", engine="vllm"), env)
    command = vllm_command(plan, Path("/t"), ServeOptions(), 8000)
    assert flag(command, "--gpu-memory-utilization") == "0.3" and flag(command, "--dtype") == "float32"
    assert json.loads(flag(command, "--mm-processor-kwargs")) == {"max_patches": 12}  # native layout
    assert json.loads(flag(command, "--limit-mm-per-prompt"))["video"] == 1  # Qwen2 backbone


# --- the supervisor against a real vLLM --------------------------------------------


def _vllm_env(tmp: Path, cache: Path) -> dict[str, str]:
    python = os.environ.get("VLLM_TEST_PYTHON")
    if not python:
        pytest.fail("VLLM_TEST_PYTHON must name the vLLM environment's python (make test-vllm sets it)")
    env = server_env(cache, tmp)
    env["INTERNVL_VLLM_PYTHON"] = python
    if os.environ.get("VLLM_TEST_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["VLLM_TEST_PYTHONPATH"]
    return env


def _launch_until_ready(tmp: Path, env: dict[str, str], *model: str) -> tuple[subprocess.Popen, dict]:
    """`internvl launch MODEL -e vllm` in the background; returns the process
    and its ready JSON once the ready file appears (failing if it exits first)."""
    ready_file = tmp / "ready.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "internvl_launch", "launch", *model, "-e", "vllm", "--port", "0",
         "--ready-file", str(ready_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while not ready_file.exists():
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.5)
    except BaseException:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.communicate(timeout=120)
        raise
    return launcher, json.loads(ready_file.read_text())


@pytest.mark.vllm
def test_child_dying_at_start_up_is_a_clear_error(tmp_path: Path) -> None:
    env = _vllm_env(tmp_path, tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "internvl_launch", "launch", "-n", "internvl-tiny", "-e", "vllm", "--port", "0",
         "--", "--no-such-vllm-flag"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 11 and done.stdout == ""
    assert "vLLM exited with code 2 during start-up" in done.stderr and "no-such-vllm-flag" in done.stderr


@pytest.mark.vllm
def test_child_killed_while_serving_fails_the_launch(tmp_path: Path) -> None:
    env = _vllm_env(tmp_path, tmp_path / "cache")
    launcher, ready = _launch_until_ready(tmp_path, env, "-n", "internvl-tiny")
    assert ready["engine"] == "vllm" and ready["pid"] == launcher.pid
    os.kill(ready["engine_pid"], signal.SIGKILL)
    _out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 11 and "vLLM exited with code -9 while serving" in err
    assert not group_alive(ready["engine_pid"])  # nothing of vLLM's process group is left running
    listed = subprocess.run(
        [sys.executable, "-m", "internvl_launch", "ps", "--json"], capture_output=True, text=True, env=env
    )
    assert json.loads(listed.stdout) == []


def test_an_original_spec_served_converted_gets_the_native_tiling_flag(tmp_path: Path) -> None:
    from internvl_launch.checkpoint.convert import convert
    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original

    plan = plan_for("internvl2.5", 8)
    assert plan.spec.layout == "original"
    original = generate_tiny_original(tmp_path / "orig", TinyOriginalConfig("qwen2"))
    served_as_is = vllm_command(plan, original, ServeOptions(trust_remote_code=True, max_tiles=6), 8000)
    assert json.loads(flag(served_as_is, "--mm-processor-kwargs")) == {"max_dynamic_patch": 6}
    native = Path(convert(original, tmp_path / "native", verify=False).destination)
    converted = vllm_command(plan, native, ServeOptions(max_tiles=6), 8000)
    assert json.loads(flag(converted, "--mm-processor-kwargs")) == {"max_patches": 6}


@pytest.mark.vllm
def test_vllm_serves_a_converted_original_checkpoint_without_remote_code(tmp_path: Path) -> None:
    """An InternLM2-backbone original checkpoint, converted on launch (to a
    Llama text model), served by a real vLLM without --trust-remote-code."""
    import base64

    import httpx
    from servers import png_bytes

    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original

    original = generate_tiny_original(tmp_path / "orig", TinyOriginalConfig("internlm2"))
    env = _vllm_env(tmp_path, tmp_path / "cache")
    launcher, ready = _launch_until_ready(tmp_path, env, "--model-path", str(original))
    try:
        image = "data:image/png;base64," + base64.b64encode(png_bytes((400, 300))).decode()
        reply = httpx.post(
            ready["url"] + "/chat/completions",
            json={
                "model": "orig",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "?"}],
                    }
                ],
                "max_tokens": 4,
                "temperature": 0,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 256
    finally:
        launcher.send_signal(signal.SIGTERM)
        _out, err = launcher.communicate(timeout=120)
    assert "Converting" in err and "--trust-remote-code" not in err
    assert (tmp_path / "cache" / "converted" / "local").is_dir()
