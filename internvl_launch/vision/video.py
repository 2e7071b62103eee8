"""Video input: InternVL's frame sampling, decoded with PyAV.

Frames are chosen exactly as the model cards' `get_index` chooses them (the
frame range split into equal segments, one frame from the middle of each),
decoded in one forward pass over the file, and each becomes one 448 px tile
(the cards' `max_num=1`: a plain bicubic resize, no thumbnail). The prompt
names them `Frame1: <image>\\nFrame2: <image>\\n...` (see `internvl_launch.prompt`).

Limits - file size, frames in the file, frames sampled, frame dimensions - are
checked before the work they bound, and a file PyAV cannot read is a
`MediaError` that says so, not a traceback.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from internvl_launch.errors import MediaError
from internvl_launch.vision.tiling import CACHE, to_model_input

if TYPE_CHECKING:
    import torch

from internvl_launch.vision.limits import MAX_FRAME_PIXELS, MAX_FRAMES_IN_FILE, MAX_VIDEO_BYTES, MAX_VIDEO_FRAMES
from internvl_launch.vision.media import read_media


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames as tiles, with what the prompt and the caller need to know."""

    pixel_values: torch.Tensor  # (frames, 3, size, size)
    frame_indices: tuple[int, ...]
    fps: float
    total_frames: int

    @property
    def num_patches_list(self) -> list[int]:
        """Tiles per frame, as the original `chat()` takes them: one each."""
        return [1] * len(self.frame_indices)


def frame_indices(
    total_frames: int,
    fps: float,
    num_segments: int,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """The frames InternVL samples: `num_segments` equal segments of the frame
    range (all of it, or `bound` = (start, end) seconds), the middle of each.

    The arithmetic is the model cards' `get_index`, including its rounding
    (Python's round-half-even on the segment offsets) and its clamping of the
    end to the last frame.
    """
    if num_segments < 1:
        raise ValueError("num_segments must be at least 1")
    max_frame = total_frames - 1
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    # np.round and Python's round agree (both round half to even) on floats.
    return [int(start_idx + seg_size / 2 + float(np.round(seg_size * idx))) for idx in range(num_segments)]


def _read_source(video: str | os.PathLike[str] | bytes, max_bytes: int) -> bytes:
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    else:
        data = read_media(os.fspath(video), kind="video", max_bytes=max_bytes)
    if len(data) > max_bytes:
        raise MediaError(
            f"Video is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit.",
            hint="Trim the video, or raise the limit.",
        )
    if not data:
        raise MediaError("Video is empty (0 bytes).")
    return data


def load_video(
    video: str | os.PathLike[str] | bytes,
    *,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
    image_size: int = 448,
    dtype: torch.dtype | None = None,
    max_bytes: int = MAX_VIDEO_BYTES,
    max_frames: int = MAX_VIDEO_FRAMES,
    max_frames_in_file: int = MAX_FRAMES_IN_FILE,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    cache: bool = True,
) -> VideoFrames:
    """Sample `num_segments` frames of a video (path or encoded bytes) as tiles.

    Raises `MediaError` for a file that is missing, too large, not a video,
    corrupt, or longer than `max_frames_in_file`, and for `num_segments` over
    `max_frames`.
    """
    import av
    import torch

    if not 1 <= num_segments <= max_frames:
        raise MediaError(
            f"Asked for {num_segments} video frames; between 1 and {max_frames} are allowed.",
            hint="Use fewer frames (each frame costs 256 prompt tokens).",
        )
    if bound is not None:
        start, end = bound
        if not (0 <= start < end):
            raise MediaError(f"Video bound must be 0 <= start < end seconds, got {start}, {end}.")
    data = _read_source(video, max_bytes)
    dtype = dtype or torch.float32
    key = None
    if cache:
        h = hashlib.sha256(repr(("video", num_segments, bound, image_size, str(dtype))).encode())
        h.update(data)
        key = h.digest()
        hit = CACHE.get(key)
        if hit is not None:
            return hit

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.format.name.endswith("_pipe") or container.format.name == "image2":
                raise MediaError("The file is a still image, not a video.", hint="Send it as an image instead.")
            if not container.streams.video:
                raise MediaError("The file has no video stream.", hint="Pass a video file (mp4, mkv, webm, avi, mov).")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise MediaError("The video declares no frame rate; its frames cannot be placed in time.")
            fps = float(rate)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_frame_pixels:
                raise MediaError(
                    f"Video frames are {width}x{height}, over the {max_frame_pixels} pixel limit per frame."
                )
            total = _count_frames(container, stream, max_frames_in_file)
            container.seek(0, stream=stream)
            wanted = frame_indices(total, fps, num_segments, bound)
            frames = _decode_frames(container, stream, set(wanted))
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError) as exc:
        raise MediaError(
            f"Cannot decode the video: {type(exc).__name__}.", hint="Check that the file is a complete, valid video."
        ) from None

    missing = [i for i in wanted if i not in frames]
    if missing:
        raise MediaError(
            f"The video ended before frame {missing[0]} (it declared {total} frames); the file is truncated or corrupt."
        )
    out32 = torch.empty((len(wanted), 3, image_size, image_size), dtype=torch.float32)
    for slot, index in enumerate(wanted):
        img = frames[index]
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        to_model_input(out32[slot], np.asarray(img))
    pixel_values = out32 if dtype == torch.float32 else out32.to(dtype)
    result = VideoFrames(pixel_values, tuple(wanted), fps, total)
    if key is not None:
        CACHE.put(key, result)
    return result


def _count_frames(container, stream, limit: int) -> int:  # type: ignore[no-untyped-def]
    declared = stream.frames
    if declared and declared > limit:
        raise MediaError(f"The video has {declared} frames, over the {limit} frame limit.")
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if count > limit:
                raise MediaError(f"The video has more than {limit} frames, over the limit.")
    if count == 0:
        raise MediaError("The video has no frames.")
    return count


def _decode_frames(container, stream, wanted: set[int]) -> dict[int, Image.Image]:  # type: ignore[no-untyped-def]
    frames: dict[int, Image.Image] = {}
    last = max(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = Image.fromarray(frame.to_ndarray(format="rgb24"))
        if index >= last:
            break
    return frames
