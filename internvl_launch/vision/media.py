"""Reading media references: local paths and data URLs to bytes, with limits,
and an image's tile count from its header alone.

Every failure is a `MediaError` naming the reference and what to do; nothing
here prints a path it was not given or a library's internal message.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from internvl_launch.errors import MediaError
from internvl_launch.vision.limits import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    from PIL import Image as PILImage

#: Formats accepted for images; anything else Pillow might open is refused.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def describe(ref: str) -> str:
    """A short, safe name for a reference in messages (data URLs abbreviated)."""
    if ref.startswith("data:"):
        return ref[: ref.find(",") + 1 if "," in ref else 16][:48] + "..."
    return ref if len(ref) <= 120 else ref[:117] + "..."


def read_media(ref: str, *, kind: str, base_dir: Path | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image or video given as a local path or a data URL.

    Relative paths are taken relative to `base_dir` (the directory of the
    messages file) when given. Remote URLs are fetched by the server's media
    fetcher, not here.
    """
    if ref.startswith("data:"):
        return _data_url(ref, kind=kind, max_bytes=max_bytes)
    scheme = ref.split(":", 1)[0].lower() if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref) else ""
    if scheme in ("http", "https"):
        raise MediaError(
            f"{kind.capitalize()} {describe(ref)} is a remote URL; this command reads local files and data URLs only.",
            hint="Download it first, or send it to a running server (`internvl launch`).",
        )
    if scheme == "file":
        ref = ref[len("file://") :]
    elif scheme:
        raise MediaError(f"{kind.capitalize()} {describe(ref)}: the {scheme}:// scheme is not supported.")
    path = Path(ref).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise MediaError(f"{kind.capitalize()} {ref} is not a file.")
        if size > max_bytes:
            raise MediaError(
                f"{kind.capitalize()} {ref} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit."
            )
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"Cannot read {kind} {ref}: {exc.strerror or type(exc).__name__}.") from None


def _data_url(ref: str, *, kind: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(ref)
    if not m:
        raise MediaError(f"Malformed data URL for an {kind}: {describe(ref)}.", hint="Use data:<mime>;base64,<data>.")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith(f"{kind}/") and mime != "application/octet-stream":
        raise MediaError(f"A data URL of type {mime} was given where an {kind} was expected.")
    payload = ref[m.end() :]
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"The {kind} data URL is over the {max_bytes / 2**20:.0f} MiB limit.")
    if not m.group("b64"):
        raise MediaError(f"The {kind} data URL is not base64-encoded.", hint="Use data:<mime>;base64,<data>.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"The {kind} data URL holds invalid base64.") from None
    if not data:
        raise MediaError(f"The {kind} data URL is empty.")
    return data


def image_size(data: bytes, ref: str = "image") -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels.
    Refuses formats outside `IMAGE_FORMATS` and decompression bombs."""
    with opened_image(data, ref) as img:
        return img.size


def opened_image(data: bytes, ref: str = "image") -> PILImage.Image:
    """The image opened from its header, pixels not yet decoded, after the
    checks of `image_size`."""
    from PIL import Image

    img = None
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in IMAGE_FORMATS:
            raise MediaError(
                f"{describe(ref)} is a {img.format} image; accepted formats: {', '.join(sorted(IMAGE_FORMATS))}."
            )
        width, height = img.size
        if width * height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns between 1x and 2x the limit
            raise MediaError(f"{describe(ref)} is {width}x{height}, over the {Image.MAX_IMAGE_PIXELS} pixel limit.")
    except Image.DecompressionBombError:
        raise MediaError(f"{describe(ref)} has too many pixels to decode safely.") from None
    except MediaError:
        if img is not None:
            img.close()
        raise
    except Exception:  # Pillow raises many types for unreadable data; none of their text is shown
        raise MediaError(
            f"{describe(ref)} is not a readable image.",
            hint="Check that the file is a complete JPEG, PNG, WebP or GIF.",
        ) from None
    return img
