"""InternVL's dynamic tiling, bit-identical to the model cards' `load_image`.

The work per image is: decode, convert to RGB, one bicubic resize to the tile
grid, one bicubic resize to the thumbnail, then scale to [0, 1] and normalise
with the ImageNet mean and std. Here each step is done once: the tiles are
views into the one resized image, copied into one float32 buffer, and the
reference's per-pixel arithmetic (x / 255, minus mean, over std - the same
float32 operations, so the same bits) runs once, in place, over all tiles
instead of tile by tile. The two resizes run on two threads (Pillow releases
the GIL while resampling). A content-addressed cache makes a repeated image
cost a hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike | bytes | Image.Image


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
    Normalize's (x - mean) / std - done once over all tiles: the same float32
    operations, so the same bits."""
    return pixels.div_(255).sub_(_stats("mean")).div_(_stats("std"))


def _horizontal_first(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """Which pass Pillow runs first for this resize: it shrinks height first
    when height shrinks by more than twice as many pixels as width does."""
    shrink_h = src[1] - dst[1]
    return not (shrink_h > 0 and shrink_h > (src[0] - dst[0]) * 2)


def _halves(n: int, unit: int) -> int:
    """Where to cut n pixels in two: at a tile edge when there are several tiles."""
    return (n // unit + 1) // 2 * unit if n >= 2 * unit else n // 2


def _in_two_bands(band: Callable[[int, int], None], cut: int, end: int) -> None:
    """Run band(0, cut) here and band(cut, end) on the pool; one band when cut is 0."""
    if not 0 < cut < end:
        band(0, end)
        return
    job = _POOL.submit(band, cut, end)
    band(0, cut)
    job.result()


def _split_resize(img: Image.Image, size: tuple[int, int], image_size: int = 448) -> np.ndarray:
    """`img.resize(size, BICUBIC)` as an (H, W, 3) uint8 array, on two threads.

    Pillow's bicubic resize is two separable passes with an 8-bit image in
    between: horizontal (each output row from one input row) and vertical
    (each output column from one input column), in the order
    `_horizontal_first` gives. Running each pass as its own resize, the
    horizontal one on row bands and the vertical one on column bands, is
    therefore the same arithmetic on the same pixels. `_SPLIT_EXACT` checks
    that on this Pillow once; when it does not hold, one plain resize is used.
    """
    if not _split_is_exact():
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC))
    return _two_pass(img, size, image_size)


def _two_pass(img: Image.Image, size: tuple[int, int], image_size: int) -> np.ndarray:
    w, h = img.size
    W, H = size
    bicubic = Image.Resampling.BICUBIC

    def horizontal(src: Image.Image, width: int) -> np.ndarray:
        if src.width == width:
            return np.array(src)
        out = np.empty((src.height, width, 3), np.uint8)
        cut = src.height // 2

        def band(y0: int, y1: int) -> None:
            out[y0:y1] = np.asarray(src.crop((0, y0, src.width, y1)).resize((width, y1 - y0), bicubic))

        _in_two_bands(band, cut, src.height)
        return out

    def vertical(src: Image.Image, height: int) -> np.ndarray:
        if src.height == height:
            return np.array(src)
        out = np.empty((height, src.width, 3), np.uint8)
        cut = _halves(src.width, image_size)

        def band(x0: int, x1: int) -> None:
            out[:, x0:x1] = np.asarray(src.crop((x0, 0, x1, src.height)).resize((x1 - x0, height), bicubic))

        _in_two_bands(band, cut, src.width)
        return out

    if _horizontal_first((w, h), (W, H)):
        return vertical(Image.fromarray(horizontal(img, W)), H)
    return horizontal(Image.fromarray(vertical(img, H)), W)


@lru_cache(maxsize=1)
def _split_is_exact() -> bool:
    rng = np.random.default_rng(0)
    for w, h, W, H in ((53, 37, 96, 64), (40, 300, 32, 64), (300, 41, 64, 64), (97, 89, 50, 45)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if not np.array_equal(_two_pass(img, (W, H), 16), np.asarray(img.resize((W, H), Image.Resampling.BICUBIC))):
            return False
    return True


def _convert_tiles(out: torch.Tensor, tiles: torch.Tensor) -> None:
    out.copy_(tiles)
    normalise_(out)


def open_image(image: ImageInput) -> Image.Image:
    """Decode fully (truncated files raise) and convert to RGB as the reference does.

    Encoded input (bytes or a path) is checked first: an accepted format, no
    decompression bomb. Anything unreadable is a `MediaError` whose text names
    no library internals."""
    if isinstance(image, Image.Image):
        img = image
    else:
        from internvl_launch.errors import MediaError
        from internvl_launch.vision.media import image_size

        data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
        name = "The image" if data is not None else f"Image {image}"
        try:
            if data is None:
                data = Path(image).read_bytes()  # type: ignore[arg-type]
        except OSError:
            raise MediaError(f"{name} could not be read.") from None
        image_size(data, name)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # truncated or corrupt past the header; Pillow's text is not shown
            raise MediaError(f"{name} is truncated or corrupt.", hint="Send a complete image file.") from None
    return img.convert("RGB") if img.mode != "RGB" else img


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
    float32 values cast once. `parallel` spreads one image over two threads;
    callers that already run one image per worker turn it off.
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
    img = open_image(image)
    width, height = img.size
    cols, rows = tile_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    blocks = cols * rows
    with_thumb = thumbnail and blocks != 1

    count = blocks + int(with_thumb)
    out32 = torch.empty((count, 3, image_size, image_size), dtype=torch.float32)
    grid_size = (cols * image_size, rows * image_size)
    if parallel:
        # Both cores: the thumbnail on a pool thread; the grid resize split in
        # two halves per pass (exactly Pillow's own result, see _split_resize);
        # then the tiles converted and normalised half on each thread.
        thumb_job = _POOL.submit(img.resize, (image_size, image_size), Image.Resampling.BICUBIC) if with_thumb else None
        grid = _split_resize(img, grid_size)
        thumb = thumb_job.result() if thumb_job is not None else None
    else:
        grid = np.array(img.resize(grid_size, Image.Resampling.BICUBIC))
        thumb = img.resize((image_size, image_size), Image.Resampling.BICUBIC) if with_thumb else None
    if thumb is not None:
        _convert_tiles(out32[blocks:], torch.from_numpy(np.array(thumb)).permute(2, 0, 1)[None])
    # (rows, S, cols, S, 3) -> (rows, cols, 3, S, S): each tile a view, row-major like the reference.
    tiles = torch.from_numpy(grid).view(rows, image_size, cols, image_size, 3).permute(0, 2, 4, 1, 3)
    dest = out32[:blocks].view(rows, cols, 3, image_size, image_size)
    axis, n = (0, rows) if rows > 1 else (1, cols)
    half = (n + 1) // 2
    second = None
    if parallel and n > 1:
        second = _POOL.submit(_convert_tiles, dest.narrow(axis, half, n - half), tiles.narrow(axis, half, n - half))
        n = half
    _convert_tiles(dest.narrow(axis, 0, n), tiles.narrow(axis, 0, n))
    if second is not None:
        second.result()
    out = out32 if dtype == torch.float32 else out32.to(dtype)
    if key is not None:
        CACHE.put(key, out)
    return out
