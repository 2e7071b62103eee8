from __future__ import annotations

import pytest

from internvl_launch.request import (
    LaunchRequest,
    RequestError,
    match_quantization,
    merge_reference,
    parse_engine,
    parse_hub,
    parse_model_reference,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "value"), [("8", 8.0), ("8b", 8.0), ("8B", 8.0), (" 26B ", 26.0), ("0.5", 0.5), ("0_5", 0.5), (76, 76.0)]
)
def test_sizes_people_type(text: str, value: float) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["eight", "8GB", "", "-1", "0", "8bb"])
def test_bad_sizes_are_refused_with_the_value(text: str) -> None:
    with pytest.raises(RequestError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4bit", "4-bit"),
        ("4-bit", "4-bit"),
        ("4_BIT", "4-bit"),
        ("8bit", "8-bit"),
        ("NONE", "none"),
        ("bf16", "none"),
        ("int4", None),
        ("Int4", None),
    ],
)
def test_quantization_spellings_for_pytorch(text: str, expected: str | None) -> None:
    assert match_quantization(text, ["4-bit", "8-bit", "none"]) == expected


@pytest.mark.parametrize("text", ["int4", "INT4", "Int4", "int-4"])
def test_quantization_spellings_for_awq(text: str) -> None:
    assert match_quantization(text, ["Int4"]) == "Int4"


def test_4bit_and_int4_stay_distinct() -> None:
    # 4-bit means bitsandbytes on a pytorch spec; Int4 means the AWQ export.
    assert match_quantization("4bit", ["Int4"]) is None
    assert match_quantization("int4", ["4-bit"]) is None


def test_engine_names() -> None:
    assert parse_engine("vLLM") == "vllm"
    assert parse_engine("Transformers") == "transformers"
    with pytest.raises(RequestError, match="'sglang' is not one of: vllm, transformers"):
        parse_engine("sglang")


def test_hub_names() -> None:
    assert parse_hub("HuggingFace") == "huggingface"
    assert parse_hub("model-scope") == "modelscope"
    with pytest.raises(RequestError):
        parse_hub("github")


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("internvl2", ("internvl2", None, None, None)),
        ("internvl2:8b", ("internvl2", 8.0, None, None)),
        ("internvl2:8b-awq", ("internvl2", 8.0, "awq", None)),
        ("internvl2:8b-4bit", ("internvl2", 8.0, None, "4bit")),
        ("internvl2:8b-pytorch-8-bit", ("internvl2", 8.0, "pytorch", "8-bit")),
        ("internvl2.5-mpo:0.5b", ("internvl2.5-mpo", 0.5, None, None)),
    ],
)
def test_model_reference_grammar(ref: str, parts: tuple[object, ...]) -> None:
    assert parse_model_reference(ref) == parts


def test_reference_and_flags_agree_or_fail() -> None:
    merged = merge_reference(LaunchRequest("internvl2:8b-awq", quantization="int4"))
    assert (merged.model_name, merged.size, merged.format, merged.quantization) == ("internvl2", 8.0, "awq", "int4")
    with pytest.raises(RequestError, match=r"--size-in-billions 2\.0 contradicts the model reference .internvl2:8b."):
        merge_reference(LaunchRequest("internvl2:8b", size=2.0))
