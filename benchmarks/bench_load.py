"""Load test and soak of our server on the built-in model.

Load (`make bench-load`): clients with images at a rising concurrency
(1, 2, 4, ... up to --max-clients), each level for a fixed number of
requests. Per level: throughput, p50/p95 latency, how many got 429, and the
server's resident memory. Every request must end in 200 or 429/503 - a
timeout, a dropped connection or any other status is a lost request, and the
run fails.

Soak (`make soak`, not in CI): a fixed concurrency for --soak seconds,
sampling the server's memory and open file descriptors; both must stay flat.

    python benchmarks/bench_load.py --max-clients 64 --max-queue 16
    python benchmarks/bench_load.py --soak 600 --clients 8
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
from pathlib import Path
from typing import Any

import httpx
from PIL import Image


def image(i: int) -> str:
    img = Image.effect_mandelbrot((640, 480), (-2 + (i % 89) * 0.01, -1, 1, 1), 25 + i % 15).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def launch(max_queue: int, max_batch: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "internvl_launch", "launch", "-n", "internvl-tiny", "--port", "0", "--detach"]
    command += ["--json", "--max-queue", str(max_queue), "--max-batch-size", str(max_batch), "--max-tiles", "4"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout)


def stop(ready: dict[str, Any]) -> None:
    subprocess.run([sys.executable, "-m", "internvl_launch", "stop", ready["id"]], capture_output=True)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int) -> tuple[str, float]:
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image(i)}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    try:
        r = await client.post(url + "/chat/completions", json=body)
        outcome = str(r.status_code)
    except httpx.TimeoutException:
        outcome = "timeout"
    except httpx.HTTPError as err:
        outcome = type(err).__name__
    return outcome, time.perf_counter() - started


async def level(url: str, model: str, clients: int, per_client: int, max_tokens: int, pid: int) -> dict[str, Any]:
    results: list[tuple[str, float]] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def one_client(c: int) -> None:
            for k in range(per_client):
                results.append(await request(client, url, model, c * 1000 + k, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - started
    ok = sorted(t for o, t in results if o == "200")
    outcomes: dict[str, int] = {}
    for o, _ in results:
        outcomes[o] = outcomes.get(o, 0) + 1
    lost = sum(n for o, n in outcomes.items() if o not in ("200", "429", "503"))
    return {
        "clients": clients,
        "requests": len(results),
        "outcomes": outcomes,
        "lost": lost,
        "ok_per_s": len(ok) / wall,
        "latency_p50": statistics.median(ok) if ok else None,
        "latency_p95": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None,
        "rss_mib": rss_mib(pid),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--soak", type=float, default=0, help="soak for this many seconds instead of the load steps")
    ap.add_argument("--clients", type=int, default=8, help="concurrency of the soak")
    args = ap.parse_args()
    ready = launch(args.max_queue, args.max_batch)
    url, model, pid = ready["url"], ready["model"], ready["pid"]
    failed = False
    try:
        if args.soak:
            samples = []
            end = time.monotonic() + args.soak
            while time.monotonic() < end:
                r = asyncio.run(level(url, model, args.clients, 2, args.max_tokens, pid))
                samples.append((time.monotonic(), rss_mib(pid), open_fds(pid), r["lost"]))
                print(f"t={samples[-1][0] - samples[0][0]:6.0f}s rss={samples[-1][1]:7.1f} MiB fds={samples[-1][2]} "
                      f"ok/s={r['ok_per_s']:.2f} lost={r['lost']}", flush=True)  # fmt: skip
            half = len(samples) // 2
            first = statistics.median(s[1] for s in samples[1 : max(2, half)])
            last = statistics.median(s[1] for s in samples[half:])
            fds = [s[2] for s in samples]
            print(f"soak: rss median first half {first:.1f} MiB, second half {last:.1f} MiB ({last - first:+.1f}); "
                  f"open fds {min(fds)}..{max(fds)}; lost {sum(s[3] for s in samples)}")  # fmt: skip
            failed = sum(s[3] for s in samples) > 0
        else:
            print(
                f"{'clients':>8}{'requests':>9}{'200':>6}{'429':>6}{'lost':>6}{'ok/s':>8}{'p50 s':>8}{'p95 s':>8}{'rss MiB':>9}"
            )
            clients = 1
            while clients <= args.max_clients:
                r = asyncio.run(level(url, model, clients, args.per_client, args.max_tokens, pid))
                p50 = f"{r['latency_p50']:.3f}" if r["latency_p50"] is not None else "-"
                p95 = f"{r['latency_p95']:.3f}" if r["latency_p95"] is not None else "-"
                print(f"{clients:>8}{r['requests']:>9}{r['outcomes'].get('200', 0):>6}{r['outcomes'].get('429', 0):>6}"
                      f"{r['lost']:>6}{r['ok_per_s']:>8.2f}{p50:>8}{p95:>8}{r['rss_mib']:>9.1f}", flush=True)  # fmt: skip
                failed |= r["lost"] > 0
                clients *= 2
    finally:
        stop(ready)
    print("no request lost" if not failed else "REQUESTS WERE LOST")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
