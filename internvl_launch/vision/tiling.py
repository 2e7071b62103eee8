"""InternVL's dynamic tiling, bit-identical to the model cards' `load_image`.

The work per image is: decode, convert to RGB, one bicubic resize to the tile
grid, one bicubic resize to the thumbnail, then scale to [0, 1] and normalise
with the ImageNet mean and std. Here each step is done once: the tiles are
read as views of the one resized image (no crops), and the reference's
per-pixel arithmetic (x / 255, minus mean, over std - the same float32
operations, so the same bits) is applied tile by tile straight into the
output, while each tile is in cache. Both resizes run on two threads at once,
each of Pillow's two passes split in bands (Pillow releases the GIL while
resampling; see `resize_in_bands`); for a large JPEG or PNG the first pass
starts on the rows already decoded while the rest is still being decoded
(`_resize_while_decoding`), and an image of exactly one tile is decoded
straight into the model input, its rows converted as they come
(`_convert_while_decoding`). A content-addressed cache makes a repeated image
cost a hash.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from internvl_launch.vision.rows import RowDecoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike | bytes | Image.Image
# Receives one band of a resized image: (h, w, 3) uint8 pixels placed at (y0, x0).
Emit = Callable[[np.ndarray, int, int], None]


def tile_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The (columns, rows) grid an image of this size is cut into.

    Candidates are every grid with min_tiles <= columns x rows <= max_tiles,
    in order of tile count; the one whose aspect ratio is closest to the
    image's wins. On an exact tie a later (larger) grid replaces the earlier
    one only when the image has more than half the pixels of that grid.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect = width / height
    area = width * height
    best = (1, 1)
    best_diff = float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Sorting is stable, so among grids with the same tile count the order is
    # the iteration order of the set the reference builds; building the same
    # set the same way (insertion order, generator into set()) reproduces it.
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def num_tiles(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True) -> int:
    """How many 448 px tiles `preprocess_image` produces for an image of this size."""
    cols, rows = tile_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
    n = cols * rows
    return n + 1 if thumbnail and n != 1 else n


@lru_cache(maxsize=2)
def _stats(which: str) -> torch.Tensor:
    import torch

    values = IMAGENET_MEAN if which == "mean" else IMAGENET_STD
    return torch.tensor(values, dtype=torch.float32)[:, None, None]


def normalise_(pixels: torch.Tensor) -> torch.Tensor:
    """Scale float32 pixel values in 0..255 to the model's input, in place.

    The reference's arithmetic on every pixel - ToTensor's x / 255, then
    Normalize's (x - mean) / std - with the same float32 operations, so the
    same bits. `pixels` is (..., 3, h, w), any strides."""
    return pixels.div_(255).sub_(_stats("mean")).div_(_stats("std"))


def to_model_input(dest: torch.Tensor, pixels: np.ndarray) -> None:
    """Write (h, w, 3) uint8 pixels, any strides, into float32 `dest` (3, h, w)
    as the model's input.

    Called a tile (3 x 448 x 448 floats, 2.4 MB) at a time: the four passes
    over it (convert, scale, subtract, divide) then stay in cache, about twice
    as fast as each pass over a whole image of tiles."""
    np.copyto(dest.numpy(), pixels.transpose(2, 0, 1), casting="unsafe")
    normalise_(dest)


def _tile_writer(dest: torch.Tensor, unit: int) -> Emit:
    """A sink for bands of the resized grid image: each (h, w, 3) uint8 band
    placed at (y0, x0) is converted into the (rows, cols, 3, unit, unit)
    float32 `dest`, tile by tile (a band may hold parts of tiles)."""

    def write(pixels: np.ndarray, y0: int, x0: int) -> None:
        y1, x1 = y0 + pixels.shape[0], x0 + pixels.shape[1]
        for row in range(y0 // unit, (y1 - 1) // unit + 1):
            top, bottom = max(y0, row * unit), min(y1, (row + 1) * unit)
            for col in range(x0 // unit, (x1 - 1) // unit + 1):
                left, right = max(x0, col * unit), min(x1, (col + 1) * unit)
                to_model_input(
                    dest[row, col, :, top - row * unit : bottom - row * unit, left - col * unit : right - col * unit],
                    pixels[top - y0 : bottom - y0, left - x0 : right - x0],
                )

    return write


def _horizontal_first(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """Which pass Pillow runs first for this resize: it shrinks height first
    when height shrinks by more than twice as many pixels as width does."""
    shrink_h = src[1] - dst[1]
    return not (shrink_h > 0 and shrink_h > (src[0] - dst[0]) * 2)


def _halves(n: int, unit: int) -> int:
    """Where to cut n pixels in two: at a tile edge when there are several tiles."""
    return (n // unit + 1) // 2 * unit if n >= 2 * unit else n // 2


def _in_two_bands(band: Callable[[int, int], None], cut: int, end: int) -> None:
    """Run band(0, cut) and band(cut, end) on the pool's two threads; one band when cut is 0."""
    if not 0 < cut < end:
        band(0, end)
        return
    _on_both(lambda: band(0, cut), lambda: band(cut, end))


