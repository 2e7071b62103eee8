"""The Transformers engine's split over several GPUs: layers shared out with
GPU 0 counting as half a GPU, computed from the checkpoint's config, covering
every weight of the real model class. Loading with the map runs here with CPU
stand-ins for the GPUs (accelerate accepts any device names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_launch.checkpoint.tiny import TinyConfig, generate_tiny
from internvl_launch.engines.device_map import FIRST_GPU_MODULES, device_map_for, split_device_map
from internvl_launch.engines.transformers_engine import SamplingParams, TransformersEngine


def _layers_on(mapping: dict, device: object) -> list[int]:
    prefix = "model.language_model.layers."
    return sorted(int(k.removeprefix(prefix)) for k, v in mapping.items() if k.startswith(prefix) and v == device)


@pytest.mark.parametrize(("layers", "gpus"), [(24, 2), (32, 4), (48, 3), (80, 8), (2, 2), (60, 5)])
def test_every_layer_is_placed_and_gpu0_takes_half_a_share(layers: int, gpus: int) -> None:
    mapping = split_device_map(layers, list(range(gpus)))
    placed = sorted(_layers_on(mapping, g) for g in range(gpus))
    assert sorted(i for group in placed for i in group) == list(range(layers))
    assert all(mapping[name] == 0 for name in FIRST_GPU_MODULES)
    assert mapping[f"model.language_model.layers.{layers - 1}"] == 0
    others = [len(_layers_on(mapping, g)) for g in range(1, gpus)]
    first = len(_layers_on(mapping, 0)) - 1  # without the last layer it also holds
    assert first <= max(others) / 2 + 1
    # Layers run in order across the GPUs: each GPU after the first holds one contiguous run.
    for g in range(1, gpus):
        run = _layers_on(mapping, g)
        assert run == list(range(run[0], run[0] + len(run))) if run else True


def test_the_seed_example_split() -> None:
    """InternVL2-26B's 48 language layers over two GPUs: 16 on GPU 0 (plus the
    last), 32 on GPU 1, as the model card's split_model gives."""
    mapping = split_device_map(48, [0, 1])
    assert len(_layers_on(mapping, 0)) == 17 and len(_layers_on(mapping, 1)) == 31


def test_one_device_gets_everything() -> None:
    assert split_device_map(24, [3]) == {"": 3}


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny(tmp_path_factory.mktemp("tiny4") / "m", TinyConfig(text_layers=4))


def test_the_map_covers_every_weight_of_the_model_class(four_layer: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig.from_pretrained(four_layer)
    with init_empty_weights():
        model = InternVLForConditionalGeneration(config)
    mapping = split_device_map(4, [0, 1, 2])
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    uncovered = [n for n in names if not any(n == k or n.startswith(k + ".") for k in mapping)]
    assert uncovered == []


def test_device_map_for_follows_the_plan(four_layer: Path) -> None:
    assert device_map_for("split", (0, 1), four_layer) == split_device_map(4, [0, 1])
    assert device_map_for("single", (2,), four_layer) == {"": 2}
    assert device_map_for(None, (), four_layer) is None
    assert json.loads((four_layer / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4


def test_a_split_model_loads_and_generates_what_the_whole_model_does(four_layer: Path) -> None:
    from PIL import Image

    from internvl_launch.engines.transformers_engine import GenerationRequest
    from internvl_launch.prompt import Media, Message, build_prompt, get_template
    from internvl_launch.vision.tiling import preprocess_image

    whole = TransformersEngine(four_layer)
    split = TransformersEngine(four_layer, device_map=split_device_map(4, ["cpu", "cpu"]))
    pixels = preprocess_image(Image.new("RGB", (600, 300), (30, 90, 200)), max_tiles=2)
    prompt = build_prompt(
        [Message("user", (Media("image", "x.png"), "Describe the image."))],
        template=get_template("internvl2_5"),
        system_message="S",
        media_tiles=[[pixels.shape[0]]],
    )
    request = GenerationRequest(prompt, pixels)
    params = SamplingParams(max_tokens=6)
    assert split.generate([request], params)[0].text == whole.generate([request], params)[0].text


def test_a_model_dispatched_over_two_devices_computes_the_same_logits(four_layer: Path, tmp_path: Path) -> None:
    """The second "GPU" is accelerate's disk offload: its layers run through
    the same dispatch hooks that move activations between GPUs."""
    from transformers import InternVLForConditionalGeneration

    whole = InternVLForConditionalGeneration.from_pretrained(four_layer).eval()
    mapping = split_device_map(4, ["cpu", "disk"])
    split = InternVLForConditionalGeneration.from_pretrained(
        four_layer, device_map=mapping, offload_folder=str(tmp_path)
    ).eval()
    assert split.hf_device_map["model.language_model.layers.2"] == "disk"
    assert split.hf_device_map["model.vision_tower"] == "cpu"
    ids = torch.tensor([[20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(split(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-6)
