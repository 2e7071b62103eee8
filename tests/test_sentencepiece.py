"""Sentencepiece-only tokenizers (InternLM2 checkpoints) become a
`tokenizer.json` that encodes exactly as InternLM2's own slow tokenizer does.
Expected ids and texts were recorded by running that tokenizer (the upstream
remote code, transformers 4.37.2) outside the repository on the two tiny
sentencepiece models in tests/data/internlm2_tokenizer (with and without the
dummy prefix); see docs/conversion.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from internvl_launch.checkpoint.convert import convert
from internvl_launch.checkpoint.sentencepiece import build_tokenizer_json
from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original
from internvl_launch.errors import CheckpointError
from internvl_launch.prompt.conversation import Piece, Prompt

DATA = Path(__file__).parent / "data" / "internlm2_tokenizer"
REFERENCE = json.loads((DATA / "upstream_reference.json").read_text())
VARIANTS = sorted(REFERENCE["tokenizers"])
SPECIAL = ("<img>", "<|im", "<quad>", "<IMG")


def _copy(name: str, dst: Path) -> Path:
    shutil.copytree(DATA / name, dst)
    (dst / "upstream_reference.json").unlink(missing_ok=True)
    return dst


@pytest.fixture(params=VARIANTS)
def converted_tokenizer(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    directory = _copy(request.param, tmp_path / request.param)
    build_tokenizer_json(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("auto_map")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return request.param, AutoTokenizer.from_pretrained(directory)


def test_encoding_matches_the_original_tokenizer(converted_tokenizer) -> None:  # type: ignore[no-untyped-def]
    name, tok = converted_tokenizer
    expected = REFERENCE["tokenizers"][name]
    assert len(tok) == expected["len"]
    for text, ids in zip(REFERENCE["texts"], expected["input_ids"], strict=True):
        assert tok(text).input_ids == ids, text


def test_decoding_matches_the_original_tokenizer(converted_tokenizer) -> None:  # type: ignore[no-untyped-def]
    name, tok = converted_tokenizer
    expected = REFERENCE["tokenizers"][name]
    for text, ids, decoded in zip(REFERENCE["texts"], expected["input_ids"], expected["decoded"], strict=True):
        if not any(s in text for s in SPECIAL):  # the slow tokenizer spaces out special tokens when decoding
            assert tok.decode(ids[1:]) == decoded == text


def test_our_prompt_encoding_equals_the_original_tokenizer_on_the_prompt_string(converted_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The engine encodes prompts piece by piece; with a sentencepiece
    tokenizer that must still give what the original tokenizer gives for the
    whole prompt string (it, too, encodes each stretch between added tokens alone)."""
    name, tok = converted_tokenizer
    index = next(i for i, t in enumerate(REFERENCE["texts"]) if t.startswith("<|im_start|>system"))
    text = REFERENCE["texts"][index]
    system, rest = text.removeprefix("<|im_start|>system\n").split("<|im_end|>", 1)
    prompt = Prompt(
        pieces=(
            Piece("special", "<|im_start|>"),
            Piece("text", "system\n" + system),
            Piece("special", "<|im_end|>"),
            Piece("special", "<|im_start|>"),
            Piece("text", "user\n"),
            Piece("image", tiles=1),
            Piece("text", "\nWhat is in the picture?"),
            Piece("special", "<|im_end|>"),
            Piece("special", "<|im_start|>"),
            Piece("text", "assistant\n"),
        ),
        stop=("<|im_end|>",),
        image_tokens_per_tile=1,
    )
    assert prompt.render() == text and rest
    assert prompt.encode(tok) == REFERENCE["tokenizers"][name]["input_ids"][index]


def test_the_converter_builds_it_for_an_internlm2_checkpoint(tmp_path: Path) -> None:
    src = generate_tiny_original(tmp_path / "src", TinyOriginalConfig("internlm2"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    for f in (DATA / "dummy_prefix").iterdir():
        if f.name != "upstream_reference.json":
            shutil.copy(f, src / f.name)
    (src / "tokenization_internlm2.py").write_text("raise SystemExit('checkpoint code ran')\n")
    report = convert(src, tmp_path / "out")
    assert report.verified
    assert "tokenizer: tokenizer.json built from tokenizer.model" in report.notes
    assert "tokenizer: dropped auto_map (remote tokenizer code)" in report.notes
    out = tmp_path / "out"
    assert not (out / "tokenization_internlm2.py").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["image_token_id"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    expected = REFERENCE["tokenizers"]["dummy_prefix"]
    assert [tok(t).input_ids for t in REFERENCE["texts"]] == expected["input_ids"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_missing_sentencepiece_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sentencepiece(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("sentencepiece"):
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(CheckpointError, match="sentencepiece and protobuf") as err:
        build_tokenizer_json(_copy("dummy_prefix", tmp_path / "t"))
    assert "pip install sentencepiece protobuf" in (err.value.hint or "")
