"""Conversion benchmark: `internvl convert` on a random-weight checkpoint of
InternVL2-1B's real architecture (InternViT-300M: 24 layers, hidden 1024;
Qwen2-0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads, vocabulary 151,655)
in bf16, beside copying the same weight file, measured in the same run.

    make bench-convert        # or: python benchmarks/bench_convert.py [--json]

What it shows: conversion time as a multiple of a plain copy of the weights
(the floor for any converter that writes a new file), the peak resident memory
of the converting process against the size of the weights (the converter
streams shards; it should not hold the model twice), and the cost of the
verifying forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INTERNVL2_1B = {
    "backbone": "qwen2",
    "vision_style": "300m",
    "vision_hidden": 1024,
    "vision_layers": 24,
    "vision_heads": 16,
    "vision_intermediate": 4096,
    "text_hidden": 896,
    "text_layers": 24,
    "text_heads": 14,
    "text_kv_heads": 2,
    "text_intermediate": 4864,
    "model_vocab": 151655,
    "dtype": "bfloat16",
}


_PEAK = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)"
)


def timed_child(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) of this child alone, and its stdout. The
    child runs under a small parent of its own, whose children's peak is its."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    peak = int(done.stderr.strip().splitlines()[-1]) / 1024
    return seconds, peak, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original

    root = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        src = root / "InternVL2-1B-random"
        t0 = time.perf_counter()
        generate_tiny_original(src, TinyOriginalConfig(**INTERNVL2_1B))  # type: ignore[arg-type]
        generated = time.perf_counter() - t0
        weights = src / "model.safetensors"
        size_mib = weights.stat().st_size / 2**20
        os.sync()
        t0 = time.perf_counter()
        shutil.copyfile(weights, root / "copy.safetensors")
        os.sync()
        copy_s = time.perf_counter() - t0
        (root / "copy.safetensors").unlink()
        cli = [sys.executable, "-m", "internvl_launch", "convert"]
        convert_s, peak_mib, out = timed_child([*cli, str(src), str(root / "native"), "--no-verify", "--json"])
        report = json.loads(out)
        verify_s, peak_verify_mib, _ = timed_child([*cli, str(src), str(root / "native-verified"), "--json"])
        result = {
            "architecture": "InternVL2-1B (random weights, bf16)",
            "parameters": report["parameters"],
            "weights_mib": round(size_mib, 1),
            "generate_s": round(generated, 2),
            "copy_s": round(copy_s, 2),
            "convert_s": round(convert_s, 2),
            "convert_over_copy": round(convert_s / copy_s, 2),
            "peak_rss_mib": round(peak_mib, 1),
            "peak_rss_over_weights": round(peak_mib / size_mib, 2),
            "convert_and_verify_s": round(verify_s, 2),
            "peak_rss_with_verify_mib": round(peak_verify_mib, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
