"""`python -m internvl_launch` is the `internvl` command."""

from internvl_launch.cli import entry_point

entry_point()
