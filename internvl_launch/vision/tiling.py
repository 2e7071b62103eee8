"""InternVL's dynamic tiling, bit-identical to the model cards' `load_image`.

The work per image is: decode, convert to RGB, one bicubic resize to the tile
grid, one bicubic resize to the thumbnail, then scale to [0, 1] and normalise
with the ImageNet mean and std. Here each step is done once: the tiles are
views into the one resized image, and the normalisation is a per-channel
lookup table of the 256 values a byte can take, computed with the very float32
operations the reference applies to each pixel (x / 255, minus mean, over
std) - so the output is the same bits, in one gather, written directly in the
model's dtype. The two resizes run on two threads (Pillow releases the GIL
while resampling). A content-addressed cache makes a repeated image cost a
hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[str, os.PathLike, bytes, Image.Image]


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


@lru_cache(maxsize=16)
def _lut(dtype_name: str) -> np.ndarray:
    """(3, 256) table: the normalised value of each byte, per channel, computed
    with float32 x / 255, then (x - mean) / std, as the reference does."""
    import torch

    x = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    table = (x[None, :] - mean) / std
    dtype = getattr(torch, dtype_name)
    return table.to(dtype).contiguous()  # type: ignore[return-value]


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
    """LRU of preprocessed tensors keyed by content hash and settings, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


CACHE = _TileCache(int(os.environ.get("INTERNVL_TILE_CACHE_MB", "512")) * 2**20)
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="internvl-resize")


def _content_key(image: ImageInput, settings: tuple[object, ...]) -> bytes | None:
    h = hashlib.blake2b(repr(settings).encode(), digest_size=20)
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(image)
    elif isinstance(image, Image.Image):
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        try:
            with open(image, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return None
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

    out = torch.empty((blocks + int(with_thumb), 3, image_size, image_size), dtype=dtype)
    lut = _lut(dtype_name)
    grid = np.asarray(grid_img)  # (rows*S, cols*S, 3) uint8
    # (rows, S, cols, S, 3) -> (rows, cols, 3, S, S): each tile a view, row-major like the reference.
    tiles = grid.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 4, 1, 3)
    _normalise_into(out[:blocks].view(rows, cols, 3, image_size, image_size), tiles, lut)
    if thumb_img is not None:
        _normalise_into(out[blocks], np.asarray(thumb_img).transpose(2, 0, 1), lut)
    if key is not None:
        CACHE.put(key, out)
    return out


def _normalise_into(dst: torch.Tensor, src: np.ndarray, lut: torch.Tensor) -> None:
    """dst[..., c, :, :] = lut[c][src[..., c, :, :]] per channel: one table gather,
    uint8 indices used as they are (no widening copy)."""
    if lut.dtype == torch_bfloat16():
        # numpy has no bfloat16: gather the 16-bit patterns, then view them as bf16.
        table = lut.view(torch_int16()).numpy()
        target = dst.view(torch_int16()).numpy()
    else:
        table = lut.numpy()
        target = dst.numpy()
    for c in range(3):
        np.take(table[c], src[..., c, :, :], out=target[..., c, :, :])


def torch_bfloat16() -> torch.dtype:
    import torch

    return torch.bfloat16


def torch_int16() -> torch.dtype:
    import torch

    return torch.int16


def preprocess_images(images: Sequence[ImageInput], **kwargs: object) -> list[torch.Tensor]:
    """`preprocess_image` over several images, two at a time."""
    return list(_BATCH_POOL.map(lambda im: preprocess_image(im, **kwargs), images))  # type: ignore[arg-type]


_BATCH_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="internvl-preprocess")
