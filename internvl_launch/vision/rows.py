"""Decoding a JPEG or PNG row by row, so that resizing (or, for an image of
exactly one tile, converting) can start before the image is fully decoded.

Pillow's decoders for baseline or progressive JPEG and non-interlaced PNG
write each row once, top to bottom, and a decoded RGB pixel takes four bytes
whose last one the decoder sets to 255. Here the image memory is a numpy
buffer of ours, in which that byte of each row's last pixel starts at 0: a
row whose byte reads 255 is final. Pillow reads the file in blocks, decoding
each one; before it reads the next, `RowDecoder.decode` reports how many rows
are final. The pixels are those of Pillow's own decode: the same decoder
writes them, only into other memory. `streaming_is_exact` checks that once
against a plain decode; where it fails, images are decoded the plain way.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFile

# Formats whose Pillow decoder writes rows once, in order, for the modes and
# layouts `RowDecoder.accepts` lets through.
_SEQUENTIAL = ("JPEG", "PNG")


class RowDecoder:
    """An opened (not yet loaded) RGB JPEG or PNG, decoded into a (height,
    width, 4) uint8 buffer whose first three channels are the RGB pixels."""

    def __init__(self, img: ImageFile.ImageFile) -> None:
        self._img = img
        width, height = img.size
        self._flat = _SCRATCH.take(height * width * 4)
        self.buffer = self._flat[: height * width * 4].reshape(height, width, 4)
        self._last = self.buffer[:, -1, 3]  # each row's marker byte, 255 once the row is written
        self._last[:] = 0
        self._core = _mapped(self.buffer)
        self.final = 0  # rows known to be final

    @staticmethod
    def accepts(img: Image.Image) -> bool:
        return (
            isinstance(img, ImageFile.ImageFile)
            and img.format in _SEQUENTIAL
            and img.mode == "RGB"
            and not img.info.get("interlace")
            and len(img.tile) == 1
            and hasattr(img, "load_read")
        )

    def decode(self, on_rows: Callable[[int], None]) -> None:
        """Decode the whole image on this thread, calling on_rows(n) whenever
        more rows are final (rows 0..n-1). Pillow's errors for a corrupt or
        truncated file propagate. Raises `DecodeMismatch` where Pillow did not
        decode into our buffer as expected."""
        img = self._img
        img.im = self._core
        read = img.load_read

        def load_read(size: int) -> bytes:
            self._advance(on_rows)
            return read(size)

        img.load_read = load_read  # type: ignore[method-assign]
        img.load()
        if img.im is not self._core:
            raise DecodeMismatch("Pillow decoded into memory of its own")
        self._advance(on_rows)
        if self.final != self.buffer.shape[0]:
            raise DecodeMismatch("rows were left unmarked")

    def _advance(self, on_rows: Callable[[int], None]) -> None:
        # The marked rows are a prefix: binary search for its end.
        lo, hi = self.final, len(self._last)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._last[mid] == 255:
                lo = mid + 1
            else:
                hi = mid
        if lo > self.final:
            self.final = lo
            on_rows(lo)

    def rows(self, lo: int, hi: int) -> Image.Image:
        """Rows lo..hi (final ones) as an RGB image: a view of the buffer, valid
        until `release`."""
        return self._img._new(_mapped(self.buffer[lo:hi]))

    def image(self) -> Image.Image:
        """The whole decoded image: a view of the buffer, valid until `release`."""
        return self.rows(0, self.buffer.shape[0])

    def release(self) -> None:
        """Give the buffer back for reuse; no view of it may be used afterwards."""
        _SCRATCH.give(self._flat)


def _mapped(pixels: np.ndarray) -> Any:
    """Pillow's RGB image memory (four bytes a pixel) over our (h, w, 4) buffer."""
    height, width, _ = pixels.shape
    return Image.core.map_buffer(pixels, (width, height), "raw", 0, ("RGB", 0, 1))


class DecodeMismatch(RuntimeError):
    """Pillow did not decode row by row into our buffer (its internals changed)."""


class _Scratch:
    """Decode buffers kept for reuse. A fresh buffer of a 12-megapixel photo is
    48 MB that the kernel maps in page by page as the decoder writes it (about
    12,000 page faults); a kept one is already mapped. At most `keep` buffers
    of up to `max_bytes` each are kept."""

    def __init__(self, keep: int = 2, max_bytes: int = 64 * 2**20) -> None:
        self.keep, self.max_bytes = keep, max_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A flat uint8 buffer of at least `size` bytes."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].size))
        return np.empty(size, np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        if buffer.size > self.max_bytes:
            return
        with self._lock:
            self._free.append(buffer)
            # keep the largest: a smaller image fits in a larger buffer
            self._free.sort(key=lambda b: b.size, reverse=True)
            del self._free[self.keep :]


_SCRATCH = _Scratch()


@lru_cache(maxsize=1)
def streaming_is_exact() -> bool:
    """Whether `RowDecoder` reproduces this Pillow's plain decode, with rows
    reported as they come, for a JPEG and a PNG of several blocks."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (160, 700, 3), dtype=np.uint8)
    for fmt in _SEQUENTIAL:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 0}))
        data = buf.getvalue()
        want = Image.open(io.BytesIO(data))
        want.load()
        img = Image.open(io.BytesIO(data))
        if not RowDecoder.accepts(img):
            return False
        decoder = RowDecoder(img)
        seen: list[int] = []
        try:
            decoder.decode(seen.append)
            same = np.array_equal(decoder.buffer[..., :3], np.asarray(want))
        except DecodeMismatch:
            return False
        finally:
            decoder.release()
        if not same or len(seen) < 2 or seen != sorted(seen):
            return False
    return True
