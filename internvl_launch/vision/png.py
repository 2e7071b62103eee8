"""PNG pixel data inflated by ISA-L, unfiltered by Pillow.

A PNG's pixels are one zlib stream over the filtered rows, which Pillow
inflates with zlib, unfiltering each row as it arrives. Inflating takes most
of a PNG's decode time, and ISA-L (the `isal` package) inflates about twice
as fast as zlib. `inflate_with_isal` hands Pillow's decoder the same stream
already inflated, re-wrapped as stored (uncompressed) deflate blocks, which
zlib merely copies: Pillow still unfilters and unpacks every row itself. The
inflated bytes are fixed by the deflate format, so the pixels are Pillow's
own, for every mode, bit depth and interlacing. Without `isal` installed,
Pillow inflates as usual.

The stream is checked as zlib checks it (its Adler-32 checksum included);
Pillow reports a missing end as a truncated file, as before. Inflated data
is produced a bounded block at a time, as Pillow asks for it, so a stream
that inflates to far more than the image needs is never inflated whole.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from PIL import Image

try:
    from isal import isal_zlib
except ImportError:  # optional: Pillow inflates with zlib instead
    isal_zlib = None

# At most this many inflated bytes are handed to Pillow per read: small
# enough that rows keep arriving steadily (rows.RowDecoder reports them
# between reads), large enough that the reads cost nothing.
_BLOCK_OUT = 256 * 1024
_STORED_MAX = 65535  # the largest stored deflate block
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32K window, no preset dictionary
_LAST_EMPTY_BLOCK = b"\x01\x00\x00\xff\xff"


def inflate_with_isal(img: Image.Image) -> bool:
    """Make Pillow decode an opened (not loaded) PNG from data inflated by
    ISA-L. Returns False, changing nothing, where isal is not installed or
    the image is not a single-frame PNG."""
    if isal_zlib is None or img.format != "PNG" or getattr(img, "is_animated", False) or not hasattr(img, "load_read"):
        return False
    img.load_read = _Restored(img.load_read).read  # type: ignore[method-assign]
    return True


class _Restored:
    """The zlib stream that `read` yields, inflated by ISA-L and re-wrapped as
    stored blocks: a valid zlib stream of the same inflated bytes."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._inflate = isal_zlib.decompressobj()
        self._adler = 1  # Adler-32 of the empty string
        self._head = _ZLIB_HEADER
        self._ended = False

    def read(self, size: int) -> bytes:
        if self._ended:
            return b""
        inflate = self._inflate
        raw = inflate.decompress(inflate.unconsumed_tail, _BLOCK_OUT)
        while not raw and not inflate.eof:
            packed = self._read(size)
            if not packed:  # the file ends early: Pillow reports it truncated
                break
            raw = inflate.decompress(packed, _BLOCK_OUT)
        parts = [self._head]
        self._head = b""
        if raw:
            self._adler = isal_zlib.adler32(raw, self._adler)
            view = memoryview(raw)
            for start in range(0, len(raw), _STORED_MAX):
                block = view[start : start + _STORED_MAX]
                parts.append(struct.pack("<BHH", 0, len(block), 0xFFFF ^ len(block)))
                parts.append(block)
        if inflate.eof:
            parts.append(_LAST_EMPTY_BLOCK + struct.pack(">I", self._adler))
            self._ended = True
        return b"".join(parts)
