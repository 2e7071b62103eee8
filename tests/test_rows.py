"""Resizing while decoding: a large RGB JPEG or PNG is decoded row by row
(internvl_launch/vision/rows.py) and its first resize pass starts on the rows
already final. The result must be the reference's, bit for bit."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from reference_preprocessing import reference_load_image
from test_tiling import encode, noise

from internvl_launch.errors import MediaError
from internvl_launch.vision import rows
from internvl_launch.vision.tiling import CACHE, preprocess_image


class Spy:
    """Records the row counts each RowDecoder reports."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rows.streaming_is_exact()  # its own decodes happen before the spying starts
        self.reports: list[list[int]] = []
        decode = rows.RowDecoder.decode

        def spying(decoder: rows.RowDecoder, on_rows) -> None:  # type: ignore[no-untyped-def]
            seen: list[int] = []
            self.reports.append(seen)

            def both(n: int) -> None:
                seen.append(n)
                on_rows(n)

            decode(decoder, both)

        monkeypatch.setattr(rows.RowDecoder, "decode", spying)


# (1300, 800): both resizes run horizontally first. (1000, 2000): the grid
# does and the thumbnail runs vertically first, so it waits for the whole image.
# (2600, 400): a wide strip.
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(("width", "height"), [(1300, 800), (1000, 2000), (2600, 400)])
def test_resized_while_decoding_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, fmt: str, width: int, height: int
) -> None:
    spy = Spy(monkeypatch)
    data = encode(noise(width, height), fmt, "RGB")
    got = preprocess_image(data, cache=False)
    assert torch.equal(got, reference_load_image(io.BytesIO(data)))
    # it went row by row: rows were reported final before the decode ended
    assert len(spy.reports) == 1 and len(spy.reports[0]) >= 2
    assert spy.reports[0] == sorted(spy.reports[0]) and spy.reports[0][-1] == height


def test_small_interlaced_or_other_mode_images_are_decoded_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    small = encode(noise(800, 600), "JPEG", "RGB")  # under a megapixel: the hand-overs would cost more
    interlaced = adam7_png(np.asarray(noise(1300, 800)))  # its rows are written out of order
    assert Image.open(io.BytesIO(interlaced)).info.get("interlace")
    grey = encode(noise(1300, 800), "JPEG", "L")
    for data in (small, interlaced, grey):
        assert torch.equal(preprocess_image(data, cache=False), reference_load_image(io.BytesIO(data)))
    assert spy.reports == []


