"""Pixel shuffle v1 (InternVL 1.5) on Transformers' native InternVL model.

The original `InternVLChatModel` folds each tile's 32x32 grid of ViT features
into a 16x16 grid of 2x2 blocks (four features side by side in the channel
dimension) and hands the blocks to the projector row by row. With
`ps_version: 'v2'` the blocks come out in row-major order. With `'v1'`, which
InternVL 1.5 was trained with, the final swap of the two grid axes is
missing, so the blocks come out column by column: block (row r, column c)
sits where v2 has block (c, r). The blocks themselves hold the same four
features in the same channel order; only their order along the sequence
differs.

Transformers' `InternVLModel.pixel_shuffle` computes v2. For a v1 checkpoint
the converter writes `"internvl_launch_pixel_shuffle": "v1"` at the top level
of the native config.json (Transformers keeps unknown top-level keys as config
attributes and does nothing else with them; absent means v2), and
`apply_pixel_shuffle` replaces that one method on the loaded model instance
with one that swaps the two grid axes of the native result back. Nothing else
changes: the vision tower, the projector, the language model and the weights
are the native ones. `tests/test_convert.py` checks the result against logits
recorded with the original code on a tiny v1 checkpoint.

Only this package applies the override: another runtime that reads the
converted checkpoint (vLLM's native InternVL, `from_pretrained` without
`apply_pixel_shuffle`) ignores the key and computes v2.
"""

from __future__ import annotations

from typing import Any

from internvl_launch.errors import CheckpointError

#: The top-level key of a converted config.json naming the pixel shuffle.
CONFIG_KEY = "internvl_launch_pixel_shuffle"
VERSIONS = ("v1", "v2")
#: Set on an `InternVLModel` whose `pixel_shuffle` computes v1.
_APPLIED = "_internvl_launch_pixel_shuffle_v1"


def pixel_shuffle_version(config: Any) -> str:
    """`v1` or `v2` for a native config (a config object or a config.json
    dict); a config without the key is v2, what Transformers computes."""
    value = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if value is None:
        return "v2"
    if value not in VERSIONS:
        raise CheckpointError(
            f"config.json names pixel shuffle {value!r} ({CONFIG_KEY}); known: {', '.join(VERSIONS)}.",
            hint="Convert the original checkpoint again.",
        )
    return str(value)


def apply_pixel_shuffle(model: Any) -> Any:
    """Make a loaded `InternVLForConditionalGeneration` (or `InternVLModel`)
    compute the pixel shuffle its config names, and return it. A v2 model is
    returned untouched; applying twice changes nothing."""
    if pixel_shuffle_version(model.config) == "v2":
        return model
    inner = getattr(model, "model", model)
    native = getattr(inner, "pixel_shuffle", None)
    if native is None:
        raise CheckpointError(
            f"{type(model).__name__} has no pixel_shuffle method to compute pixel shuffle v1 with.",
            hint="This Transformers version's InternVL differs from the one internvl-launch supports.",
        )
    if getattr(inner, _APPLIED, False):
        return model

    def pixel_shuffle_v1(vision_features: Any, scale_factor: float = 0.5) -> Any:
        # The native result is (batch, rows, columns, channels) in v2 order;
        # v1 is the same blocks with the two grid axes swapped.
        return native(vision_features, scale_factor=scale_factor).transpose(1, 2).contiguous()

    inner.pixel_shuffle = pixel_shuffle_v1
    setattr(inner, _APPLIED, True)
    return model
