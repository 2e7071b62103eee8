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


def open_image(image: ImageInput) -> Image.Image:
    """Decode fully (truncated files raise) and convert to RGB as the reference does."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(image)))
    else:
        img = Image.open(Path(image))
    img.load()
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
    h = hashlib.sha256(repr(settings).encode())  # hardware-accelerated where the CPU has SHA extensions
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        h.update(image)
    return h.digest()


def preprocess_image(
    image: ImageInput,
    *,
    max_tiles: int = 12,
    min_tiles: int = 1,
    image_size: int = 448,
    thumbnail: bool = True,
    dtype: torch.dtype | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Tiles of one image as a (tiles, 3, image_size, image_size) tensor.

    `image` is a path, encoded bytes, or a PIL image. The result equals,
    bit for bit in float32, what the model cards' `load_image` produces
    (`dynamic_preprocess` with `use_thumbnail=True`, bicubic resizes,
    ImageNet normalisation). `dtype` defaults to float32; other dtypes are the
    float32 values cast once.
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

    grid_job = _POOL.submit(img.resize, (cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    thumb_img = img.resize((image_size, image_size), Image.Resampling.BICUBIC) if with_thumb else None
    grid_img = grid_job.result()

    count = blocks + int(with_thumb)
    out32 = torch.empty((count, 3, image_size, image_size), dtype=torch.float32)
    grid = torch.from_numpy(np.array(grid_img))  # (rows*S, cols*S, 3) uint8, one copy
    # (rows, S, cols, S, 3) -> (rows, cols, 3, S, S): each tile a view, row-major like the reference.
    tiles = grid.view(rows, image_size, cols, image_size, 3).permute(0, 2, 4, 1, 3)
    out32[:blocks].view(rows, cols, 3, image_size, image_size).copy_(tiles)
    if thumb_img is not None:
        out32[blocks].copy_(torch.from_numpy(np.array(thumb_img)).permute(2, 0, 1))
    normalise_(out32)
    out = out32 if dtype == torch.float32 else out32.to(dtype)
    if key is not None:
        CACHE.put(key, out)
    return out
