"""internvl-launch: every InternVL vision-language model, one command away.

The package is light to import: heavy parts (torch, transformers, the server)
load only when a function that needs them is called.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "preprocess_image"]


def __getattr__(name: str) -> object:
    # Heavy parts load on first use, so `import internvl_launch` stays light.
    if name == "preprocess_image":
        from internvl_launch.vision.tiling import preprocess_image

        return preprocess_image
    raise AttributeError(f"module 'internvl_launch' has no attribute {name!r}")
