from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from internvl_launch.errors import InvalidSpecError, UnknownModelError
from internvl_launch.registry import builtin_specs_dir, load_registry, spec_files, validate_file

# The 12 internvl2 specs of the published Xinference page (seed 001), exactly.
SEED_INTERNVL2 = [
    ("pytorch", 1, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-1B"),
    ("pytorch", 2, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-2B"),
    ("awq", 2, ("Int4",), "OpenGVLab/InternVL2-2B-AWQ"),
    ("pytorch", 4, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-4B"),
    ("pytorch", 8, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-8B"),
    ("awq", 8, ("Int4",), "OpenGVLab/InternVL2-8B-AWQ"),
    ("pytorch", 26, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-26B"),
    ("awq", 26, ("Int4",), "OpenGVLab/InternVL2-26B-AWQ"),
    ("pytorch", 40, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-40B"),
    ("awq", 40, ("Int4",), "OpenGVLab/InternVL2-40B-AWQ"),
    ("pytorch", 76, ("4-bit", "8-bit", "none"), "OpenGVLab/InternVL2-Llama3-76B"),
    ("awq", 76, ("Int4",), "OpenGVLab/InternVL2-Llama3-76B-AWQ"),
]

VALID = textwrap.dedent(
    """\
    name: my-internvl
    description: A fine-tune.
    languages: [en]
    abilities: [chat, vision]
    context_length: 8192
    specs:
      - format: pytorch
        size: 8
        quantizations: [none, 4-bit]
        hubs: {huggingface: me/my-internvl}
        llm: {arch: internlm2, name: internlm2_5-7b-chat, layers: 32, attention_heads: 32, kv_heads: 8, head_dim: 128}
        vision: {name: InternViT-300M-448px, params_b: 0.3}
        template: internlm2-chat
        system_message: hi
        stop: ["<|im_end|>"]
    """
)


def write(dir_: Path, name: str, text: str) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    path = dir_ / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", spec_files(builtin_specs_dir()), ids=lambda p: p.name)
def test_every_shipped_file_validates(path: Path) -> None:
    family, issues = validate_file(path)
    assert issues == []
    assert family is not None and family.specs


def test_the_families_the_project_promises() -> None:
    names = {f.name for f in load_registry().families}
    assert names == {
        "internvl-chat",
        "internvl2",
        "internvl2-mpo",
        "internvl2.5",
        "internvl2.5-mpo",
        "internvl3",
        "internvl3.5",
        "internvl3.5-instruct",
        "internvl3.5-mpo",
        "internvl3.5-pretrained",
        "internvl-tiny",
    }


def test_internvl2_matches_the_seed_exactly() -> None:
    family = load_registry().family("internvl2")
    got = [(s.format, s.size, s.quantizations, s.hubs["huggingface"]) for s in family.specs]
    assert got == SEED_INTERNVL2
    assert all(s.hubs["modelscope"] == s.hubs["huggingface"] for s in family.specs)


def test_internvl_chat_int8_keeps_the_quantization_placeholder() -> None:
    family = load_registry().family("internvl-chat")
    int8 = next(s for s in family.specs if s.quantizations == ("Int8",))
    assert int8.hubs["huggingface"] == "OpenGVLab/InternVL-Chat-V1-5-{quantization}"
    assert int8.repo_id("huggingface", "Int8") == "OpenGVLab/InternVL-Chat-V1-5-Int8"
    assert int8.repo_id("modelscope", "Int8") == "AI-ModelScope/InternVL-Chat-V1-5-Int8"
    assert {s.size for s in family.specs} == {2, 4, 26}


def test_templates_follow_the_facts() -> None:
    reg = load_registry()
    by = {(f.name, s.size, s.format): s for f in reg.families for s in f.specs}
    assert by[("internvl2", 1, "pytorch")].template == "Hermes-2"
    assert by[("internvl2", 40, "pytorch")].template == "Hermes-2"
    assert by[("internvl2", 4, "pytorch")].template == "phi3-chat"
    assert "<|end|>" in by[("internvl2", 4, "pytorch")].stop
    for size in (2, 8, 26, 76):
        assert by[("internvl2", size, "pytorch")].template == "internlm2-chat"
    assert {
        s.template for f in reg.families if f.name in ("internvl2.5", "internvl2.5-mpo", "internvl3") for s in f.specs
    } == {"internvl2_5"}
    assert by[("internvl-chat", 4, "pytorch")].template == "phi3-chat"


def test_tiny_model_is_builtin_with_every_quantization() -> None:
    tiny = load_registry().family("internvl-tiny")
    (spec,) = tiny.specs
    assert spec.hubs == {"builtin": "internvl-tiny"}
    assert set(spec.quantizations) == {"none", "8-bit", "4-bit"}


def test_lookup_by_alias_is_case_insensitive() -> None:
    reg = load_registry()
    assert reg.family("InternVL2_5").name == "internvl2.5"
    assert reg.family("INTERNVL-1.5").name == "internvl-chat"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_registry().family("internvl4")
    assert "internvl3" in info.value.details["suggestions"]
    assert "Did you mean" in (info.value.hint or "")


def test_unknown_key_is_reported_with_file_line_and_location(tmp_path: Path) -> None:
    bad = VALID.replace("    template: internlm2-chat\n", "    template: internlm2-chat\n    max_tile: 6\n")
    path = write(tmp_path, "bad.yaml", bad)
    _, issues = validate_file(path)
    assert [i.render() for i in issues] == [
        f"{path}:14: specs[0].max_tile: unknown key (check its spelling; see docs/registry.md for the keys)"
    ]


def test_wrong_types_and_values_are_each_located(tmp_path: Path) -> None:
    bad = VALID.replace("kv_heads: 8", "kv_heads: 5").replace("format: pytorch", "format: gguf")
    path = write(tmp_path, "bad.yaml", bad)
    _, issues = validate_file(path)
    rendered = [i.render() for i in issues]
    assert rendered == [f"{path}:7: specs[0].format: Input should be 'pytorch' or 'awq'"]
    path = write(tmp_path, "bad2.yaml", VALID.replace("kv_heads: 8", "kv_heads: 5"))
    _, issues = validate_file(path)
    assert [i.render() for i in issues] == [f"{path}:11: specs[0].llm.kv_heads: must divide attention_heads"]


def test_quantization_must_suit_the_format(tmp_path: Path) -> None:
    path = write(tmp_path, "q.yaml", VALID.replace("[none, 4-bit]", "[none, Int4]"))
    _, issues = validate_file(path)
    assert [i.render() for i in issues] == [
        f"{path}:9: specs[0].quantizations: 'Int4' is not a pytorch quantization; use one of none, 8-bit, 4-bit, Int8"
    ]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "syntax.yaml", VALID.replace("languages: [en]", "languages: [en"))
    _, issues = validate_file(path)
    assert len(issues) == 1
    assert issues[0].line is not None and issues[0].message.startswith("invalid YAML")


def test_missing_key(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", VALID.replace("    system_message: hi\n", ""))
    _, issues = validate_file(path)
    assert [i.render() for i in issues] == [f"{path}:7: specs[0].system_message: required key is missing"]


def test_overlay_adds_a_family(tmp_path: Path) -> None:
    write(tmp_path / "mine", "mine.yaml", VALID)
    reg = load_registry([tmp_path / "mine"])
    assert reg.family("my-internvl").specs[0].hubs == {"huggingface": "me/my-internvl"}
    assert reg.sources["my-internvl"].endswith("mine.yaml")


def test_overlay_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "env", "mine.yaml", VALID)
    monkeypatch.setenv("INTERNVL_SPECS_PATH", str(tmp_path / "env"))
    assert load_registry().find("my-internvl") is not None


def test_builtin_name_clash_is_refused_unless_declared(tmp_path: Path) -> None:
    write(tmp_path / "o", "o.yaml", VALID.replace("name: my-internvl", "name: internvl2"))
    with pytest.raises(InvalidSpecError) as info:
        load_registry([tmp_path / "o"])
    assert "family 'internvl2' is already defined by" in str(info.value)
    assert "overrides_builtin: true" in str(info.value)
    write(tmp_path / "o", "o.yaml", VALID.replace("name: my-internvl", "name: internvl2\noverrides_builtin: true"))
    reg = load_registry([tmp_path / "o"])
    assert [s.hubs for s in reg.family("internvl2").specs] == [{"huggingface": "me/my-internvl"}]


def test_two_user_files_with_one_name_clash(tmp_path: Path) -> None:
    write(tmp_path / "a", "a.yaml", VALID)
    write(tmp_path / "b", "b.yaml", VALID)
    with pytest.raises(InvalidSpecError, match="family names must be unique"):
        load_registry([tmp_path / "a", tmp_path / "b"])


def test_alias_clash(tmp_path: Path) -> None:
    write(tmp_path / "a", "a.yaml", VALID.replace("name: my-internvl", "name: my-internvl\naliases: [internvl3]"))
    with pytest.raises(InvalidSpecError, match="'internvl3' is already a name or alias of family 'internvl3'"):
        load_registry([tmp_path / "a"])


def test_invalid_overlay_stops_loading(tmp_path: Path) -> None:
    write(tmp_path / "a", "a.yaml", VALID.replace("context_length: 8192", "context_length: lots"))
    with pytest.raises(InvalidSpecError) as info:
        load_registry([tmp_path / "a"])
    assert info.value.issues[0].location == "context_length"


def test_cache_is_used_and_invalidated_by_a_change(tmp_path: Path) -> None:
    path = write(tmp_path / "a", "a.yaml", VALID)
    first = load_registry([tmp_path / "a"])
    cached = load_registry([tmp_path / "a"])
    assert cached == first
    import os

    path.write_text(VALID.replace("me/my-internvl", "me/changed"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_registry([tmp_path / "a"]).family("my-internvl").specs[0].hubs["huggingface"] == "me/changed"
    path.write_text(VALID.replace("size: 8", "size: eight"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2 * 10**9))
    with pytest.raises(InvalidSpecError):
        load_registry([tmp_path / "a"])


def test_cached_registry_equals_a_fresh_parse() -> None:
    assert load_registry() == load_registry(use_cache=False)
