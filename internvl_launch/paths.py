"""Where the tool keeps things on disk. Every location can be moved with an
environment variable, which is also how tests isolate themselves."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / default


def cache_dir() -> Path:
    """Downloads, converted checkpoints, generated models, the registry cache."""
    explicit = os.environ.get("INTERNVL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CACHE_HOME", ".cache") / "internvl-launch"


def config_dir() -> Path:
    explicit = os.environ.get("INTERNVL_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CONFIG_HOME", ".config") / "internvl-launch"


def user_specs_dir() -> Path:
    """The overlay directory that `internvl register` writes spec files into."""
    return config_dir() / "specs"


def state_dir() -> Path:
    """Records of launched servers, for `internvl ps` and `internvl stop`."""
    explicit = os.environ.get("INTERNVL_STATE_DIR")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_STATE_HOME", ".local/state") / "internvl-launch"
