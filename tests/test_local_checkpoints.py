"""`--model-path`: checkpoints on no hub (every backbone, both layouts, a
fine-tune-style config), described from their own files, through resolve,
chat and launch; and the broken directories people point it at."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from internvl_launch.checkpoint.convert import convert
from internvl_launch.checkpoint.local import describe_checkpoint
from internvl_launch.checkpoint.tiny import tiny_checkpoint
from internvl_launch.checkpoint.tiny_original import BACKBONE_TEMPLATES, TinyOriginalConfig, generate_tiny_original
from internvl_launch.errors import CheckpointError
from tests.servers import png_bytes, running_server

BACKBONES = ("qwen2", "internlm2", "llama", "phi3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each backbone in the original layout, and converted to the native one."""
    root = tmp_path_factory.mktemp("ckpts")
    out: dict[str, Path] = {}
    for backbone in BACKBONES:
        style = "6b" if backbone == "llama" else "300m"
        original = generate_tiny_original(root / f"orig-{backbone}", TinyOriginalConfig(backbone, vision_style=style))
        out[f"original-{backbone}"] = original
        out[f"native-{backbone}"] = Path(convert(original, root / f"native-{backbone}", verify=False).destination)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    path.write_bytes(png_bytes((500, 300)))
    return path


def _fine_tune(src: Path, dst: Path) -> Path:
    """A copy with what fine-tuning scripts leave in config.json: extra keys,
    another template, another tile limit, a system message of its own."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(
        template="Hermes-2",
        max_dynamic_patch=6,
        system_message="You answer in one word.",
        use_backbone_lora=0,
        custom_training_flag=True,
        _commit_hash=None,
    )
    config["llm_config"]["custom_note"] = "merged LoRA"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("layout", ["original", "native"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_checkpoint_describes_itself(checkpoints: dict[str, Path], layout: str, backbone: str) -> None:
    local = describe_checkpoint(checkpoints[f"{layout}-{backbone}"])
    assert local.layout == layout and local.arch == backbone
    assert local.template == BACKBONE_TEMPLATES[backbone]
    assert local.max_tiles == 12 and local.format == "pytorch"
    tensors = load_file(checkpoints[f"{layout}-{backbone}"] / "model.safetensors")
    assert local.parameters == sum(t.numel() for t in tensors.values())
    assert local.provenance["size"].startswith("counted:")
    assert local.provenance["template"] == (
        "config.json template" if layout == "original" else "internvl_launch_conversion.json template"
    )


def test_the_builtin_native_checkpoint_gets_its_template_from_the_chat_template() -> None:
    local = describe_checkpoint(tiny_checkpoint())
    assert (local.layout, local.arch, local.template) == ("native", "qwen2", "internvl2_5")
    assert local.provenance["template"] == "the tokenizer's chat template"
    assert local.provenance["max_tiles"] == "preprocessor_config.json max_patches"


def test_resolve_says_where_each_value_came_from(checkpoints: dict[str, Path], run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("resolve", "--model-path", str(checkpoints["original-internlm2"]), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["source"] == {
        "hub": "local",
        "repo_id": str(checkpoints["original-internlm2"]),
        "revision": None,
        "fallback": [],
        "needs_conversion": True,
    }
    assert plan["spec"]["template"] == "internlm2-chat" and plan["spec"]["llm"]["arch"] == "internlm2"
    assert plan["provenance"]["llm"] == "config.json llm_config.architectures: InternLM2ForCausalLM"
    code, out, _ = run_cli("resolve", "--model-path", str(checkpoints["original-internlm2"]))
    assert "template        config.json template" in out and "converted to the Transformers-native layout" in out


def test_a_fine_tune_config_is_read_and_flags_override_it(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    tuned = _fine_tune(checkpoints["original-qwen2"], tmp_path / "my-finetune")
    code, out, err = run_cli("resolve", "--model-path", str(tuned), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model_name"] == "my-finetune"
    assert plan["spec"]["template"] == "Hermes-2" and plan["spec"]["max_tiles"] == 6
    assert plan["spec"]["system_message"] == "You answer in one word."
    assert plan["provenance"]["system_message"] == "config.json system_message"
    code, out, _ = run_cli(
        "resolve", "--model-path", str(tuned), "--json", "--template", "internvl2_5", "-s", "2", "-q", "4-bit"
    )
    plan = json.loads(out)
    assert plan["spec"]["template"] == "internvl2_5" and plan["provenance"]["template"] == "--template"
    assert plan["spec"]["system_message"] == "You answer in one word."  # the checkpoint's own is kept
    assert plan["spec"]["size_in_billions"] == 2 and plan["provenance"]["size"].startswith("--size-in-billions")
    assert plan["spec"]["quantization"] == "4-bit" and plan["provenance"]["quantization"] == "--quantization"
    code, out, _ = run_cli("chat", "--model-path", str(tuned), "--print-prompt", "hello")
    assert code == 0
    assert out.startswith("<|im_start|>system\nYou answer in one word.<|im_end|><|im_start|>user\nhello")


@pytest.mark.parametrize("layout", ["original", "native"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_chat_runs_every_backbone_and_layout(
    checkpoints: dict[str, Path],
    image: Path,
    run_cli,  # type: ignore[no-untyped-def]
    layout: str,
    backbone: str,
) -> None:
    path = checkpoints[f"{layout}-{backbone}"]
    code, out, err = run_cli(
        "chat", "--model-path", str(path), "--image", str(image), "What is it?", "--max-tokens", "3", "--json"
    )
    assert code == 0, err
    answer = json.loads(out)
    assert answer["completion_tokens"] == 3 and answer["prompt_tokens"] > 256
    assert ("Converting" in err) is (layout == "original")


def test_chat_converts_an_original_checkpoint_once(
    checkpoints: dict[str, Path],
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    args = ("chat", "--model-path", str(checkpoints["original-phi3"]), "hi", "--max-tokens", "2", "--json")
    code, first, err = run_cli(*args)
    assert code == 0 and "Converting" in err
    code, second, err = run_cli(*args)
    assert code == 0 and "Converting" not in err
    assert json.loads(first)["answer"] == json.loads(second)["answer"]


@pytest.mark.parametrize("layout", ["original", "native"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_launch_serves_every_backbone_and_layout(
    checkpoints: dict[str, Path], image: Path, tmp_path: Path, layout: str, backbone: str
) -> None:
    import base64

    path = checkpoints[f"{layout}-{backbone}"]
    with running_server(tmp_path / "srv", tmp_path / "cache", model=("--model-path", str(path))) as server:
        url = server.url  # ends in /v1
        models = httpx.get(f"{url}/models").json()["data"]
        assert models[0]["id"] == path.name
        picture = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "What is it?"}]
        reply = httpx.post(
            f"{url}/chat/completions",
            json={"model": path.name, "messages": [{"role": "user", "content": content}], "max_tokens": 3},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 256
    converted = tmp_path / "cache" / "converted" / "local"
    assert converted.is_dir() is (layout == "original")


def _broken(src: Path, dst: Path, how: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if how == "missing weights":
        (dst / "model.safetensors").unlink()
    elif how == "not internvl":
        (dst / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    elif how == "truncated":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) - 1000])
    elif how == "no config":
        (dst / "config.json").unlink()
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing weights", "has no safetensors weights"),
        ("not internvl", "config.json names BertForMaskedLM"),
        ("truncated", "is truncated"),
        ("no config", "has no config.json"),
    ],
)
@pytest.mark.parametrize("command", ["resolve", "chat", "launch"])
def test_broken_directories_exit_12_with_what_was_expected(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
    how: str,
    message: str,
    command: str,
) -> None:
    path = _broken(checkpoints["original-qwen2"], tmp_path / "ckpt", how)
    extra = {"resolve": (), "chat": ("hello",), "launch": ("--port", "0")}[command]
    code, out, err = run_cli(command, "--model-path", str(path), *extra)
    assert code == 12, (out, err)
    assert message in err and "hint:" in err
    assert not (tmp_path / "ckpt" / "converted").exists()


def test_a_checkpoint_the_converter_cannot_map_leaves_no_cache_entry(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    src = _broken(checkpoints["original-qwen2"], tmp_path / "ckpt", "")
    config = json.loads((src / "config.json").read_text())
    config["ps_version"] = "v3"
    (src / "config.json").write_text(json.dumps(config))
    from internvl_launch.api import load

    with pytest.raises(CheckpointError, match="'v3'"):
        load(model_path=src)
    converted = Path.home() / ".cache" / "internvl-launch" / "converted" / "local"
    assert not converted.exists() or not any(converted.iterdir())


def test_the_format_flag_cannot_contradict_the_checkpoint(checkpoints: dict[str, Path], run_cli) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("resolve", "--model-path", str(checkpoints["native-qwen2"]), "-f", "awq")
    assert code == 4 and "contradicts the checkpoint" in err


@pytest.mark.parametrize("quantization", ["8-bit", "4-bit"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_bitsandbytes_on_every_converted_backbone_leaves_vision_projector_and_head_alone(
    checkpoints: dict[str, Path], image: Path, backbone: str, quantization: str
) -> None:
    import bitsandbytes as bnb
    import torch

    from internvl_launch.api import load

    model = load(model_path=checkpoints[f"original-{backbone}"], quantization=quantization)
    quantized = [
        n for n, m in model.engine.model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    ]
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized), quantized
    plain = [n for n, m in model.engine.model.named_modules() if type(m) is torch.nn.Linear]
    for prefix in ("model.vision_tower", "model.multi_modal_projector", "lm_head"):
        assert any(n.startswith(prefix) for n in plain), prefix
    reply = model.chat("Describe the image.", image=image, max_tokens=3)
    assert isinstance(reply, str)


def test_template_flag_overrides_a_registry_spec_too(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("resolve", "-n", "internvl-tiny", "--template", "phi3-chat", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["spec"]["template"] == "phi3-chat" and plan["spec"]["stop"] == ["<|end|>"]
    assert plan["provenance"] == {"template": "--template"}
    assert plan["spec"]["system_message"].startswith("你是由上海人工智能实验室")
