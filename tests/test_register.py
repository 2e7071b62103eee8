"""`internvl register` / `unregister`: the user's own families, validated,
copied into the spec overlay, never silently shadowing a built-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original
from internvl_launch.paths import user_specs_dir

SPEC = """\
name: {name}
description: A fine-tune on the shared disk.
languages: [en]
abilities: [chat, vision]
context_length: 4096
{extra}specs:
  - format: pytorch
    size: 2
    quantizations: [none, 8-bit, 4-bit]
    hubs: {{{hub}}}
    layout: original
    llm: {{arch: internlm2, name: internlm2-chat-1_8b, layers: 24, attention_heads: 16, kv_heads: 8, head_dim: 128}}
    vision: {{name: InternViT-300M-448px, params_b: 0.3}}
    template: internlm2-chat
    system_message: "You answer briefly."
    max_tiles: 6
    stop: ["<|im_end|>"]
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny_original(tmp_path_factory.mktemp("ckpt") / "ft", TinyOriginalConfig("internlm2"))


def spec_file(tmp_path: Path, name: str = "my-internvl", hub: str = "", extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, hub=hub, extra=extra))
    return path


def test_register_adds_a_local_family_that_every_command_sees(checkpoint: Path, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, hub=f"local: {checkpoint}")
    code, out, err = run_cli("register", str(path), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["registered"] == "my-internvl" and result["replaces_builtin"] is False
    assert Path(result["file"]).read_text() == path.read_text()
    assert Path(result["file"]).parent == user_specs_dir()
    code, out, _ = run_cli("list", "--json")
    assert any(row["model_name"] == "my-internvl" for row in json.loads(out))
    code, out, _ = run_cli("resolve", "-n", "my-internvl", "--json")
    plan = json.loads(out)
    assert plan["source"]["hub"] == "local" and plan["source"]["repo_id"] == str(checkpoint)
    assert plan["source"]["needs_conversion"] is True
    code, out, err = run_cli("chat", "-n", "my-internvl", "hello", "--max-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] == 2


def test_a_private_hub_repository_can_be_registered(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("register", str(spec_file(tmp_path, hub="huggingface: my-org/InternVL2-2B-private")))
    assert code == 0, err
    code, out, _ = run_cli("resolve", "-n", "my-internvl", "--json")
    assert json.loads(out)["source"]["repo_id"] == "my-org/InternVL2-2B-private"


def test_registering_twice_needs_replace(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, hub="huggingface: my-org/a")
    assert run_cli("register", str(path))[0] == 0
    path.write_text(path.read_text().replace("my-org/a", "my-org/b"))
    code, _, err = run_cli("register", str(path))
    assert code == 7 and "already registered" in err and "--replace" in err
    assert "my-org/a" in (user_specs_dir() / "my-internvl.yaml").read_text()
    assert run_cli("register", str(path), "--replace")[0] == 0
    assert "my-org/b" in (user_specs_dir() / "my-internvl.yaml").read_text()


def test_a_builtin_name_is_not_shadowed_silently(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, name="internvl2", hub="huggingface: my-org/InternVL2-2B-ft")
    code, _, err = run_cli("register", str(path))
    assert code == 7 and "overrides_builtin: true" in err
    assert not user_specs_dir().exists() or not any(user_specs_dir().iterdir())
    path = spec_file(
        tmp_path, name="internvl2", hub="huggingface: my-org/InternVL2-2B-ft", extra="overrides_builtin: true\n"
    )
    code, out, err = run_cli("register", str(path))
    assert code == 0 and "replaces the built-in family" in err
    code, out, _ = run_cli("resolve", "-n", "internvl2", "-s", "2", "--json")
    assert json.loads(out)["source"]["repo_id"] == "my-org/InternVL2-2B-ft"


def test_a_clashing_alias_is_refused(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, hub="huggingface: my-org/a", extra="aliases: [tiny]\n")
    code, _, err = run_cli("register", str(path))
    assert code == 7 and "'tiny' is already a name or alias of family 'internvl-tiny'" in err


@pytest.mark.parametrize(
    ("hub", "code", "message"),
    [
        ("local: /nonexistent/checkpoint", 12, "is not a directory"),
        ("local: relative/dir", 7, "give an absolute path"),
        ("local: /tmp, huggingface: a/b", 7, "a local spec has no other hubs"),
    ],
)
def test_bad_local_paths_are_refused(tmp_path: Path, run_cli, hub: str, code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    result, _, err = run_cli("register", str(spec_file(tmp_path, hub=hub)))
    assert result == code and message in err
    assert not (user_specs_dir() / "my-internvl.yaml").exists()


def test_an_invalid_file_is_refused_with_its_line(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = spec_file(tmp_path, hub="huggingface: a/b")
    path.write_text(path.read_text().replace("max_tiles: 6", "max_tiles: 6\n    colour: blue"))
    code, _, err = run_cli("register", str(path))
    assert code == 7 and "my-internvl.yaml:17: specs[0].colour: unknown key" in err
    assert not (user_specs_dir() / "my-internvl.yaml").exists()


def test_unregister_removes_only_registered_families(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    run_cli("register", str(spec_file(tmp_path, hub="huggingface: a/b", extra="aliases: [mine]\n")))
    code, out, _ = run_cli("unregister", "mine", "--json")
    assert code == 0 and json.loads(out)["unregistered"] == "my-internvl"
    assert not (user_specs_dir() / "my-internvl.yaml").exists()
    assert run_cli("resolve", "-n", "my-internvl")[0] == 3
    code, _, err = run_cli("unregister", "internvl2")
    assert code == 3 and "was not added by `internvl register`" in err
    code, _, err = run_cli("unregister", "my-internvl")
    assert code == 3 and "No registered family is called 'my-internvl'" in err
