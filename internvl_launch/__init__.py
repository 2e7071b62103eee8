"""internvl-launch: every InternVL vision-language model, one command away.

The package is light to import: heavy parts (torch, transformers, the server)
load only when a function that needs them is called.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "load_video", "preprocess_image"]


def __getattr__(name: str) -> object:
    # Heavy parts load on first use, so `import internvl_launch` stays light.
    if name == "preprocess_image":
        from internvl_launch.vision.tiling import preprocess_image

        return preprocess_image
    if name == "load_video":
        from internvl_launch.vision.video import load_video

        return load_video
    if name == "load":
        from internvl_launch.api import load

        return load
    raise AttributeError(f"module 'internvl_launch' has no attribute {name!r}")
