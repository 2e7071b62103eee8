"""Preprocessing benchmark: our tiling against the step-by-step reference of the
model card's `load_image` (tests/reference_preprocessing.py), in the same run.

    make bench-preprocess      # or: python benchmarks/bench_preprocess.py --runs 61
    python benchmarks/bench_preprocess.py --ab decode    # resizing while decoding, off against on
    python benchmarks/bench_preprocess.py --ab inflate   # PNG data inflated by ISA-L, off against on

For each image (encoded bytes, decode included in both): median seconds of the
reference, of ours without the cache, and of ours on a cache hit; the speed-up
again from the decoded image (the tiling alone: how ours decodes is left out);
then a batch of images through one worker and through two. Every output is
checked equal to the reference before it is timed, and the reference and ours
alternate run by run, so that a slow spell of the machine falls on both; a
speed-up is the median of the ratios within each round (`speed_up`).

Targets (issue: exact InternVL inputs): >= 1.4x single image with identical
output; >= 20x on a cache hit; two workers >= 1.7x one on a batch.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_preprocessing import reference_load_image

from internvl_launch.vision import png, tiling
from internvl_launch.vision.tiling import CACHE, preprocess_image

SIZES = [(448, 448), (800, 600), (1920, 1080), (4000, 3000), (1000, 20), (20, 1000)]


def make_image(width: int, height: int, fmt: str) -> bytes:
    rng = np.random.default_rng(width * 31 + height)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1).astype(
        np.uint8
    )
    arr = (arr.astype(np.int16) + rng.integers(-20, 20, arr.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90) if fmt == "JPEG" else Image.fromarray(arr).save(
        buf, format=fmt
    )
    return buf.getvalue()


def median(f, runs: int) -> float:
    """Median seconds of `f` over `runs` timed runs."""
    return statistics.median(timings([f], runs)[0])


def timings(fs: list, runs: int, warm_up: int = 3) -> list[list[float]]:
    """Seconds of each function in each round, the functions run in turn,
    after `warm_up` rounds that are not timed (lazy imports, one-time checks,
    memory first touched)."""
    for _ in range(warm_up):
        for f in fs:
            f()
    times: list[list[float]] = [[] for _ in fs]
    for _ in range(runs):
        for f, sink in zip(fs, times, strict=True):
            start = time.perf_counter()
            f()
            sink.append(time.perf_counter() - start)
    return times


def speed_up(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of the ratio within each round: two runs a few
    milliseconds apart share the machine's state (a neighbour on the second
    core, a slow spell), which the ratio of the two medians would not pair."""
    return statistics.median(a / b for a, b in zip(slow, fast, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument(
        "--ab",
        choices=sorted(AB),
        help="only compare ours without one of its parts against ours as it is, interleaved: "
        "decode (resizing while decoding), inflate (PNG data inflated by ISA-L)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ab:
        return ab(args.ab, args.runs)
    print(f"torch {torch.__version__}, {args.runs} runs per cell, median seconds; decode included")
    print(
        f"{'image':<16}{'tiles':>6}{'reference':>11}{'ours':>9}{'speed-up':>10}"
        f"{'decoded':>9}{'cache hit':>11}{'vs ref':>9}"
    )
    ratios, decoded_ratios, hit_ratios = [], [], []
    for fmt in ("JPEG", "PNG"):
        for width, height in SIZES:
            data = make_image(width, height, fmt)
            ref = reference_load_image(io.BytesIO(data))
            ours = preprocess_image(data, cache=False)
            assert torch.equal(ours, ref), f"output differs for {width}x{height} {fmt}"
            decoded = Image.open(io.BytesIO(data))
            decoded.load()
            times = timings(
                [
                    lambda d=data: reference_load_image(io.BytesIO(d)),
                    lambda d=data: preprocess_image(d, cache=False),
                    lambda im=decoded: reference_load_image(im),
                    lambda im=decoded: preprocess_image(im, cache=False),
                ],
                args.runs,
            )
            t_ref, t_ours = statistics.median(times[0]), statistics.median(times[1])
            ratio, decoded_ratio = speed_up(times[0], times[1]), speed_up(times[2], times[3])
            CACHE.clear()
            preprocess_image(data)
            t_hit = median(lambda d=data: preprocess_image(d), args.runs)
            ratios.append(ratio)
            decoded_ratios.append(decoded_ratio)
            hit_ratios.append(t_ref / t_hit)
            print(
                f"{fmt + f' {width}x{height}':<16}{ref.shape[0]:>6}{t_ref:>11.4f}{t_ours:>9.4f}{ratio:>9.2f}x"
                f"{decoded_ratio:>8.2f}x{t_hit:>11.5f}{t_ref / t_hit:>8.0f}x"
            )
    print(
        f"single image speed-up: median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, "
        f"max {max(ratios):.2f}x (target >= 1.4x)"
    )
    print(
        f"  from the decoded image: median {statistics.median(decoded_ratios):.2f}x, "
        f"min {min(decoded_ratios):.2f}x, max {max(decoded_ratios):.2f}x"
    )
    print(f"cache hit speed-up: min {min(hit_ratios):.0f}x (target >= 20x)")

    batch = [make_image(w, h, "JPEG") for w, h in [(1920, 1080), (800, 600), (1280, 960), (1024, 768)] * 2]

    def run_batch(workers: int) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # One image per worker, each on one thread: the batch is what runs in parallel.
            list(pool.map(lambda d: preprocess_image(d, cache=False, parallel=False), batch))

    one, two = timings([lambda: run_batch(1), lambda: run_batch(2)], args.runs)
    print(
        f"batch of {len(batch)} JPEGs: 1 worker {statistics.median(one):.3f} s, "
        f"2 workers {statistics.median(two):.3f} s: {speed_up(one, two):.2f}x (target >= 1.7x)"
    )
    return 0


@contextmanager
def decoding_first() -> Iterator[None]:
    """The first resize pass waits for the whole decode (no tiling._resize_while_decoding)."""
    threshold = tiling._STREAM_MIN_PIXELS
    tiling._STREAM_MIN_PIXELS = sys.maxsize
    try:
        yield
    finally:
        tiling._STREAM_MIN_PIXELS = threshold


@contextmanager
def zlib_inflating() -> Iterator[None]:
    """PNG data inflated by Pillow's zlib (no vision/png.py)."""
    isal_zlib = png.isal_zlib
    png.isal_zlib = None
    try:
        yield
    finally:
        png.isal_zlib = isal_zlib


AB = {
    "decode": (decoding_first, "decode first", "row by row", ("JPEG", "PNG")),
    "inflate": (zlib_inflating, "zlib", "ISA-L", ("PNG",)),
}


def ab(which: str, runs: int) -> int:
    """Ours with one of its parts left out against ours as it is, in turn run by run."""
    without, off_label, on_label, formats = AB[which]

    def plain(data: bytes) -> torch.Tensor:
        with without():
            return preprocess_image(data, cache=False)

    print(f"{runs} runs per cell, median seconds; row by row from {tiling._STREAM_MIN_PIXELS:,} pixels")
    print(f"{'image':<16}{off_label:>14}{on_label:>12}{'gain':>8}")
    for fmt in formats:
        for width, height in SIZES:
            data = make_image(width, height, fmt)
            assert torch.equal(plain(data), preprocess_image(data, cache=False))
            off, on = timings([lambda d=data: plain(d), lambda d=data: preprocess_image(d, cache=False)], runs)
            print(
                f"{fmt + f' {width}x{height}':<16}{statistics.median(off):>14.4f}"
                f"{statistics.median(on):>12.4f}{speed_up(off, on):>7.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
