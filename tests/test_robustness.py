"""Bad inputs through a real server, one test per item of the robustness
list that the fetcher and server tests do not already cover: decompression
bombs, odd shapes and modes, refused formats, video limits, chunked bodies
over the limit, client-set costs, CORS."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import Server, data_url, running_server

MODEL = "internvl-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("robust")
    with running_server(tmp, tmp / "cache", "--allowed-origin", "https://app.example") as s:
        yield s


def chat(server: Server, content: list | str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
    return httpx.post(server.url + "/chat/completions", json=body, timeout=120)


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions with almost no data: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_400(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    for leak in ("Traceback", "0x7f", "/site-packages/", "PIL."):
        assert leak not in message


# 11: decompression bombs


def test_a_huge_png_header_is_refused_before_decoding(server: Server) -> None:
    assert_400(chat(server, [image_part(png_header_only(100_000, 100_000)), {"type": "text", "text": "x"}]), "pixel")


def test_a_many_frame_gif_costs_one_frame(server: Server) -> None:
    frames = [Image.new("P", (64, 64), i % 256) for i in range(2000)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    r = chat(server, [image_part(gif, "image/gif"), {"type": "text", "text": "x"}])
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 2 * 256 + 100


def test_max_image_pixels_is_never_lifted() -> None:
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    found = subprocess.run(
        ["grep", "-rn", "MAX_IMAGE_PIXELS *=", str(root / "internvl_launch")], capture_output=True, text=True
    )
    assert found.stdout == ""
    code = "import internvl_launch.vision.tiling, internvl_launch.server.app; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 0


# 12: odd shapes and modes


@pytest.mark.parametrize(
    ("size", "mode", "fmt"),
    [((1, 1), "RGB", "PNG"), ((1, 20000), "RGB", "PNG"), ((20000, 1), "L", "PNG"), ((300, 200), "CMYK", "JPEG"),
     ((300, 200), "I;16", "PNG"), ((300, 200), "P", "PNG"), ((300, 200), "RGBA", "PNG"), ((300, 200), "LA", "PNG"),
     ((300, 200), "1", "BMP"), ((300, 200), "RGB", "WEBP"), ((300, 200), "RGB", "TIFF")],
)  # fmt: skip
def test_odd_shapes_and_modes_are_answered(server: Server, size: tuple[int, int], mode: str, fmt: str) -> None:
    img = Image.new(mode, size)
    r = chat(server, [image_part(encode(img, fmt), f"image/{fmt.lower()}"), {"type": "text", "text": "x"}])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= 13 * 258 + 100  # never more than 12 tiles + thumbnail


# 13: formats outside the list


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_outside_the_list_are_refused(server: Server, fmt: str) -> None:
    data = encode(Image.new("RGB", (32, 32)), fmt)
    assert_400(chat(server, [image_part(data, "image/x-anything"), {"type": "text", "text": "x"}]), "accepted formats")


# 14: video limits


def test_video_frame_caps_and_corrupt_video(server: Server) -> None:
    from test_video import encode_video

    rng = np.random.default_rng(1)
    video = encode_video([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)])
    part = {"type": "video_url", "video_url": {"url": data_url(video, "video/x-matroska")}}
    assert_400(chat(server, [part, {"type": "text", "text": "x"}], num_frames=65), "num_frames")
    assert chat(server, [part, {"type": "text", "text": "x"}], num_frames=16).status_code == 200
    too_long = chat(server, [part, {"type": "text", "text": "x"}], num_frames=64)  # 64 x 258 tokens > 8192
    assert_400(too_long, "8192")
    mp4 = encode_video(
        [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)], codec="libx264", fmt="mp4"
    )
    broken = {
        "type": "video_url",
        "video_url": {"url": data_url(mp4[: len(mp4) // 3], "video/mp4")},
    }  # cut before its index
    r = chat(server, [broken, {"type": "text", "text": "x"}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_media"
    junk = {"type": "video_url", "video_url": {"url": data_url(b"\x00" * 4096, "video/mp4")}}
    assert chat(server, [junk, {"type": "text", "text": "x"}]).status_code == 400


# 16: a chunked body over the limit


def test_chunked_body_over_the_limit_is_413(server: Server) -> None:
    def endless() -> Iterator[bytes]:
        yield b'{"model": "internvl-tiny", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 2**20

    r = httpx.post(
        server.url + "/chat/completions", content=endless(), headers={"content-type": "application/json"}, timeout=120
    )
    assert r.status_code == 413
    assert httpx.get(server.base + "/health").status_code == 200


# 18: client-set costs


def test_client_set_costs_are_clamped_or_refused(server: Server) -> None:
    assert_400(chat(server, "x", min_tokens=10, max_tokens=5), "min_tokens")
    assert_400(chat(server, "x", n=3), "n > 1")
    r = chat(
        server, [image_part(encode(Image.new("RGB", (2000, 500)), "PNG")), {"type": "text", "text": "x"}], max_tiles=256
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 13 * 258 + 100


@pytest.mark.parametrize(
    "settings",
    [
        {"repetition_penalty": 5e-324, "temperature": 1.0},  # found by fuzzing: it stopped the engine
        {"repetition_penalty": 5e-324, "temperature": 0.5},
        {"temperature": 1e-300},
        {"temperature": 2.0, "top_p": 1e-300, "repetition_penalty": 10},
    ],
)
def test_extreme_sampling_settings_are_answered_and_the_server_stays_up(server: Server, settings: dict) -> None:
    r = chat(server, "x", **settings)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


# 21: CORS closed unless asked


def test_cors_only_for_allowed_origins(server: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(server.url + "/chat/completions", headers={"Origin": "https://app.example", **preflight})
    assert ok.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(server.url + "/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(server.url + "/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in plain.headers
