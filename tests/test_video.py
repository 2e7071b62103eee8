"""Video frame sampling and decoding: the frames chosen are the model cards'
`get_index` frames, each becomes exactly the one tile the cards' `load_video`
makes, and bad files and limits give `MediaError`s."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_launch.errors import MediaError
from internvl_launch.vision.video import frame_indices, load_video
from tests.reference_preprocessing import reference_load_image


def reference_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):  # type: ignore[no-untyped-def]
    """The seed's rule, as its text gives it: segment the range, take midpoints."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 20000),
    fps=st.sampled_from([1.0, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0]),
    segments=st.integers(1, 64),
    bound=st.one_of(
        st.none(),
        st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0.01, 200, allow_nan=False)).filter(
            lambda b: b[0] < b[1]
        ),
    ),
)
def test_frame_indices_match_the_seed_rule(total: int, fps: float, segments: int, bound) -> None:  # type: ignore[no-untyped-def]
    assert frame_indices(total, fps, segments, bound) == reference_get_index(bound, fps, total - 1, 0, segments)


def test_frame_indices_known_values() -> None:
    # 50 frames, 8 segments: seg 6.125 -> midpoints 3.06.. + round(6.125 * i)
    assert frame_indices(50, 25.0, 8) == [3, 9, 15, 21, 27, 34, 40, 46]
    assert frame_indices(100, 10.0, 4, bound=(2.0, 6.0)) == [25, 35, 45, 55]


def encode_video(frames: list[np.ndarray], *, codec: str = "ffv1", fmt: str = "matroska", fps: int = 25) -> bytes:
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"  # ffv1 + bgr0: lossless RGB
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def random_frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (90, 160, 3), dtype=np.uint8) for _ in range(40)]


def test_lossless_video_equals_reference_frames(random_frames: list[np.ndarray]) -> None:
    data = encode_video(random_frames)
    got = load_video(data, num_segments=6, cache=False)
    wanted = reference_get_index(None, 25.0, len(random_frames) - 1, 0, 6)
    assert list(got.frame_indices) == wanted
    assert got.total_frames == 40 and got.fps == 25.0 and got.num_patches_list == [1] * 6
    expected = torch.cat([reference_load_image(Image.fromarray(random_frames[i]), max_num=1) for i in wanted])
    assert got.pixel_values.shape == (6, 3, 448, 448)
    assert torch.equal(got.pixel_values, expected)


def test_bound_selects_a_time_window(random_frames: list[np.ndarray]) -> None:
    data = encode_video(random_frames, fps=10)
    got = load_video(data, num_segments=4, bound=(1.0, 3.0), cache=False)
    assert list(got.frame_indices) == reference_get_index((1.0, 3.0), 10.0, 39, 0, 4)
    assert all(10 <= i <= 30 for i in got.frame_indices)


@pytest.mark.parametrize(("codec", "fmt"), [("libx264", "mp4"), ("mpeg4", "mp4"), ("libvpx-vp9", "webm")])
def test_common_codecs_decode(codec: str, fmt: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    frames = [np.full((48, 64, 3), 6 * i, np.uint8) for i in range(30)]
    path = tmp_path / f"v.{fmt}"
    path.write_bytes(encode_video(frames, codec=codec, fmt=fmt))
    got = load_video(path, num_segments=8, dtype=torch.bfloat16, cache=False)
    assert got.pixel_values.dtype == torch.bfloat16
    assert list(got.frame_indices) == reference_get_index(None, 25.0, 29, 0, 8)
    # Solid frames survive lossy coding closely: the sampled frame's grey level is recovered.
    means = got.pixel_values.float().mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])


def test_cache_returns_the_same_frames(random_frames: list[np.ndarray]) -> None:
    data = encode_video(random_frames[:10])
    first = load_video(data, num_segments=2)
    assert load_video(data, num_segments=2) is first
    assert load_video(data, num_segments=3) is not first


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x00" * 4096, "Cannot decode the video"),
        (b"not a video at all" * 50, "Cannot decode the video"),
    ],
)
def test_corrupt_input_is_a_media_error(data: bytes, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_video(data, cache=False)


def test_truncated_video(random_frames: list[np.ndarray]) -> None:
    # An mp4 cut before its index cannot be read at all.
    mp4 = encode_video(random_frames, codec="libx264", fmt="mp4")
    with pytest.raises(MediaError, match="Cannot decode the video"):
        load_video(mp4[: len(mp4) // 3], num_segments=8, cache=False)
    # A Matroska file cut short keeps its complete frames: sampling covers those only.
    mkv = encode_video(random_frames)
    got = load_video(mkv[: len(mkv) // 3], num_segments=8, cache=False)
    assert 0 < got.total_frames < len(random_frames)
    assert list(got.frame_indices) == reference_get_index(None, 25.0, got.total_frames - 1, 0, 8)


def test_an_image_is_not_a_video() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with pytest.raises(MediaError):
        load_video(buf.getvalue(), num_segments=1, cache=False)


def test_limits(random_frames: list[np.ndarray], tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = encode_video(random_frames)
    with pytest.raises(MediaError, match="between 1 and 64"):
        load_video(data, num_segments=65)
    with pytest.raises(MediaError, match="over the 0 MiB limit"):
        load_video(data, max_bytes=100)
    path = tmp_path / "v.mkv"
    path.write_bytes(data)
    with pytest.raises(MediaError, match="MiB limit"):
        load_video(path, max_bytes=100)
    with pytest.raises(MediaError, match=r"(over the 10 frame limit|more than 10 frames)"):
        load_video(data, max_frames_in_file=10, cache=False)
    with pytest.raises(MediaError, match="0 <= start < end"):
        load_video(data, bound=(3.0, 1.0))
    with pytest.raises(MediaError, match="Cannot read video"):
        load_video(tmp_path / "missing.mp4")


def test_frame_pixel_limit(random_frames: list[np.ndarray]) -> None:
    with pytest.raises(MediaError, match="160x90, over the 100 pixel limit"):
        load_video(encode_video(random_frames[:3]), num_segments=1, max_frame_pixels=100, cache=False)


def test_fps_is_the_average_rate() -> None:
    frames = [np.zeros((16, 16, 3), np.uint8)] * 12
    got = load_video(encode_video(frames, codec="libx264", fmt="mp4", fps=30), num_segments=2, cache=False)
    assert Fraction(got.fps).limit_denominator(1000) == 30
