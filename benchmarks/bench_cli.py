"""CLI start-up benchmark: median wall time of the light commands beside
`transformers --help`, measured in the same run.

    make bench-cli            # or: python benchmarks/bench_cli.py --runs 15

Targets (issue: registry and light CLI): each light command <= 0.15 s median
and >= 15x faster than `transformers --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def median_seconds(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    subprocess.run(cmd, capture_output=True, env=env)  # warm the page cache and the registry cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    internvl = str(BIN / "internvl")
    env = dict(os.environ)
    env["INTERNVL_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-cli-")
    env_file = Path(env["INTERNVL_CACHE_DIR"]) / "machine.json"
    env_file.write_text(subprocess.run([internvl, "env", "--json"], capture_output=True, text=True, env=env).stdout)
    commands = {
        "internvl list --json": [internvl, "list", "--json"],
        "internvl resolve --json": [internvl, "resolve", "-n", "internvl-tiny", "--json", "--no-memory-check"],
        "internvl --help": [internvl, "--help"],
    }
    results = {name: median_seconds(cmd, args.runs, env) for name, cmd in commands.items()}
    reference = shutil.which("transformers", path=str(BIN)) or shutil.which("transformers")
    ref_time = median_seconds([reference, "--help"], max(3, args.runs // 3), env) if reference else None
    if args.json:
        print(json.dumps({"runs": args.runs, "median_s": results, "transformers_help_s": ref_time}, indent=2))
    else:
        print(f"runs per command: {args.runs} (median wall time, subprocess start included)")
        for name, seconds in results.items():
            ratio = (
                f"{ref_time / seconds:5.1f}x faster than transformers --help"
                if ref_time
                else "(transformers not installed: no ratio)"
            )
            target = "meets" if seconds <= 0.15 and (ref_time is None or ref_time / seconds >= 15) else "MISSES"
            print(f"  {name:<26} {seconds:6.3f} s  {ratio}  [{target} target]")
        if ref_time:
            print(f"  {'transformers --help':<26} {ref_time:6.3f} s")
    shutil.rmtree(env["INTERNVL_CACHE_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