def adam7_png(pixels: np.ndarray) -> bytes:
    """An interlaced (Adam7) RGB PNG, which Pillow reads but does not write."""
    height, width, _ = pixels.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b"".join(
        b"\0" + row.tobytes()  # filter type 0 on every row of every pass
        for x0, y0, dx, dy in passes
        for row in pixels[y0::dy, x0::dx]
        if row.size
    )

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# (1300, 800): resized while decoding; (448, 448): one tile, converted while decoding.
@pytest.mark.parametrize(("width", "height", "fmt"), [(1300, 800, "PNG"), (448, 448, "JPEG")])
def test_where_pillow_differs_images_are_decoded_the_plain_way(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, fmt: str
) -> None:
    data = encode(noise(width, height), fmt, "RGB")
    want = reference_load_image(io.BytesIO(data))
    # the one-time check fails: not even tried
    monkeypatch.setattr(rows, "streaming_is_exact", lambda: False)
    assert torch.equal(preprocess_image(data, cache=False), want)
    monkeypatch.undo()

    # the decode itself finds Pillow not writing where expected, after some
    # chunks were used: the image is decoded again and every tile rewritten
    def mismatch(decoder: rows.RowDecoder, on_rows) -> None:  # type: ignore[no-untyped-def]
        decoder.buffer[: height // 2, :, :3] = 7
        on_rows(height // 2)
        raise rows.DecodeMismatch("test")

    monkeypatch.setattr(rows.RowDecoder, "decode", mismatch)
    assert torch.equal(preprocess_image(data, cache=False), want)


def test_streaming_check_passes_on_this_pillow() -> None:
    # Otherwise the tests above would pass without ever going row by row.
    rows.streaming_is_exact.cache_clear()
    assert rows.streaming_is_exact()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_large_image_is_refused_and_not_cached(fmt: str) -> None:
    data = encode(noise(1300, 800), fmt, "RGB")
    cut = data[: len(data) * 2 // 3]
    CACHE.clear()
    with pytest.raises(MediaError, match="truncated or corrupt") as err:
        preprocess_image(cut)
    assert "BytesIO" not in str(err.value)
    assert CACHE._bytes == 0
    # the pool is free and the scratch buffers usable: the next image is right
    good = encode(noise(1400, 900, seed=3), fmt, "RGB")
    assert torch.equal(preprocess_image(good, cache=False), reference_load_image(io.BytesIO(good)))


def test_corrupt_data_in_the_middle_is_refused() -> None:
    data = bytearray(encode(noise(1300, 800), "PNG", "RGB"))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # a zlib stream with a hole
    with pytest.raises(MediaError, match="truncated or corrupt"):
        preprocess_image(bytes(data), cache=False)


def test_concurrent_callers_decoding_row_by_row() -> None:
    from concurrent.futures import ThreadPoolExecutor

    datas = [
        encode(noise(w, h, seed=i), fmt, "RGB")
        for i, (w, h, fmt) in enumerate(
            [(1300, 800, "JPEG"), (1000, 2000, "PNG"), (1600, 1000, "PNG"), (2600, 400, "JPEG")] * 2
        )
    ]
    wants = [reference_load_image(io.BytesIO(data)) for data in datas]
    for _ in range(3):  # a buffer given back too early shows only in some interleavings
        with ThreadPoolExecutor(max_workers=4) as callers:
            results = list(callers.map(lambda d: preprocess_image(d, cache=False), datas))
        for want, got in zip(wants, results, strict=True):
            assert torch.equal(got, want)


def test_scratch_buffers_are_reused_and_bounded() -> None:
    scratch = rows._Scratch(keep=2, max_bytes=1000)
    a = scratch.take(800)
    scratch.give(a)
    assert scratch.take(500) is a  # a kept buffer that fits is reused
    big = scratch.take(5000)
    scratch.give(big)  # over max_bytes: not kept
    assert scratch.take(5000) is not big
    for size in (100, 200, 300):
        scratch.give(np.empty(size, np.uint8))
    assert sorted(b.size for b in scratch._free) == [200, 300]  # the largest two


# An image of exactly one tile needs no resize: it is decoded straight into
# the model input, rows converted on the other thread as they come.
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("parallel", [True, False])
def test_one_tile_image_decoded_into_the_model_input(monkeypatch: pytest.MonkeyPatch, fmt: str, parallel: bool) -> None:
    spy = Spy(monkeypatch)
    data = encode(noise(448, 448), fmt, "RGB")
    got = preprocess_image(data, cache=False, parallel=parallel)
    assert got.shape == (1, 3, 448, 448)
    assert torch.equal(got, reference_load_image(io.BytesIO(data)))
    assert len(spy.reports) == 1 and len(spy.reports[0]) >= 3  # several steps, not one
    # other sizes of one tile are resized from a plain decode
    small = encode(noise(300, 300), fmt, "RGB")
    assert torch.equal(preprocess_image(small, cache=False, parallel=parallel), reference_load_image(io.BytesIO(small)))
    assert len(spy.reports) == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_one_tile_image_is_refused_and_not_cached(fmt: str) -> None:
    data = encode(noise(448, 448), fmt, "RGB")
    CACHE.clear()
    with pytest.raises(MediaError, match="truncated or corrupt"):
        preprocess_image(data[: len(data) // 2])
    assert CACHE._bytes == 0
    good = encode(noise(448, 448, seed=5), fmt, "RGB")
    assert torch.equal(preprocess_image(good, cache=False), reference_load_image(io.BytesIO(good)))


def test_one_tile_image_while_the_pool_is_busy() -> None:
    # Both pool threads are taken by other work: the converting left for the
    # pool is done by the caller, which does not wait for the pool.
    import threading

    from internvl_launch.vision import tiling

    data = encode(noise(448, 448), "PNG", "RGB")
    release = threading.Event()
    blockers = [tiling._POOL.submit(release.wait, 30) for _ in range(2)]
    results: list[torch.Tensor] = []
    caller = threading.Thread(target=lambda: results.append(preprocess_image(data, cache=False)))
    try:
        caller.start()
        caller.join(20)
        assert not caller.is_alive() and len(results) == 1
    finally:
        release.set()
        for blocker in blockers:
            blocker.result()
    assert torch.equal(results[0], reference_load_image(io.BytesIO(data)))


def test_one_tile_converting_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    from internvl_launch.vision import tiling

    data = encode(noise(448, 448), "JPEG", "RGB")
    convert = tiling.to_model_input
    calls = []

    def failing(dest: torch.Tensor, pixels: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("converting failed")
        convert(dest, pixels)

    monkeypatch.setattr(tiling, "to_model_input", failing)
    with pytest.raises(RuntimeError, match="converting failed"):
        preprocess_image(data, cache=False)
    monkeypatch.undo()
    assert torch.equal(preprocess_image(data, cache=False), reference_load_image(io.BytesIO(data)))
