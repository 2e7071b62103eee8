"""internvl-launch: every InternVL vision-language model, one command away.

The package is light to import: heavy parts (torch, transformers, the server)
load only when a function that needs them is called.
"""

from __future__ import annotations

__version__ = "0.1.0"
