"""Where each part of a native InternVL model goes when the Transformers
engine spreads it over several GPUs.

The language model's decoder layers are shared out in order. GPU 0 also holds
the vision tower, the projector, the token embeddings, the final norm, the
head and the last decoder layer (the head reads its output without another
transfer), so it counts as half a GPU and takes half a share of layers. The
layer count comes from the checkpoint's config, not from a table of model names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Modules of `InternVLForConditionalGeneration` outside the decoder layers; all on the first GPU.
FIRST_GPU_MODULES = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.language_model.embed_tokens",
    "model.language_model.norm",
    "model.language_model.rotary_emb",
    "lm_head",
)


def split_device_map(num_layers: int, devices: Sequence[int | str]) -> dict[str, int | str]:
    """A `device_map` for `from_pretrained` over `devices` (GPU indices, or
    any device names accelerate accepts)."""
    if num_layers < 1:
        raise ValueError("a language model has at least one layer")
    if not devices:
        raise ValueError("no devices to place the model on")
    if len(devices) == 1:
        return {"": devices[0]}
    share = math.ceil(num_layers / (len(devices) - 0.5))
    counts = [math.ceil(share * 0.5)] + [share] * (len(devices) - 1)
    mapping: dict[str, int | str] = {}
    layer = 0
    for device, count in zip(devices, counts, strict=True):
        for _ in range(count):
            if layer < num_layers:
                mapping[f"model.language_model.layers.{layer}"] = device
                layer += 1
    for name in FIRST_GPU_MODULES:
        mapping[name] = devices[0]
    mapping[f"model.language_model.layers.{num_layers - 1}"] = devices[0]
    return mapping


def text_layers(checkpoint: Path) -> int:
    """The language model's layer count, from a native checkpoint's config."""
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config["text_config"]["num_hidden_layers"])


def device_map_for(plan_device_map: str | None, gpu_indices: Sequence[int], checkpoint: Path) -> Any:
    """The `device_map` the engine should load with for a plan: the split
    map over the plan's GPUs, the one GPU it chose, or None (CPU)."""
    if plan_device_map == "split" and len(gpu_indices) > 1:
        return split_device_map(text_layers(checkpoint), list(gpu_indices))
    if plan_device_map == "single" and gpu_indices:
        return {"": gpu_indices[0]}
    return None