def _on_both(*jobs: Callable[[], None]) -> None:
    """Run the jobs on the pool and wait for all of them.

    Both halves run there, none on the calling thread: glibc gives the main
    thread's large freed blocks back to the system, so every image Pillow
    allocates there is faulted in page by page again (about 8,000 faults, 7
    ms, per band of a 12-megapixel photo, measured here), while the pool
    threads' arenas keep and reuse them."""
    futures = [_POOL.submit(job) for job in jobs]
    for future in futures:
        future.result()


def resize_in_bands(img: Image.Image, targets: Sequence[tuple[tuple[int, int], Emit]], unit: int = 448) -> None:
    """`img.resize(size, BICUBIC)` for each (size, emit) target, on two threads,
    handed to `emit(pixels, y0, x0)` in bands: (h, w, 3) uint8 arrays placed
    at (y0, x0) of that result.

    Pillow's bicubic resize is two separable passes with an 8-bit image in
    between: horizontal (each output row from one input row) and vertical
    (each output column from one input column), in the order
    `_horizontal_first` gives, a pass skipped when its axis keeps its size.
    Running each pass as its own resize, the horizontal one on row bands and
    the vertical one on column bands, is therefore the same arithmetic on the
    same pixels. Each pass runs as two bands on two threads; targets whose
    passes come in the same order share the first pass's source bands (one
    crop serves the grid and the thumbnail), and each thread hands its bands
    of the last pass to `emit` itself: one hand-over between the passes, one
    at the end. `_split_is_exact` checks this against Pillow once; where it
    does not hold, plain resizes are emitted.
    """
    if not _split_is_exact():
        for size, emit in targets:
            emit(np.asarray(img.resize(size, Image.Resampling.BICUBIC)), 0, 0)
        return
    _resize_all(img, targets, unit)


def _resize_all(img: Image.Image, targets: Sequence[tuple[tuple[int, int], Emit]], unit: int) -> None:
    """The targets in two groups by Pillow's pass order, each group's passes shared."""
    for horizontal in (True, False):
        group = [t for t in targets if _horizontal_first(img.size, t[0]) == horizontal]
        if group:
            passes = _Passes(img.size, group, horizontal, unit, source=img)
            passes.first_from(img)
            passes.second()


