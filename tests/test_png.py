"""PNG data inflated by ISA-L and unfiltered by Pillow (vision/png.py): the same
pixels as Pillow's own decode for every kind of PNG, the same refusals, and
bounded memory for a stream that inflates to more than the image needs."""

from __future__ import annotations

import io
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_rows import adam7_png
from test_tiling import noise

from internvl_launch.errors import MediaError
from internvl_launch.vision import png
from internvl_launch.vision.tiling import open_image, preprocess_image


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def rgb_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def saved(img: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **options)
    return buf.getvalue()


def decoded(data: bytes, fast: bool) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if fast:
        assert png.inflate_with_isal(img)
    img.load()
    return img


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes() and a.getpalette() == b.getpalette()


def kinds() -> dict[str, bytes]:
    big = noise(1300, 900)
    grey = np.asarray(noise(300, 200).convert("L"))
    return {
        "RGB, several IDAT chunks and reads": saved(big),
        "RGB, best compression": saved(noise(640, 480), compress_level=9),
        "RGB, stored": saved(noise(200, 100), compress_level=0),
        "RGBA": saved(noise(333, 217).convert("RGBA")),
        "LA": saved(noise(120, 90).convert("LA")),
        "L": saved(Image.fromarray(grey)),
        "1-bit": saved(Image.fromarray(grey).convert("1")),
        "P with transparency": saved(noise(257, 129).convert("P"), transparency=3),
        "I;16": saved(Image.fromarray(grey.astype("<u2") * 257)),
        "Adam7 interlaced": adam7_png(np.asarray(noise(301, 203))),
        "1x1": saved(Image.new("RGB", (1, 1), (9, 8, 7))),
        "flat (long matches)": saved(Image.new("RGB", (2000, 1500), (240, 240, 240))),
    }


@pytest.mark.parametrize("kind", list(kinds()))
def test_same_pixels_as_pillows_own_decode(kind: str) -> None:
    data = kinds()[kind]
    assert same_pixels(decoded(data, fast=True), decoded(data, fast=False))


def test_preprocessing_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[int] = []
    read = png._Restored.read

    def spy(self: png._Restored, size: int) -> bytes:
        out = read(self, size)
        served.append(len(out))
        return out

    monkeypatch.setattr(png._Restored, "read", spy)
    for data in (saved(noise(640, 480)), saved(noise(1300, 900))):  # the plain and the row-by-row decode
        served.clear()
        preprocess_image(data, cache=False)
        assert sum(served) > 640 * 480 * 3  # inflated data went through it
    served.clear()
    buf = io.BytesIO()
    noise(640, 480).save(buf, format="JPEG")
    preprocess_image(buf.getvalue(), cache=False)
    assert served == []


def test_left_to_pillow_without_isal_or_for_other_images(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [noise(64, 48, seed=s) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    animated = Image.open(io.BytesIO(buf.getvalue()))
    assert animated.is_animated and not png.inflate_with_isal(animated)
    buf = io.BytesIO()
    frames[0].save(buf, format="JPEG")
    assert not png.inflate_with_isal(Image.open(io.BytesIO(buf.getvalue())))

    data = saved(noise(300, 200))
    monkeypatch.setattr(png, "isal_zlib", None)
    assert not png.inflate_with_isal(Image.open(io.BytesIO(data)))
    assert same_pixels(open_image(data), Image.open(io.BytesIO(data)).convert("RGB"))


def test_corrupt_streams_are_refused() -> None:
    raw = b"".join(b"\0" + bytes(range(30)) * 4 for _ in range(40))  # 40 rows of 40 RGB pixels
    good = zlib.compress(raw)
    wrong_checksum = good[:-4] + bytes(4)
    garbage = good[:2] + bytes([0xFF]) * 50  # an invalid block type
    truncated = good[: len(good) // 2]
    assert (
        decoded(rgb_png(40, 40, good), fast=True).tobytes() == Image.open(io.BytesIO(rgb_png(40, 40, good))).tobytes()
    )
    for idat in (wrong_checksum, garbage, truncated):
        with pytest.raises(MediaError, match="truncated or corrupt"):
            open_image(rgb_png(40, 40, idat))


def test_a_stream_longer_than_the_image_is_never_inflated_whole() -> None:
    # 16 rows the image needs, then 200 MB more of the same stream: Pillow
    # stops after the 16 rows, and so does the inflating.
    width = 16
    stream = zlib.compressobj(9)
    row = b"\0" + bytes(width * 3)
    idat = stream.compress(row * 16)
    block = row * (1 << 16)  # 3.2 MB
    for _ in range(64):
        idat += stream.compress(block)
    idat += stream.flush()
    assert len(idat) < 1_000_000
    data = rgb_png(width, 16, idat)
    want = decoded(data, fast=False)
    tracemalloc.start()
    try:
        got = decoded(data, fast=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same_pixels(got, want)
    assert peak < 8 * png._BLOCK_OUT
