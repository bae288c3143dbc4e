"""Image decoding guards: decompression bombs by pixel count and by aspect ratio (the padded square), high bit
depths rescaled to 8 bits, EXIF orientation only when the model's config asks for it."""

from __future__ import annotations

import io
import resource
import time

import numpy as np
import pytest
from PIL import Image

from model.errors import SampleError
from model.processing import decode_image, prepare_image


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1, 20000), (200000, 1)], ids=["1x20000", "200000x1"])
def test_a_thin_strip_is_refused_before_it_is_padded(size):
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(SampleError, match="image too large: padding .* to a square gives"):
        decode_image(buf.getvalue())
    assert time.perf_counter() - started < 1.0  # refused from the header, not after allocating
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000  # KiB: bounded memory


def test_sixteen_bit_images_are_rescaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    out = np.asarray(decode_image(_png(gradient)))
    assert out.dtype == np.uint8 and out.shape == (16, 256, 3)
    expected = np.round(gradient / 257.0).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1  # a sensible 8-bit image, not almost white
    assert out[0, 128, 0] in (127, 128)


def test_float_images_in_0_to_1_are_scaled_to_8_bits():
    values = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, "TIFF")
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 120 <= out[0, 32, 0] <= 135


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_only_when_asked():
    data = _exif_rotated_jpeg()
    assert decode_image(data).size == (40, 20)  # the released preprocessing ignores EXIF: so does the default
    assert decode_image(data, exif_transpose=True).size == (20, 40)


def test_padding_still_centres_an_ordinary_image():
    out = prepare_image(decode_image(_png(np.full((10, 30), 200, dtype=np.uint8))), 30)
    assert out.shape == (3, 30, 30) and out[0, 15, 15] == 200 and out[0, 2, 15] == 127
