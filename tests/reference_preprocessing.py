"""An independent reference for the tiling: the model card's `load_image`
behaviour, written step by step from its description (per-tile crops of a
resized image, per-tile ToTensor and Normalize as torchvision defines them),
without any of the shortcuts of `internvl_launch.vision.tiling`. Used by the
exactness tests and by `make bench-preprocess`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32)


def closest_grid(aspect: float, grids: list[tuple[int, int]], width: int, height: int, size: int) -> tuple[int, int]:
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def split_tiles(
    image: Image.Image, min_num: int = 1, max_num: int = 12, size: int = 448, thumbnail: bool = True
) -> list[Image.Image]:
    width, height = image.size
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    ordered = sorted(grids, key=lambda g: g[0] * g[1])
    cols, rows = closest_grid(width / height, ordered, width, height, size)
    resized = image.resize((size * cols, size * rows))  # Pillow's default filter for RGB: bicubic
    tiles = []
    for i in range(cols * rows):
        x, y = i % cols, i // cols
        tiles.append(resized.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)))
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def to_normalised_tensor(tile: Image.Image, size: int = 448) -> torch.Tensor:
    tile = tile.convert("RGB") if tile.mode != "RGB" else tile
    tile = tile.resize((size, size), Image.Resampling.BICUBIC)  # T.Resize((size, size), BICUBIC)
    t = torch.from_numpy(np.array(tile, np.uint8, copy=True)).permute(2, 0, 1).contiguous()  # T.ToTensor
    t = t.to(torch.float32).div(255)
    return (t - MEAN[:, None, None]) / STD[:, None, None]  # T.Normalize


def reference_load_image(path_or_image: object, max_num: int = 12, size: int = 448) -> torch.Tensor:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)  # type: ignore[arg-type]
    image = image.convert("RGB")
    return torch.stack([to_normalised_tensor(t, size) for t in split_tiles(image, max_num=max_num, size=size)])
