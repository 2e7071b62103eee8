"""The registry must work from an installed wheel with no checkout around it."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from internvl_launch.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_lists_every_spec_without_a_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("internvl_launch-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True, text=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run(
        [str(env_dir / "bin" / "internvl"), "list", "--json"], cwd=outside, capture_output=True, text=True, check=True
    )
    rows = json.loads(done.stdout)
    expected = {(f.name, s.size, s.format) for f in load_registry().families for s in f.specs}
    assert {(r["model_name"], r["size_in_billions"], r["format"]) for r in rows} == expected
    where = subprocess.run(
        [str(py), "-c", "from internvl_launch.registry import builtin_specs_dir; print(builtin_specs_dir())"],
        cwd=outside,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "site-packages" in where.stdout and where.stdout.strip().endswith("_specs")
