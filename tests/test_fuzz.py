"""Schema fuzzing of the running server with schemathesis, positive and
negative modes, through its OpenAPI description: no answer may be a 5xx, and
the server still answers /health afterwards. `make fuzz` runs more examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
from servers import running_server

TESTS = Path(__file__).parent


def run_schemathesis(base: str, examples_per_operation: int, seed: int) -> tuple[int, str]:
    from shutil import which

    schemathesis = which("schemathesis", path=os.path.dirname(sys.executable)) or "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(TESTS), "NO_COLOR": "1"}
    done = subprocess.run(
        [schemathesis, "run", f"{base}/openapi.json", "--checks", "not_a_server_error", "--mode", "all",
         "-n", str(examples_per_operation), "--seed", str(seed), "--no-shrink", "--request-timeout", "60"],
        capture_output=True, text=True, env=env, cwd=TESTS, timeout=1800,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_fuzzing_finds_no_server_errors(tmp_path: Path) -> None:
    examples = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 250  # `make fuzz` raises it
    with running_server(tmp_path, tmp_path / "cache", "--max-model-len", "512") as server:
        code, report = run_schemathesis(server.base, examples, seed=20261122)
        counts = re.search(r"(\d+) generated, (\d+) passed", report)
        assert code == 0 and counts, report[-3000:]
        generated, passed = int(counts.group(1)), int(counts.group(2))
        assert generated == passed and generated >= 1000, report[-3000:]
        assert httpx.get(server.base + "/health").json() == {"status": "ok"}
        assert server.proc.poll() is None
