"""Pixel shuffle v1 (InternVL 1.5) on the native model: the token order on a
hand-built grid, the override against logits recorded with the original code
(and the native v2 path failing that check), v2 checkpoints left exactly as
they were, and a converted v1 checkpoint chatting through the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_launch.checkpoint.convert import convert
from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, fidelity_inputs, generate_tiny_original
from internvl_launch.engines.pixel_shuffle import CONFIG_KEY, apply_pixel_shuffle, pixel_shuffle_version
from internvl_launch.errors import CheckpointError

REFERENCE = json.loads((Path(__file__).parent / "data" / "upstream_logits.json").read_text())["models"]
V1 = "internlm2_ps_v1"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {
        name: generate_tiny_original(root / name, TinyOriginalConfig(**REFERENCE[name]["generator_config"]))
        for name in (V1, "internlm2")
    }


@pytest.fixture(scope="module")
def converted(originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {name: Path(convert(src, root / name, verify=False).destination) for name, src in originals.items()}


def _load(path: Path, *, override: bool) -> torch.nn.Module:
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return apply_pixel_shuffle(model) if override else model


def _logits(model: torch.nn.Module, path: Path) -> torch.Tensor:
    added = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
    ids, pixels = fidelity_inputs(added["<IMG_CONTEXT>"], added["<img>"], added["</img>"])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0]


def _worst(logits: torch.Tensor, name: str) -> float:
    rows = REFERENCE[name]["positions"].items()
    return max(float((logits[int(pos)] - torch.tensor(row)).abs().max()) for pos, row in rows)


def test_v1_hands_the_blocks_over_column_by_column(converted: dict[str, Path]) -> None:
    """A 4x4 grid whose feature at (row r, column c) is 10r + c: both versions
    build the same 2x2 blocks (channels: top-left, top-right, bottom-left,
    bottom-right); v2 orders them row by row, v1 column by column."""
    grid = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)]).reshape(1, 4, 4, 1)
    blocks = {(0, 0): [0, 1, 10, 11], (0, 1): [2, 3, 12, 13], (1, 0): [20, 21, 30, 31], (1, 1): [22, 23, 32, 33]}
    v2 = _load(converted["internlm2"], override=False).model.pixel_shuffle(grid, scale_factor=0.5)
    v1 = _load(converted[V1], override=True).model.pixel_shuffle(grid, scale_factor=0.5)
    assert v2.reshape(4, 4).tolist() == [blocks[(0, 0)], blocks[(0, 1)], blocks[(1, 0)], blocks[(1, 1)]]
    assert v1.reshape(4, 4).tolist() == [blocks[(0, 0)], blocks[(1, 0)], blocks[(0, 1)], blocks[(1, 1)]]


def test_a_converted_v1_checkpoint_computes_what_the_original_code_computes(converted: dict[str, Path]) -> None:
    expected = REFERENCE[V1]
    assert expected["generator_config"]["ps_version"] == "v1"
    assert json.loads((converted[V1] / "config.json").read_text())[CONFIG_KEY] == "v1"
    logits = _logits(_load(converted[V1], override=True), converted[V1])
    assert _worst(logits, V1) <= TOLERANCE
    assert int(logits[-1].argmax()) == expected["greedy_last"]
    assert float(logits.double().sum()) == pytest.approx(expected["sum"], rel=1e-5)


def test_the_native_v2_path_does_not_match_a_v1_checkpoint(converted: dict[str, Path]) -> None:
    """Without the override the same weights give v2's token order, and the
    reference tells: so the check above proves that v1 is computed."""
    logits = _logits(_load(converted[V1], override=False), converted[V1])
    assert _worst(logits, V1) > 100 * TOLERANCE
    # The first image token is block (0, 0) in either order; the second is where they part.
    first = min(int(p) for p in REFERENCE[V1]["positions"])
    row = torch.tensor(REFERENCE[V1]["positions"][str(first)])
    assert float((logits[first] - row).abs().max()) <= TOLERANCE
    second = torch.tensor(REFERENCE[V1]["positions"][str(first + 1)])
    assert float((logits[first + 1] - second).abs().max()) > 100 * TOLERANCE


def test_a_v2_checkpoint_is_left_exactly_as_loaded(converted: dict[str, Path]) -> None:
    path = converted["internlm2"]
    assert CONFIG_KEY not in json.loads((path / "config.json").read_text())
    plain = _load(path, override=False)
    model = apply_pixel_shuffle(_load(path, override=False))
    assert pixel_shuffle_version(model.config) == "v2"
    assert "pixel_shuffle" not in vars(model.model)  # the class's own method
    assert torch.equal(_logits(model, path), _logits(plain, path))
    assert _worst(_logits(model, path), "internlm2") <= TOLERANCE


def test_applying_twice_changes_nothing(converted: dict[str, Path]) -> None:
    model = _load(converted[V1], override=True)
    once = model.model.pixel_shuffle
    assert apply_pixel_shuffle(model).model.pixel_shuffle is once


def test_an_unknown_version_in_the_native_config_is_refused() -> None:
    assert pixel_shuffle_version({}) == "v2"
    assert pixel_shuffle_version({CONFIG_KEY: "v1"}) == "v1"
    with pytest.raises(CheckpointError, match="'v3'"):
        pixel_shuffle_version({CONFIG_KEY: "v3"})


def test_the_engine_loads_a_v1_checkpoint_with_the_override(converted: dict[str, Path]) -> None:
    from internvl_launch.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(converted[V1])
    assert _worst(_logits(engine.model, converted[V1]), V1) <= TOLERANCE


def test_an_original_v1_checkpoint_converts_and_chats_through_the_api(originals: dict[str, Path]) -> None:
    from PIL import Image

    from internvl_launch.api import load

    model = load(model_path=originals[V1])
    assert pixel_shuffle_version(model.engine.model.config) == "v1"
    assert "pixel_shuffle" in vars(model.engine.model.model)
    reply = model.chat("Describe the image.", image=Image.new("RGB", (600, 450), (30, 160, 90)), max_tokens=4)
    assert isinstance(reply, str)


@pytest.mark.parametrize("layout", ["original", "converted"])
def test_vllm_is_not_handed_a_v1_checkpoint_it_would_run_as_v2(
    originals: dict[str, Path], converted: dict[str, Path], layout: str
) -> None:
    """vLLM's native InternVL ignores the marker: the weights step refuses
    before converting, unless the original is served with its own code."""
    from dataclasses import replace

    from conftest import make_env

    from internvl_launch.errors import EngineUnavailableError
    from internvl_launch.registry import load_registry
    from internvl_launch.request import LaunchRequest
    from internvl_launch.resolver import resolve_plan
    from internvl_launch.weights import locate_weights

    path = originals[V1] if layout == "original" else converted[V1]
    request = LaunchRequest("", engine="vllm", model_path=str(path), memory_check=False)
    # The plan reads the checkpoint's pixel shuffle and refuses before anything else.
    with pytest.raises(EngineUnavailableError, match="pixel shuffle v1") as err:
        resolve_plan(load_registry(), request, make_env([], vllm="cpu"))
    assert "--trust-remote-code" in (err.value.hint or "") + err.value.message
    trusted = resolve_plan(load_registry(), replace(request, trust_remote_code=True), make_env([], vllm="cpu"))
    if layout == "original":
        assert locate_weights(trusted, trust_remote_code=True) == path
    else:  # a converted v1 checkpoint has no code of its own: the weights step refuses it
        with pytest.raises(EngineUnavailableError, match="pixel shuffle v1"):
            locate_weights(trusted, trust_remote_code=True)
        v2 = LaunchRequest("", engine="vllm", model_path=str(converted["internlm2"]), memory_check=False)
        assert locate_weights(resolve_plan(load_registry(), v2, make_env([], vllm="cpu"))) == converted["internlm2"]


def test_a_local_v1_checkpoint_is_planned_on_the_engine_that_computes_v1(originals: dict[str, Path]) -> None:
    """--model-path reads ps_version: on a GPU machine with vLLM, a v1 checkpoint
    goes to the Transformers engine instead of failing at the weights step."""
    from conftest import make_env

    from internvl_launch.registry import load_registry
    from internvl_launch.request import LaunchRequest
    from internvl_launch.resolver import resolve_plan

    gpu = make_env([("NVIDIA H100 80GB HBM3", 80)])
    plan = resolve_plan(load_registry(), LaunchRequest("", model_path=str(originals[V1])), gpu)
    assert plan.spec.pixel_shuffle == "v1" and plan.engine == "transformers"
    assert "pixel shuffle v1" in plan.rejected_engines["vllm"]
    assert plan.provenance["pixel_shuffle"] == "config.json ps_version"
