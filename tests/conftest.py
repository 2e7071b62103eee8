"""Shared fixtures: every test gets its own HOME, cache, config and state
directories, plain output settings, and no INTERNVL_* variables from outside."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from internvl_launch.environment import GPU, EngineInfo, Environment

FULL_PACKAGES = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "accelerate": "1.15.0",
    "bitsandbytes": "0.50.2",
    "gptqmodel": None,
    "awq": None,
    "huggingface_hub": "1.0.0",
    "modelscope": None,
}


def make_env(
    gpus: list[tuple[str, int]] = (),  # type: ignore[assignment]
    *,
    vllm: str | None = "cuda",
    transformers: bool = True,
    packages: dict[str, str | None] | None = None,
    host_gib: int = 20,
    compute: str = "9.0",
) -> Environment:
    """A fake machine: GPUs as (name, GiB free), which engines are installed."""
    pk = dict(FULL_PACKAGES)
    pk.update(packages or {})
    if not transformers:
        pk["transformers"] = None
    engines = {
        "transformers": EngineInfo(
            "transformers",
            transformers,
            "/usr/bin/python3",
            "5.23.0" if transformers else None,
            reason=None if transformers else "torch and transformers not installed",
        ),
        "vllm": EngineInfo(
            "vllm",
            vllm is not None,
            "/usr/bin/python3",
            "0.11.0" if vllm else None,
            vllm,
            reason=None if vllm else "vllm is not importable by /usr/bin/python3",
        ),
    }
    return Environment(
        gpus=tuple(GPU(i, name, gib * 1024, gib * 1024, compute) for i, (name, gib) in enumerate(gpus)),
        host_memory_available_mib=host_gib * 1024,
        cpu_count=8,
        engines=engines,
        packages=pk,
        gpu_probe="nvidia-smi" if gpus else "none: nvidia-smi not found",
        source="test",
    )


#: The fake machines every spec is resolved on.
ENVIRONMENTS: dict[str, Environment] = {
    "no-gpu": make_env([], vllm=None),
    "1x24GB": make_env([("NVIDIA GeForce RTX 4090", 24)], compute="8.9"),
    "1x80GB": make_env([("NVIDIA H100 80GB HBM3", 80)]),
    "2x24GB": make_env([("NVIDIA GeForce RTX 4090", 24)] * 2, compute="8.9"),
    "4x80GB": make_env([("NVIDIA A100-SXM4-80GB", 80)] * 4, compute="8.0"),
    "8x80GB": make_env([("NVIDIA H100 80GB HBM3", 80)] * 8),
    # Volta: no bfloat16, and below vLLM's AWQ kernels' compute capability 7.5.
    "1xV100-32GB": make_env([("Tesla V100-SXM2-32GB", 32)], compute="7.0"),
}


_OUTSIDE_VARS = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "MODELSCOPE_ENDPOINT",
    "MODELSCOPE_CACHE",
    "CUDA_VISIBLE_DEVICES",
)


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    for var in list(os.environ):
        if var.startswith("INTERNVL_") or var in _OUTSIDE_VARS:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".state"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return home


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `internvl ARGS...` in-process through the real entry point's mapper;
    returns (exit code, stdout, stderr)."""
    from internvl_launch.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def env_file(tmp_path: Path) -> Callable[[str], str]:
    """Write one of ENVIRONMENTS to a JSON file for `--environment`."""

    def write(name: str) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(ENVIRONMENTS[name].to_dict()))
        return str(path)

    return write
