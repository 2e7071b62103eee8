from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from internvl_launch.registry import load_registry

Run = Callable[..., tuple[int, str, str]]
ROOT = Path(__file__).resolve().parent.parent


def test_list_prints_a_table_on_stdout_only(run_cli: Run) -> None:
    code, out, err = run_cli("list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "SIZE", "FORMAT", "QUANTIZATIONS", "ENGINES", "HUB", "ID"]
    total = sum(len(f.specs) for f in load_registry().families)
    assert len(lines) == total + 1
    assert any(line.startswith("internvl2 ") and "OpenGVLab/InternVL2-Llama3-76B-AWQ" in line for line in lines)


def test_list_json_is_only_json_and_filters(run_cli: Run) -> None:
    code, out, err = run_cli("list", "--model-name", "InternVL2", "--json")
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert len(rows) == 12 and {r["model_name"] for r in rows} == {"internvl2"}
    awq8 = next(r for r in rows if r["format"] == "awq" and r["size_in_billions"] == 8)
    assert awq8["repo_ids"] == {
        "Int4": {"huggingface": "OpenGVLab/InternVL2-8B-AWQ", "modelscope": "OpenGVLab/InternVL2-8B-AWQ"}
    }
    assert awq8["engines"] == {"Int4": ["vllm", "transformers"]}
    code, out, _ = run_cli("list", "--json", "--model-format", "awq")
    assert {r["format"] for r in json.loads(out)} == {"awq"}


def test_show_family(run_cli: Run) -> None:
    code, out, err = run_cli("show", "internvl-chat")
    assert code == 0 and err == ""
    assert (
        out.splitlines()[0]
        == "internvl-chat  (aliases: internvl-1.5, internvl1.5, internvl-chat-v1-5, mini-internvl-chat)"
    )
    assert "OpenGVLab/InternVL-Chat-V1-5-{quantization}" in out
    code, out, _ = run_cli("show", "internvl3", "--json")
    data = json.loads(out)
    assert data["name"] == "internvl3" and {s["size_in_billions"] for s in data["specs"]} == {1, 2, 8, 9, 14, 38, 78}


def test_unknown_model_exit_code_and_exact_message(run_cli: Run) -> None:
    code, out, err = run_cli("show", "internvl4")
    assert code == 3 and out == ""
    assert err == (
        "error: Unknown model name 'internvl4'.\n"
        "hint: Did you mean 'internvl3', 'internvl2'? Run `internvl list` to see every model.\n"
    )


def test_no_matching_spec_exit_code(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, out, err = run_cli("resolve", "-n", "internvl2", "-s", "3b", "--environment", env_file("1x80GB"))
    assert code == 4 and out == ""
    assert err.splitlines()[0] == "error: internvl2 has no spec with size 3B."
    assert err.splitlines()[1].startswith("hint: Available: 1B pytorch [4-bit, 8-bit, none], 2B awq [Int4], 2B pytorch")


def test_engine_unavailable_exit_code(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, _, err = run_cli(
        "resolve", "-n", "internvl2", "-s", "8", "-q", "4-bit", "-e", "vllm", "--environment", env_file("1x80GB")
    )
    assert code == 5
    assert err.splitlines()[0] == (
        "error: Engine vllm cannot run pytorch 4-bit: vLLM is only offered for quantization none on pytorch specs; "
        "4-bit/8-bit use Transformers with bitsandbytes."
    )


def test_not_enough_memory_exit_code(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, out, err = run_cli("resolve", "-n", "internvl2", "-s", "76", "--environment", env_file("1x24GB"), "--json")
    assert code == 6
    payload = json.loads(out)
    assert payload["error"] == "NotEnoughMemoryError" and payload["exit_code"] == 6
    assert err.startswith("error: 76B pytorch none needs about ")


def test_usage_errors_exit_2(run_cli: Run) -> None:
    code, _, err = run_cli("resolve", "-n", "internvl2", "-s", "eight")
    assert (
        code == 2 and "Invalid value for '--size-in-billions' / '-s': size 'eight' is not a number of billions" in err
    )
    code, _, err = run_cli("resolve", "-n", "internvl2", "--engine", "sglang")
    assert code == 2 and "engine 'sglang' is not one of: vllm, transformers" in err
    code, _, err = run_cli("resolve", "--model-nam", "internvl2")
    assert code == 2 and "(Did you mean one of: '--model-format', '--model-name', '--model-path'?)" in err
    code, _, err = run_cli("resolve", "-n", "internvl2:8b", "-s", "2")
    assert code == 4 and "contradicts the model reference" in err


def test_resolve_json_is_the_plan(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, out, err = run_cli(
        "resolve",
        "--model-name",
        "internvl2",
        "--size-in-billions",
        "8B",
        "--quantization",
        "4bit",
        "--json",
        "--explain",
        "--environment",
        env_file("1x24GB"),
    )
    assert code == 0 and err == ""
    plan = json.loads(out)
    assert plan["model"] == "internvl2:8b-pytorch-4-bit"
    assert plan["engine"] == "transformers" and plan["gpus"] == [0] and plan["dtype"] == "bfloat16"
    assert plan["source"] == {
        "hub": "huggingface",
        "repo_id": "OpenGVLab/InternVL2-8B",
        "revision": None,
        "fallback": [{"hub": "modelscope", "repo_id": "OpenGVLab/InternVL2-8B"}],
        "needs_conversion": True,
    }
    assert plan["rejected_engines"]["vllm"].startswith("vLLM is only offered")
    assert plan["memory_gib"]["fits"] is True and plan["memory_gib"]["available"] == 24.0
    assert plan["explain"]["engine_rules"][0]["engines"] == ["vllm", "transformers"]


def test_launch_dry_run_explains(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, out, err = run_cli("launch", "-n", "internvl-tiny", "--dry-run", "--environment", env_file("no-gpu"))
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith("model      internvl-tiny:0.01b-pytorch-none")
    assert "why:" in out and "  - device: cpu, no CUDA GPU found" in out


def test_bad_environment_file(run_cli: Run, tmp_path: Path) -> None:
    bad = tmp_path / "env.json"
    bad.write_text('{"gpus": [{"index": 0}]}')
    code, _, err = run_cli("resolve", "-n", "internvl-tiny", "--environment", str(bad))
    assert code == 8 and err.startswith(f"error: Environment file {bad}: gpus[0].name: missing.")


def test_validate_reports_every_issue_with_exit_7(run_cli: Run, tmp_path: Path) -> None:
    good = (
        (ROOT / "specs" / "internvl-tiny.yaml")
        .read_text()
        .replace("name: internvl-tiny", "name: my-tiny")
        .replace("aliases: [tiny, internvl-tiny-random]", "aliases: []")
    )
    (tmp_path / "good.yaml").write_text(good)
    code, out, err = run_cli("validate", str(tmp_path))
    assert (code, err) == (0, "")
    assert out == f"{tmp_path / 'good.yaml'}: ok (my-tiny, 1 specs)\n"
    (tmp_path / "bad.yaml").write_text(
        good.replace("name: my-tiny", "name: my-tiny2").replace("max_tiles: 12", "max_tiles: 12\n    colour: red")
    )
    code, out, err = run_cli("validate", str(tmp_path))
    assert code == 7
    assert err.splitlines() == [
        f"{tmp_path / 'bad.yaml'}:24: specs[0].colour: unknown key (check its spelling; see docs/registry.md for the keys)",
        "1 problem(s) found; nothing was launched.",
    ]


def test_invalid_overlay_stops_every_command(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("name: [oops\n")
    code, out, err = run_cli("list", "--specs-dir", str(tmp_path))
    assert code == 7 and out == ""
    assert err.startswith(f"invalid spec: {tmp_path / 'x.yaml'}:2: invalid YAML:")
    assert err.rstrip().endswith("hint: Fix the spec files above; nothing was launched.")


def test_env_json_round_trips_into_resolve(run_cli: Run, tmp_path: Path) -> None:
    code, out, err = run_cli("env", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) >= {"gpus", "host_memory_available_mib", "engines", "packages", "cache_dirs"}
    path = tmp_path / "here.json"
    path.write_text(out)
    code, out, _ = run_cli("resolve", "-n", "internvl-tiny", "--environment", str(path), "--json", "--no-memory-check")
    assert code in (0, 5)  # 5 when this machine has no engine installed: the same answer as probing it
    code2, _, _ = run_cli("resolve", "-n", "internvl-tiny", "--json", "--no-memory-check")
    assert code2 == code


def test_cli_docs_are_current() -> None:
    from internvl_launch.cli.docs import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_light_commands_import_no_heavy_stack() -> None:
    code = (
        "import sys; from internvl_launch.cli import main\n"
        "for args in (['--help'], ['list', '--json'], ['show', 'internvl2'], ['validate', 'specs'],"
        " ['resolve', '-n', 'internvl-tiny', '--no-memory-check']):\n"
        "    try: main(args)\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'fastapi', 'uvicorn', 'PIL', 'numpy', 'pydantic') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    # pydantic is loaded by `validate` (and whenever a spec file changed), never the others here.
    assert done.stdout.strip().splitlines()[-1] in ("", "pydantic")
    cold = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, internvl_launch.cli; print(sorted(m for m in ('torch','transformers','vllm','fastapi','pydantic','yaml','numpy','PIL') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cold.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["--version"]])
def test_help_and_version_exit_0(run_cli: Run, args: list[str]) -> None:
    code, out, _ = run_cli(*args)
    assert code == 0 and out


def test_nodes_need_the_vllm_engine(run_cli: Run, env_file: Callable[[str], str]) -> None:
    code, out, err = run_cli("launch", "-n", "internvl-tiny", "--nodes", "2", "--environment", env_file("no-gpu"))
    assert code == 5 and out == "" and "--nodes" in err and "--model-engine vllm" in err
