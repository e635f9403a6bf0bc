"""Image files that pass a header check but cannot be used, plus a 16-bit grayscale PNG, written in milliseconds."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A 16 x 64 gradient over the whole 16-bit range, 0 to 65535 in 1,023 steps of about 64 (row-major).
GRADIENT_16BIT = np.linspace(0, 65535, 16 * 64).round().astype(np.uint16).reshape(16, 64)


def noise_image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header reads (verify() passes), its pixels do not."""
    noise_image().save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def write_broken_pixels_png(path: Path) -> Path:
    """A PNG whose compressed pixel data is garbled but whose checksums are valid, so verify() passes."""
    noise_image().save(path, format="PNG")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    data[start + 34:start + 54] = b"x" * 20
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 4 + length])))
    path.write_bytes(bytes(data))
    return path


def write_decompression_bomb(path: Path) -> Path:
    """A 10,000 x 10,000 1-bit PNG: 12 KB on disk, 100 M pixels (over PIL's 89.5 M limit) when decoded."""
    Image.new("1", (10_000, 10_000)).save(path, format="PNG")
    return path


def write_16bit_png(path: Path) -> Path:
    """GRADIENT_16BIT as a 16-bit grayscale PNG (PIL opens it in mode "I;16")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(GRADIENT_16BIT).save(path, format="PNG")
    return path