class _Passes:
    """Pillow's two passes for targets that all run `horizontal` first (see
    resize_in_bands): the first pass band by band, as the caller hands over
    bands of the source, then the second pass on two threads."""

    def __init__(
        self,
        size: tuple[int, int],
        targets: Sequence[tuple[tuple[int, int], Emit]],
        horizontal: bool,
        unit: int,
        source: Image.Image | None = None,
    ) -> None:
        self.size, self.targets, self.unit = size, targets, unit
        # Axis 0 is x (columns), 1 is y (rows); the first pass resizes along `first`.
        self.first, self.second_axis = (0, 1) if horizontal else (1, 0)
        first, second = self.first, self.second_axis
        self.resize_first = [target[first] != size[first] for target, _ in targets]
        # Targets whose other axis keeps its size are done after the first
        # pass; the others get the first pass's result in `mids` (the source
        # itself where the first pass is skipped and the source is at hand).
        self.done_first = [target[second] == size[second] for target, _ in targets]
        self.mids = [
            None
            if done
            else source
            if not resize and source is not None
            else Image.new("RGB", self._band_size(target, first, size[second]), None)
            for (target, _), resize, done in zip(targets, self.resize_first, self.done_first, strict=True)
        ]
        self._source = source
        self.first_needed = source is None or any(
            resize or done for resize, done in zip(self.resize_first, self.done_first, strict=True)
        )
        self.bands = (size[second] // 2, size[second])  # where the first pass is cut in two, and its end

    @staticmethod
    def _band_size(size: tuple[int, int], axis: int, length: int) -> tuple[int, int]:
        return (size[0], length) if axis == 0 else (length, size[1])

    @staticmethod
    def _box(src: tuple[int, int], axis: int, lo: int, hi: int) -> tuple[int, int, int, int]:
        # the band lo..hi of an image of size src for a pass along `axis`: rows for x, columns for y
        return (0, lo, src[0], hi) if axis == 0 else (lo, 0, hi, src[1])

    @staticmethod
    def _at(axis: int, lo: int) -> tuple[int, int]:
        return (lo, 0) if axis == 0 else (0, lo)  # (y0, x0) of that band in the result

    def band_box(self, lo: int, hi: int) -> tuple[int, int, int, int]:
        """The box of the source band lo..hi for the first pass."""
        return self._box(self.size, self.first, lo, hi)

    def first_band(self, part: Image.Image, lo: int) -> None:
        """The first pass over `part`, the source band that starts at lo."""
        first, hi = self.first, lo + part.size[self.second_axis]
        for (size, emit), resize, done, mid in zip(
            self.targets, self.resize_first, self.done_first, self.mids, strict=True
        ):
            result = part.resize(self._band_size(size, first, hi - lo), Image.Resampling.BICUBIC) if resize else part
            if done:
                emit(np.asarray(result), *self._at(first, lo))
            elif mid is not self._source:
                mid.paste(result, self._at(first, lo)[::-1])

    def first_from(self, source: Image.Image) -> None:
        """The first pass over the whole source, in two bands on the pool's threads."""
        if self.first_needed:
            cut, end = self.bands
            _in_two_bands(lambda lo, hi: self.first_band(source.crop(self.band_box(lo, hi)), lo), cut, end)

    def second(self) -> None:
        if not all(self.done_first):
            _on_both(lambda: self._second_band(True), lambda: self._second_band(False))

    def _second_band(self, low_half: bool) -> None:
        second = self.second_axis
        for (size, emit), mid in zip(self.targets, self.mids, strict=True):
            if mid is None:
                continue
            end = mid.size[self.first]
            cut = _halves(end, self.unit)
            lo, hi = (0, cut) if low_half else (cut, end)
            if lo < hi:
                part = mid.crop(self._box(mid.size, second, lo, hi))
                result = part.resize(self._band_size(size, second, hi - lo), Image.Resampling.BICUBIC)
                emit(np.asarray(result), *self._at(second, lo))


@lru_cache(maxsize=1)
def _split_is_exact() -> bool:
    """Whether `resize_in_bands` reproduces this Pillow's resize: both pass
    orders, upscales and downscales, one pass or none, two targets at once."""
    rng = np.random.default_rng(0)
    cases = [
        ((53, 37), [(96, 64), (16, 16)]),
        ((40, 300), [(32, 64), (16, 16)]),
        ((300, 41), [(64, 64), (16, 16)]),
        ((97, 89), [(50, 45)]),
        ((48, 40), [(48, 80), (80, 40), (48, 40)]),
        ((30, 64), [(64, 64), (30, 16)]),
    ]
    for size, sizes in cases:
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for got, want in zip(assemble_bands(img, sizes, 16), sizes, strict=True):
            if not np.array_equal(got, np.asarray(img.resize(want, Image.Resampling.BICUBIC))):
                return False
    return True


def assemble_bands(img: Image.Image, sizes: Sequence[tuple[int, int]], unit: int) -> list[np.ndarray]:
    """The bands `resize_in_bands` emits for each size, each put together as one (H, W, 3) image."""
    outs = [np.zeros((h, w, 3), np.uint8) for w, h in sizes]

    def sink(out: np.ndarray) -> Emit:
        def emit(pixels: np.ndarray, y0: int, x0: int) -> None:
            out[y0 : y0 + pixels.shape[0], x0 : x0 + pixels.shape[1]] = pixels

        return emit

    _resize_all(img, [(size, sink(out)) for size, out in zip(sizes, outs, strict=True)], unit)
    return outs


def open_image(image: ImageInput) -> Image.Image:
    """Decode fully (truncated files raise) and convert to RGB as the reference does.

    Encoded input (bytes or a path) is checked first: an accepted format, no
    decompression bomb. Anything unreadable is a `MediaError` whose text names
    no library internals."""
    if isinstance(image, Image.Image):
        return _decoded(image, None)
    return _decoded(*_open_encoded(image))


def _open_encoded(image: str | os.PathLike | bytes) -> tuple[Image.Image, str]:
    """The image opened but not decoded, after open_image's checks, and its name for errors."""
    from internvl_launch.errors import MediaError
    from internvl_launch.vision.media import opened_image
    from internvl_launch.vision.png import inflate_with_isal

    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
    name = "The image" if data is not None else f"Image {image}"
    try:
        if data is None:
            data = Path(image).read_bytes()  # type: ignore[arg-type]
    except OSError:
        raise MediaError(f"{name} could not be read.") from None
    img = opened_image(data, name)
    inflate_with_isal(img)  # a PNG's data inflated twice as fast, where isal is installed
    return img, name


def _open_for_tiling(image: ImageInput) -> tuple[Image.Image, str | None]:
    """The image, decoded as open_image does, or, where it can be decoded row by
    row (rows.RowDecoder), opened only: then with its name for errors."""
    from internvl_launch.vision.rows import RowDecoder

    if isinstance(image, Image.Image):
        return open_image(image), None
    img, name = _open_encoded(image)
    if RowDecoder.accepts(img):
        return img, name
    return _decoded(img, name), None


def _decoded(img: Image.Image, undecoded: str | None) -> Image.Image:
    """`img` decoded (where `undecoded` names it, it is opened only) and in RGB."""
    if undecoded is not None:
        with _decode_errors(undecoded):
            img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


@contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    from internvl_launch.errors import MediaError

    try:
        yield
    except Exception:  # truncated or corrupt past the header; Pillow's text is not shown
        raise MediaError(f"{name} is truncated or corrupt.", hint="Send a complete image file.") from None


class _RowFeed:
    """Chunks of rows of an image a rows.RowDecoder is decoding, handed out in
    order as the decoder finishes them, to any thread that asks."""

    def __init__(self, decoder: RowDecoder, height: int, step: int) -> None:
        self.decoder = decoder
        self.chunks = [(lo, min(lo + step, height)) for lo in range(0, height, step)]
        self._ready = threading.Condition()
        self._final = self._next = 0
        self._failed = False

    def decode(self) -> BaseException | None:
        """Decode on this thread; returns the decoder's failure instead of raising it."""
        try:
            self.decoder.decode(self._on_rows)
        except BaseException as failure:  # the other thread must hear of any
            with self._ready:
                self._failed = True
                self._ready.notify_all()
            return failure
        return None

    def each(self, work: Callable[[int, int], None], wait: bool) -> None:
        """work(lo, hi) on chunks as they are final, until none is left (or,
        without `wait`, none is final yet) or the decode failed."""
        while (chunk := self._take(wait)) is not None:
            work(*chunk)

    def _take(self, wait: bool) -> tuple[int, int] | None:
        with self._ready:
            while self._next < len(self.chunks) and not self._failed:
                lo, hi = self.chunks[self._next]
                if self._final >= hi:
                    self._next += 1
                    return lo, hi
                if not wait:
                    return None
                self._ready.wait()
            return None

    def _on_rows(self, final: int) -> None:
        if not any(self._final < hi <= final for _, hi in self.chunks):
            self._final = final  # no chunk completed: no one to wake (waiters recheck under the lock)
            return
        with self._ready:
            self._final = final
            self._ready.notify_all()


def _resize_while_decoding(
    img: Image.Image, data: bytes, name: str, targets: Sequence[tuple[tuple[int, int], Emit]], unit: int
) -> bool:
    """Decode `img` (opened from `data`, not loaded, one that rows.RowDecoder
    accepts: see _open_for_tiling) and resize it to the targets, the
    first pass of the targets that run horizontally first (row bands) starting
    on one thread while the other is still decoding (see rows.RowDecoder).
    Returns False, having done nothing, where the image cannot be decoded row
    by row; the caller then decodes it the plain way."""
    from internvl_launch.vision.rows import RowDecoder, streaming_is_exact

    horizontal = [t for t in targets if _horizontal_first(img.size, t[0])]
    if (
        img.size[0] * img.size[1] < _STREAM_MIN_PIXELS
        or not horizontal
        or not _split_is_exact()
        or not streaming_is_exact()
    ):
        return False
    decoder = _POOL.submit(RowDecoder, img).result()  # a fresh buffer is faulted in on a pool thread
    passes = _Passes(img.size, horizontal, True, unit)
    height = img.size[1]
    feed = _RowFeed(decoder, height, max(_MIN_CHUNK_ROWS, -(-height // _CHUNKS)))

    def resize(lo: int, hi: int) -> None:
        passes.first_band(decoder.rows(lo, hi), lo)

    def decode_then_help() -> BaseException | None:
        failure = feed.decode()
        feed.each(resize, wait=False)
        return failure

    # One thread decodes, then joins in; the other resizes chunks as they are final.
    jobs = [_POOL.submit(decode_then_help), _POOL.submit(feed.each, resize, True)]
    futures.wait(jobs)  # both ended before any error is raised: the buffer is in use until then
    try:
        decode_failure = jobs[0].result()
        jobs[1].result()  # an error of the resizing itself propagates as it is
        if decode_failure is None:
            passes.second()
            # the other targets start once the whole image is decoded
            _resize_all(decoder.image(), [t for t in targets if t not in horizontal], unit)
    finally:
        decoder.release()  # after every use of the views of its buffer
    _after_decode(decode_failure, name, lambda: resize_in_bands(open_image(data), targets, unit))
    return True


def _convert_while_decoding(img: Image.Image, data: bytes, name: str, dest: torch.Tensor, parallel: bool) -> bool:
    """Decode `img` (opened from `data`, not loaded, accepted by
    rows.RowDecoder), exactly one tile in size, straight into the model input
    `dest` (3, size, size): no copy of the decoded image, and with `parallel`
    the rows are converted on a pool thread while this one decodes. Returns
    False, having done nothing, where the image cannot be decoded row by row."""
    from internvl_launch.vision.rows import RowDecoder, streaming_is_exact

    if not streaming_is_exact():
        return False
    # The decoder reports rows between reads: a file of a few tens of KB
    # (a JPEG) would otherwise arrive in one or two of Pillow's 64 KB reads.
    img.decodermaxblock = min(64 * 1024, max(8 * 1024, len(data) // _ONE_TILE_READS))
    decoder = RowDecoder(img)
    feed = _RowFeed(decoder, img.size[1], -(-img.size[1] // _ONE_TILE_CHUNKS))

    def convert(lo: int, hi: int) -> None:
        to_model_input(dest[:, lo:hi], decoder.buffer[lo:hi, :, :3])

    helper = _POOL.submit(feed.each, convert, True) if parallel else None
    try:
        decode_failure = feed.decode()
        feed.each(convert, wait=False)
    finally:
        # Not started (the pool is busy): nothing is left for it. Started: it
        # ends once no chunk is left, and must before the buffer goes back.
        if helper is not None and not helper.cancel():
            futures.wait([helper])
        decoder.release()
    if helper is not None and not helper.cancelled():
        helper.result()  # an error of its converting propagates as it is
    _after_decode(decode_failure, name, lambda: to_model_input(dest, np.asarray(open_image(data))))
    return True


def _after_decode(failure: BaseException | None, name: str, plain: Callable[[], None]) -> None:
    """After decoding row by row: where Pillow did not decode as rows.RowDecoder
    expects, `plain()` does all the work again from a plain decode; a decode
    error is the image's MediaError."""
    from internvl_launch.vision.rows import DecodeMismatch

    if isinstance(failure, DecodeMismatch):
        plain()
    elif failure is not None:
        with _decode_errors(name):
            raise failure


# The first pass while decoding works on chunks of rows: about an eighth of
# the image, enough that the threads trade work as the decoder goes on.
_CHUNKS = 8
_MIN_CHUNK_ROWS = 32
# Below about a megapixel decoding takes a few milliseconds, no more than the
# hand-overs of resizing chunk by chunk cost: measured, 800x600 gained nothing
# or lost up to 9%, while 1920x1080 and 4000x3000 gained 13-28%.
_STREAM_MIN_PIXELS = 1_000_000
# A one-tile image is converted in quarters, its file read in about six
# steps (measured at 448x448: JPEG fastest with 16 KB reads of 73 KB, PNG
# with 64 KB reads of 455 KB; more, smaller reads cost more than they gain).
_ONE_TILE_CHUNKS = 4
_ONE_TILE_READS = 6


class _TileCache:
    """LRU of preprocessed results keyed by content hash and settings, bounded in bytes.

    Values are tensors, or objects holding one as `pixel_values` (video frames)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(value: Any) -> int:
        tensor = getattr(value, "pixel_values", value)
        return int(tensor.numel() * tensor.element_size())

    def get(self, key: bytes) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: Any) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


CACHE = _TileCache(int(os.environ.get("INTERNVL_TILE_CACHE_MB", "512")) * 2**20)
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="internvl-resize")


def _content_key(image: bytes | Image.Image, settings: tuple[object, ...]) -> bytes:
    """The cache key: a 256-bit cryptographic hash of the settings and the
    image's bytes (a client cannot make another image's key). BLAKE3 where
    the `blake3` package is installed: about 8 GB/s here, against SHA-256's
    1.8 GB/s, which decides the cost of a hit on a large incompressible PNG."""
    header = repr(settings).encode()
    if isinstance(image, Image.Image):
        header += f"{image.mode}:{image.size}".encode()
        image = image.tobytes()
    if _blake3 is not None:
        fast = _blake3(header + b"\0")
        fast.update(image)
        return bytes(fast.digest())
    h = hashlib.sha256(header + b"\0")  # hardware-accelerated where the CPU has SHA extensions
    if len(image) >= _SPLIT_HASH_BYTES:
        # Two halves hashed on two threads (hashlib releases the GIL), then
        # the pair: a hash tree of depth one, still SHA-256 strength.
        view = memoryview(image)
        cut = len(view) // 2
        first = _POOL.submit(_sha256, view[:cut])
        h.update(b"tree2:" + _sha256(view[cut:]) + first.result())
    else:
        h.update(image)
    return h.digest()


try:
    from blake3 import blake3 as _blake3
except ImportError:  # optional: SHA-256 is used instead
    _blake3 = None

_SPLIT_HASH_BYTES = 1024 * 1024


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def preprocess_image(
    image: ImageInput,
    *,
    max_tiles: int = 12,
    min_tiles: int = 1,
    image_size: int = 448,
    thumbnail: bool = True,
    dtype: torch.dtype | None = None,
    cache: bool = True,
    parallel: bool = True,
) -> torch.Tensor:
    """Tiles of one image as a (tiles, 3, image_size, image_size) tensor.

    `image` is a path, encoded bytes, or a PIL image. The result equals,
    bit for bit in float32, what the model cards' `load_image` produces
    (`dynamic_preprocess` with `use_thumbnail=True`, bicubic resizes,
    ImageNet normalisation). `dtype` defaults to float32; other dtypes are the
    float32 values cast once. `parallel` spreads the work over two threads
    (an image of two or more tiles, or one of exactly one tile, converted
    while it decodes; one tile that needs a resize is too little work to
    gain from it); callers that already run one image per worker turn it off.
    """
    import torch

    dtype = dtype or torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    settings = (max_tiles, min_tiles, image_size, thumbnail, dtype_name)
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()  # read once: hashed and decoded from the same bytes
    elif isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    key = _content_key(image, settings) if cache else None
    if key is not None:
        hit = CACHE.get(key)
        if hit is not None:
            return hit
    img, undecoded = _open_for_tiling(image)
    width, height = img.size
    cols, rows = tile_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    blocks = cols * rows
    with_thumb = thumbnail and blocks != 1

    shape = (blocks + int(with_thumb), 3, image_size, image_size)
    spread = parallel and blocks > 1
    # Allocated where the bands are written, for the reason _on_both gives:
    # memory a pool thread freed (an earlier result) comes back without faults.
    out32 = _POOL.submit(torch.empty, shape, dtype=torch.float32).result() if spread else torch.empty(shape)
    grid_size = (cols * image_size, rows * image_size)
    write = _tile_writer(out32[:blocks].view(rows, cols, 3, image_size, image_size), image_size)
    write_thumbnail = _tile_writer(out32[blocks:, None], image_size)  # (1, 1, 3, S, S) when there is one
    thumb_size = (image_size, image_size)
    if spread:
        # Both cores: two bands per pass (exactly Pillow's own result, see
        # resize_in_bands), each band's tiles converted on the thread that
        # resized it.
        # A JPEG or PNG is resized as it is decoded, where it can be.
        targets = [(grid_size, write)] + ([(thumb_size, write_thumbnail)] if with_thumb else [])
        if undecoded is None or not _resize_while_decoding(img, image, undecoded, targets, image_size):
            resize_in_bands(_decoded(img, undecoded), targets, image_size)
    elif not (
        # exactly one tile: decoded straight into the model input
        blocks == 1
        and img.size == grid_size
        and undecoded is not None
        and _convert_while_decoding(img, image, undecoded, out32[0], parallel)
    ):
        img = _decoded(img, undecoded)
        write(np.asarray(img if img.size == grid_size else img.resize(grid_size, Image.Resampling.BICUBIC)), 0, 0)
        if with_thumb:
            write_thumbnail(np.asarray(img.resize(thumb_size, Image.Resampling.BICUBIC)), 0, 0)
    out = out32 if dtype == torch.float32 else out32.to(dtype)
    if key is not None:
        CACHE.put(key, out)
    return out
