"""Original-layout -> native conversion: fidelity against numbers recorded with
the upstream original modeling code, the files written, and every way a
source can be unusable (each with its message, nothing written)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_launch.checkpoint import convert as conv
from internvl_launch.checkpoint.convert import (
    MARKER,
    WeightMapper,
    cached_conversion,
    convert,
    inspect_original,
)
from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, fidelity_inputs, generate_tiny_original
from internvl_launch.engines.pixel_shuffle import CONFIG_KEY as PIXEL_SHUFFLE_KEY
from internvl_launch.engines.pixel_shuffle import apply_pixel_shuffle
from internvl_launch.errors import CheckpointError

REFERENCE = json.loads((Path(__file__).parent / "data" / "upstream_logits.json").read_text())
BACKBONES = sorted(REFERENCE["models"])
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    out = {}
    for name, entry in REFERENCE["models"].items():
        out[name] = generate_tiny_original(root / name, TinyOriginalConfig(**entry["generator_config"]))
    return out


@pytest.fixture(scope="module")
def converted(originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {name: Path(convert(src, root / name, verify=False).destination) for name, src in originals.items()}


def _logits(path: Path, *, pixel_shuffle_override: bool = True) -> torch.Tensor:
    """The native model's logits on the fidelity input, with the v1 pixel
    shuffle applied when the config asks for it (as the engine does)."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if pixel_shuffle_override:
        apply_pixel_shuffle(model)
    added = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
    assert model.config.image_token_id == added["<IMG_CONTEXT>"]
    ids, pixels = fidelity_inputs(added["<IMG_CONTEXT>"], added["<img>"], added["</img>"])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0]


def _worst(logits: torch.Tensor, expected: dict) -> float:
    return max(float((logits[int(pos)] - torch.tensor(row)).abs().max()) for pos, row in expected["positions"].items())


def test_the_generator_still_writes_the_checkpoints_the_reference_was_recorded_on(originals: dict[str, Path]) -> None:
    for name, path in originals.items():
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert digest == REFERENCE["models"][name]["model_sha256"], name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_converted_model_computes_what_the_original_code_computes(converted: dict[str, Path], backbone: str) -> None:
    expected = REFERENCE["models"][backbone]
    logits = _logits(converted[backbone])
    assert _worst(logits, expected) <= TOLERANCE
    assert int(logits[-1].argmax()) == expected["greedy_last"]
    assert float(logits.double().sum()) == pytest.approx(expected["sum"], rel=1e-5)


