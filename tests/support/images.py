"""Images for tests: plain ones (`jpeg_bytes`), and a decompression bomb's header."""

from __future__ import annotations

import io
import struct
import zlib


def jpeg_bytes(color="red", size=(120, 80), fmt="JPEG") -> bytes:
    """An encoded image of one colour (JPEG unless `fmt` names another format PIL writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()

def huge_png_header(width=20000, height=20000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb), made without allocating it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)
