"""Exactness of the tiling against an independent reference of the model card's
`load_image` (tests/reference_preprocessing.py), over generated images of many
sizes, modes and formats, plus properties of the grid choice."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from reference_preprocessing import closest_grid, reference_load_image, split_tiles

from internvl_launch.errors import MediaError
from internvl_launch.vision.tiling import CACHE, assemble_bands, num_tiles, preprocess_image, tile_grid

SIZES = [
    (1, 1),
    (1, 50),
    (50, 1),
    (448, 448),
    (449, 447),
    (800, 600),
    (600, 800),
    (1000, 20),
    (20, 1000),
    (896, 448),
    (1344, 448),
    (333, 777),
    (1280, 720),
    (2000, 1500),
]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # smooth structure plus noise, so that lossy codecs keep some detail
    _, xx = np.mgrid[0:height, 0:width]
    base[..., 0] = ((xx * 255) // max(width - 1, 1)).astype(np.uint8) ^ base[..., 0] // 8
    return Image.fromarray(base)


def encode(img: Image.Image, fmt: str, mode: str) -> bytes:
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(img.convert("L")).astype("<u2") * 257)
        assert converted.mode == "I;16"
    else:
        converted = img.convert(mode)
    buf = io.BytesIO()
    converted.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_bit_identical_to_the_reference_for_rgb(width: int, height: int) -> None:
    img = noise(width, height)
    ours = preprocess_image(img, cache=False)
    ref = reference_load_image(img)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref)
    assert ours.shape[0] == num_tiles(width, height)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2500), st.integers(1, 2500), st.sampled_from([1, 6, 12]))
def test_banded_two_pass_resize_is_pillows_resize(width: int, height: int, max_tiles: int) -> None:
    # Both pass orders of Pillow occur here (height shrinking more than twice as
    # fast as width flips it), with one-tile and many-tile grids, and the grid
    # and the thumbnail resized together from shared source bands.
    img = noise(width, height)
    cols, rows = tile_grid(width, height, max_tiles=max_tiles)
    sizes = [(cols * 448, rows * 448), (448, 448)]
    for got, size in zip(assemble_bands(img, sizes, 448), sizes, strict=True):
        assert np.array_equal(got, np.asarray(img.resize(size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize(
    ("source", "sizes"),
    [
        ((448, 448), [(448, 448)]),  # no pass at all
        ((448, 300), [(448, 896), (448, 448)]),  # the vertical pass only
        ((300, 448), [(896, 448), (448, 448)]),  # the horizontal pass only
        ((1000, 3000), [(448, 1344), (448, 448)]),  # vertical first for both
        ((3000, 1000), [(1344, 448), (448, 448)]),
    ],
)
def test_banded_resize_with_skipped_passes(source: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
    img = noise(*source)
    for got, size in zip(assemble_bands(img, sizes, 448), sizes, strict=True):
        assert np.array_equal(got, np.asarray(img.resize(size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize(("width", "height"), [(800, 600), (526, 2439), (1000, 20), (448, 448)])
def test_single_threaded_path_is_identical(width: int, height: int) -> None:
    img = noise(width, height)
    assert torch.equal(preprocess_image(img, cache=False, parallel=False), reference_load_image(img))


FORMAT_MODES = [
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "LA"),
    ("PNG", "L"),
    ("PNG", "P"),
    ("PNG", "I;16"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("GIF", "P"),
    ("GIF", "L"),
]


@pytest.mark.parametrize(("fmt", "mode"), FORMAT_MODES, ids=[f"{f}-{m}" for f, m in FORMAT_MODES])
@pytest.mark.parametrize(("width", "height"), [(640, 480), (37, 301), (900, 900)])
def test_bit_identical_for_encoded_files(tmp_path: Path, fmt: str, mode: str, width: int, height: int) -> None:
    data = encode(noise(width, height, seed=3), fmt, mode)
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    ref = reference_load_image(path)
    assert torch.equal(preprocess_image(data, cache=False), ref)
    assert torch.equal(preprocess_image(path, cache=False), ref)


@pytest.mark.parametrize("max_tiles", [1, 2, 6, 12, 24])
def test_tile_limit_is_honoured(max_tiles: int) -> None:
    img = noise(1500, 500)
    ours = preprocess_image(img, max_tiles=max_tiles, cache=False)
    assert torch.equal(ours, reference_load_image(img, max_num=max_tiles))
    assert ours.shape[0] <= max_tiles + 1


def test_other_dtypes_are_the_float32_values_cast_once() -> None:
    img = noise(700, 500)
    ref = reference_load_image(img)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(preprocess_image(img, dtype=dtype, cache=False), ref.to(dtype))


def test_cache_returns_the_same_tensor_for_the_same_bytes() -> None:
    CACHE.clear()
    data = encode(noise(800, 600), "PNG", "RGB")
    first = preprocess_image(data)
    assert preprocess_image(bytes(data)) is first
    assert preprocess_image(data, max_tiles=6) is not first  # settings are part of the key
    assert preprocess_image(data, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("hasher", ["blake3", "sha256"])
def test_cache_keys_are_content_hashes_with_either_hasher(hasher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from internvl_launch.vision import tiling

    assert tiling._blake3 is not None  # a declared dependency: the fast path is the one that runs
    if hasher == "sha256":
        monkeypatch.setattr(tiling, "_blake3", None)
    big = encode(noise(1400, 1000), "PNG", "RGB")  # over 1 MiB: the SHA-256 path hashes it as a two-leaf tree
    assert len(big) > tiling._SPLIT_HASH_BYTES
    key = tiling._content_key(big, (12,))
    assert key == tiling._content_key(bytes(big), (12,)) and len(key) == 32
    assert key != tiling._content_key(big, (6,))
    changed = bytearray(big)
    changed[len(changed) // 3] ^= 1
    assert key != tiling._content_key(bytes(changed), (12,))
    CACHE.clear()
    first = preprocess_image(big)
    assert preprocess_image(bytes(big)) is first


def test_truncated_image_is_refused() -> None:
    data = encode(noise(300, 300), "PNG", "RGB")
    with pytest.raises(MediaError, match="truncated or corrupt") as err:
        preprocess_image(data[: len(data) // 2], cache=False)
    assert "0x" not in str(err.value) and "BytesIO" not in str(err.value)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(1, 4), st.integers(1, 40))
def test_grid_choice_matches_the_reference_rule(width: int, height: int, min_tiles: int, extra: int) -> None:
    max_tiles = min_tiles + extra - 1
    grids = sorted(
        set(
            (i, j)
            for n in range(min_tiles, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles
        ),
        key=lambda g: g[0] * g[1],
    )
    cols, rows = tile_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
    assert (cols, rows) == closest_grid(width / height, grids, width, height, 448)
    assert min_tiles <= cols * rows <= max_tiles


def test_tie_rule_prefers_the_larger_grid_only_for_large_images() -> None:
    # A square image ties (1,1), (2,2), (3,3): the larger grid wins only when the
    # image has more than half its pixels.
    assert tile_grid(448, 448) == (1, 1)
    assert tile_grid(634, 634) == (2, 2)  # 634^2 > 0.5 * 448^2 * 4
    assert tile_grid(633, 633) == (1, 1)
    assert tile_grid(1000, 1000) == (3, 3)
    assert len(split_tiles(noise(1000, 1000))) == num_tiles(1000, 1000) == 10


def test_public_api_is_lazy() -> None:
    import subprocess

    code = "import sys, internvl_launch; assert not {'torch', 'PIL', 'numpy'} & set(sys.modules); f = internvl_launch.preprocess_image; assert 'PIL' in sys.modules; print(f.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "preprocess_image"


def test_plain_resizes_where_bands_would_not_match_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Pillow whose resize the bands do not reproduce gets one plain resize per target.
    from internvl_launch.vision import tiling

    monkeypatch.setattr(tiling, "_split_is_exact", lambda: False)
    for width, height in [(800, 600), (20, 1000), (448, 448)]:
        img = noise(width, height)
        assert torch.equal(preprocess_image(img, cache=False), reference_load_image(img))


def test_concurrent_callers_share_the_pool_and_get_their_own_tiles() -> None:
    # The server tiles several requests' images at once; every band job of
    # every caller goes through the same two pool threads.
    from concurrent.futures import ThreadPoolExecutor

    images = [noise(w, h, seed=i) for i, (w, h) in enumerate([(800, 600), (1000, 20), (333, 777), (1280, 720)] * 2)]
    with ThreadPoolExecutor(max_workers=4) as callers:
        results = list(callers.map(lambda img: preprocess_image(img, cache=False), images))
    for img, got in zip(images, results, strict=True):
        assert torch.equal(got, reference_load_image(img))