def test_the_reference_catches_a_wrong_grouped_query_split(
    originals: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting InternLM2's packed wqkv as if it were [q; k; v] (the mistake
    grouped-query attention invites) must move the logits far beyond the tolerance."""

    def naive(self: WeightMapper, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return tensor[:q], tensor[q : q + kv], tensor[q + kv :]

    monkeypatch.setattr(WeightMapper, "split_wqkv", naive)
    out = convert(originals["internlm2"], tmp_path / "wrong", verify=False)
    assert _worst(_logits(Path(out.destination)), REFERENCE["models"]["internlm2"]) > 100 * TOLERANCE


def test_internvl3_5_references_come_from_the_internvl3_5_code() -> None:
    """Qwen3, Qwen3-MoE and GPT-OSS were recorded with InternVL3.5's own
    InternVLChatModel (it builds the language model with AutoModelForCausalLM)
    under the Transformers version that code pins."""
    for name in ("qwen3", "qwen3_moe", "gpt_oss"):
        entry = REFERENCE["models"][name]
        assert entry["generator_config"]["backbone"] == name
        assert entry["recorded_with"]["transformers"] == "4.55.0"
        assert "internvl_chat_gpt_oss" in entry["recorded_with"]["source"]


def test_qwen3_moe_experts_keep_one_linear_each_and_load_stacked(converted: dict[str, Path]) -> None:
    """On disk the experts stay as Transformers 5 saves them (one Linear per
    expert); loading stacks them into (experts, 2 * width, hidden) with gate
    above up, and (experts, hidden, width)."""
    from transformers import InternVLForConditionalGeneration

    path = converted["qwen3_moe"]
    tensors = load_file(path / "model.safetensors")
    prefix = "language_model.model.layers.1.mlp."
    assert prefix + "gate.weight" in tensors and prefix + "experts.3.down_proj.weight" in tensors
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    experts = model.model.language_model.layers[1].mlp.experts
    gate = torch.stack([tensors[f"{prefix}experts.{e}.gate_proj.weight"] for e in range(4)])
    up = torch.stack([tensors[f"{prefix}experts.{e}.up_proj.weight"] for e in range(4)])
    down = torch.stack([tensors[f"{prefix}experts.{e}.down_proj.weight"] for e in range(4)])
    assert torch.equal(experts.gate_up_proj, torch.cat([gate, up], dim=1))
    assert torch.equal(experts.down_proj, down)


def test_the_reference_catches_gpt_oss_gate_and_up_read_as_halves(converted: dict[str, Path], tmp_path: Path) -> None:
    """GPT-OSS interleaves gate and up column by column in gate_up_proj;
    reading them as two halves (the Qwen3-MoE convention) must move the
    logits far beyond the tolerance."""
    src = converted["gpt_oss"]
    wrong = _copy(src, tmp_path / "wrong")
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias"))]:
        halves = tensors[key].chunk(2, dim=-1)
        tensors[key] = torch.stack(halves, dim=-1).flatten(-2).contiguous()  # halves re-read as interleaved
    save_file(tensors, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    assert _worst(_logits(wrong), REFERENCE["models"]["gpt_oss"]) > 100 * TOLERANCE


def test_a_tied_qwen3_head_stays_tied(converted: dict[str, Path]) -> None:
    """InternVL3.5's config follows llm_config.tie_word_embeddings (Qwen3-0.6B
    ties); such a checkpoint has no head of its own, and neither has the result."""
    config = json.loads((converted["qwen3"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["text_config"]["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head.") for k in load_file(converted["qwen3"] / "model.safetensors"))
    gpt_oss = json.loads((converted["gpt_oss"] / "config.json").read_text())["text_config"]
    assert gpt_oss["layer_types"] == ["sliding_attention", "full_attention"] and gpt_oss["sliding_window"] == 64


@pytest.mark.parametrize("backbone", ["qwen3", "qwen3_moe", "gpt_oss"])
def test_internvl3_5_checkpoints_describe_themselves(
    originals: dict[str, Path], converted: dict[str, Path], backbone: str
) -> None:
    from internvl_launch.checkpoint.local import describe_checkpoint

    for path in (originals[backbone], converted[backbone]):
        local = describe_checkpoint(path)
        assert (local.arch, local.template, local.head_dim, local.kv_heads) == (backbone, "internvl2_5", 32, 2)
    assert describe_checkpoint(originals[backbone]).parameters == describe_checkpoint(converted[backbone]).parameters


def test_conversion_writes_a_native_checkpoint_with_the_template_end_token(converted: dict[str, Path]) -> None:
    for name, path in converted.items():
        backbone = REFERENCE["models"][name]["generator_config"]["backbone"]
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["InternVLForConditionalGeneration"]
        assert config["text_config"]["model_type"] == {"internlm2": "llama"}.get(backbone, backbone)
        assert config["vision_config"]["use_mean_pooling"] is True  # no final norm in the original tower
        keys = load_file(path / "model.safetensors").keys()
        assert not any(k.startswith(("vision_model.", "mlp1.")) or ".wqkv." in k or ".qkv." in k for k in keys)
        tok = json.loads((path / "tokenizer_config.json").read_text())
        assert "auto_map" not in tok and tok["context_image_token"] == "<IMG_CONTEXT>"
        vocab = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
        end = "<|end|>" if backbone == "phi3" else "<|im_end|>"
        generation = json.loads((path / "generation_config.json").read_text())
        assert generation["eos_token_id"] == vocab[end]
        assert (path / "preprocessor_config.json").is_file()
        assert json.loads((path / MARKER).read_text())["backbone"] == backbone
    vit6b = json.loads((converted["llama"] / "config.json").read_text())["vision_config"]
    assert vit6b["norm_type"] == "rms_norm" and vit6b["use_qk_norm"] is True and vit6b["attention_bias"] is False


def test_the_chat_template_puts_the_image_token_where_the_image_goes(converted: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted["phi3"])
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("<|user|>\n<IMG_CONTEXT>\nWhat is it?<|end|><|assistant|>\n")


def test_verification_loads_the_result_and_runs_it(originals: dict[str, Path], tmp_path: Path) -> None:
    report = convert(originals["qwen2"], tmp_path / "out")
    assert report.verified and report.parameters > 0 and report.dtype == "float32"


def test_dtype_is_applied_to_floating_tensors(originals: dict[str, Path], tmp_path: Path) -> None:
    report = convert(originals["qwen2"], tmp_path / "out", dtype="bfloat16", verify=False)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16" == report.dtype


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("value", "absent"), [("v1", False), (None, True)])
def test_pixel_shuffle_v1_is_converted_and_marked(
    originals: dict[str, Path], tmp_path: Path, value: str | None, absent: bool
) -> None:
    """v1 (also an absent ps_version: the original config class defaults to
    v1) converts, verifies with the override, and says so in config.json and
    the report; v2 checkpoints carry no marker."""
    src = _copy(originals["qwen2"], tmp_path / "src")
    _edit_config(src, ps_version=value)
    report = convert(src, tmp_path / "out")
    assert report.verified
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[PIXEL_SHUFFLE_KEY] == "v1"
    note = next(n for n in report.notes if n.startswith("pixel shuffle v1"))
    assert ("absent" in note) is absent
    v2 = convert(originals["qwen2"], tmp_path / "v2", verify=False)
    assert PIXEL_SHUFFLE_KEY not in json.loads((tmp_path / "v2" / "config.json").read_text())
    assert not any("pixel shuffle" in n for n in v2.notes)


def test_an_unknown_pixel_shuffle_is_refused(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    _edit_config(src, ps_version="v3")
    with pytest.raises(CheckpointError, match="'v3'"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _StateDict(dict):
    """A dict subclass: a global the restricted loader does not know."""


def _pickle_only(src: Path, *, shards: int = 1, state: dict | None = None) -> Path:
    """Replace `src`'s safetensors by `torch.save`d pickles: one
    pytorch_model.bin, or `shards` files with a pytorch_model.bin.index.json."""
    tensors = load_file(src / "model.safetensors") if state is None else state
    (src / "model.safetensors").unlink()
    if shards == 1:
        torch.save(tensors, src / "pytorch_model.bin")
        return src
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: tensors[k] for k in keys[i::shards]}
        torch.save(part, src / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return src


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_only_weights_convert_without_allow_pickle(
    originals: dict[str, Path], converted: dict[str, Path], tmp_path: Path, shards: int
) -> None:
    """Pickles holding only tensors are read with the restricted loader, with
    no flag, and give the checkpoint the safetensors source gives."""
    src = _pickle_only(_copy(originals["internlm2"], tmp_path / "src"), shards=shards)
    assert inspect_original(src).weight_format == "pickle"
    report = convert(src, tmp_path / "out", verify=False)
    assert any("weights_only=True" in note for note in report.notes)
    assert not list((tmp_path / "out").glob("*.bin"))
    ours = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(converted["internlm2"] / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the output head was found in the pickles
    assert _worst(_logits(tmp_path / "out"), REFERENCE["models"]["internlm2"]) <= TOLERANCE


def test_a_pickle_the_restricted_loader_refuses_needs_allow_pickle(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    _pickle_only(src, state=_StateDict(load_file(src / "model.safetensors")))
    with pytest.raises(CheckpointError, match="objects other than tensors") as err:
        convert(src, tmp_path / "out", verify=False)
    assert "pytorch_model.bin" in err.value.message and "--allow-pickle" in (err.value.hint or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    convert(src, tmp_path / "out", allow_pickle=True, verify=False)
    assert _worst(_logits(tmp_path / "out"), REFERENCE["models"]["qwen2"]) <= TOLERANCE


def test_a_pickle_with_a_function_reference_is_refused_even_when_allowed(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    _pickle_only(src, state={**load_file(src / "model.safetensors"), "hook": print})
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        convert(src, tmp_path / "out", verify=False)
    with pytest.raises(CheckpointError, match="entries other than tensors"):
        convert(src, tmp_path / "out", allow_pickle=True, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_command_refuses_a_pickle_with_objects_and_writes_nothing(
    originals: dict[str, Path],
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    _pickle_only(src, state=_StateDict(load_file(src / "model.safetensors")))
    code, out, _err = run_cli("convert", str(src), str(tmp_path / "dst"), "--json")
    assert code == 12
    error = json.loads(out)
    assert error["error"] == "CheckpointError" and "objects other than tensors" in json.dumps(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_pickle_index_naming_a_missing_shard_is_named(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _pickle_only(_copy(originals["qwen2"], tmp_path / "src"), shards=2)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin, which is missing"):
        inspect_original(src)


def test_describe_reads_a_pickle_only_checkpoint_without_loading_it(
    originals: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from internvl_launch.checkpoint.local import describe_checkpoint

    expected = describe_checkpoint(originals["qwen2"])
    src = _pickle_only(_copy(originals["qwen2"], tmp_path / "src"), shards=2)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("describe loaded a pickle"))
    described = describe_checkpoint(src)
    assert described.parameters == expected.parameters and described.vision_params == expected.vision_params
    assert described.weight_files == ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    hostile = _copy(originals["qwen2"], tmp_path / "hostile")
    _pickle_only(hostile, state=_StateDict(load_file(hostile / "model.safetensors")))
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        describe_checkpoint(hostile)


def test_a_truncated_safetensors_file_leaves_nothing_behind(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_unknown_tensor_fails_the_conversion_and_leaves_the_old_destination(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["vision_model.encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="no counterpart"):
        convert(src, dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_non_empty_destination_needs_overwrite(originals: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty") as err:
        convert(originals["qwen2"], dst, verify=False)
    assert "--overwrite" in (err.value.hint or "")
    assert (dst / "notes.txt").read_text() == "mine"
    convert(originals["qwen2"], dst, verify=False, overwrite=True)
    assert not (dst / "notes.txt").exists() and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: (p / "config.json").unlink(), "no config.json"),
        (lambda p: (p / "model.safetensors").unlink(), "no weights"),
        (lambda p: (p / "config.json").write_text("{not json"), "not readable JSON"),
        (
            lambda p: (p / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})),
            "not an original-layout InternVL checkpoint",
        ),
    ],
)
def test_broken_sources_are_named(originals: dict[str, Path], tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    src = _copy(originals["qwen2"], tmp_path / "src")
    mutate(src)
    with pytest.raises(CheckpointError, match=message):
        inspect_original(src)


def test_an_unsupported_language_model_is_named(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="MistralForCausalLM"):
        inspect_original(src)


def test_the_conversion_is_cached_and_reused(originals: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    first, cached = cached_conversion(originals["llama"], repo_id="OpenGVLab/Tiny", revision="abc123")
    assert not cached and (first / MARKER).is_file()
    assert first.name == f"abc123-v{conv.CONVERTER_VERSION}"
    calls = []
    monkeypatch.setattr(conv, "convert", lambda *a, **k: calls.append(a))
    again, cached = cached_conversion(originals["llama"], repo_id="OpenGVLab/Tiny", revision="abc123")
    assert cached and again == first and calls == []


def test_a_local_source_is_converted_again_when_its_files_change(originals: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    first, _ = cached_conversion(src)
    config = json.loads((src / "config.json").read_text())
    config["max_dynamic_patch"] = 6
    (src / "config.json").write_text(json.dumps(config, indent=4))
    second, cached = cached_conversion(src)
    assert second != first and not cached
    assert json.loads((second / "preprocessor_config.json").read_text())["max_patches"] == 6


def test_convert_command_prints_a_json_summary(originals: dict[str, Path], tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("convert", str(originals["phi3"]), str(tmp_path / "out"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["backbone"] == "phi3" and summary["verified"] is True
    assert summary["template"] == "phi3-chat" and summary["dtype"] == "float32"
    assert summary["parameters"] == sum(t.numel() for t in load_file(tmp_path / "out" / "model.safetensors").values())
    assert "model.safetensors" in summary["files"] and summary["seconds"] > 0
    assert summary["mapped"]["vision qkv split"] == 4  # two layers, weight and bias


def test_convert_command_reports_what_it_mapped(originals: dict[str, Path], tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli("convert", str(originals["internlm2"]), str(tmp_path / "out"), "--no-verify")
    assert code == 0
    assert "internlm2 backbone -> llama" in out and "internlm2 wqkv split: 2" in out
    assert "verified" not in out


@pytest.mark.parametrize("broken", ["not-empty", "truncated", "not-internvl", "no-weights"])
def test_convert_command_failures_exit_12_and_write_nothing(
    originals: dict[str, Path],
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
    broken: str,
) -> None:
    src = _copy(originals["qwen2"], tmp_path / "src")
    dst = tmp_path / "dst"
    if broken == "not-empty":
        dst.mkdir()
        (dst / "x").write_text("x")
    elif broken == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:100])
    elif broken == "not-internvl":
        (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    else:
        (src / "model.safetensors").unlink()
    code, out, _err = run_cli("convert", str(src), str(dst), "--json")
    assert code == 12
    assert json.loads(out)["error"] == "CheckpointError"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["dst", "src"] if broken == "not-empty" else ["src"])


def test_large_models_are_written_in_shards_with_an_index(
    originals: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv, "_SHARD_BYTES", 512 * 1024)
    report = convert(originals["phi3"], tmp_path / "out")  # verification loads the sharded result
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not list((tmp_path / "out").glob(".shard-*"))
    assert report.verified and "model.safetensors.index.json" in report.files
    assert _worst(_logits(tmp_path / "out"), REFERENCE["models"]["phi3"]) <= TOLERANCE
