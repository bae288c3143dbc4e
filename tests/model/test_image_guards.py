"""Image decoding guards: decompression bombs by pixel count and by aspect ratio (the padded square), high bit
depths rescaled to 8 bits, EXIF orientation only when the model's config asks for it."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
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


def _saved(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


def test_only_the_web_formats_are_decoded_and_others_are_refused_by_name():
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_image(_saved(fmt)).size == (24, 16)
    for fmt in ("EPS", "ICO"):  # EPS would go to Ghostscript where it is installed
        with pytest.raises(SampleError) as err:
            decode_image(_saved(fmt))
        assert err.value.reason.startswith(f"decode: image format {fmt} is not accepted")


_PEAK_PROBE = """
import gc, sys
from model.processing import decode_image
def peak_kib():  # VmHWM: this process's own peak (getrusage's ru_maxrss is inherited from the parent)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from here
    before = peak_kib()
    img = decode_image(data)
    print(img.size[0] * img.size[1], peak_kib() - before)
    del img, data
"""


def _deep_images(directory, side: int) -> list[str]:
    yy, xx = np.mgrid[0:side, 0:side]
    grey16 = Image.frombytes("I;16", (side, side), ((xx * 7 + yy * 3) % 65536).astype("<u2").tobytes())
    grey16.save(directory / "g16.png", "PNG", compress_level=1)
    floats = Image.frombytes("F", (side, side), (((xx + yy) % 1000) / 1000).astype(np.float32).tobytes())
    floats.save(directory / "f32.tif", "TIFF")
    return [str(directory / "g16.png"), str(directory / "f32.tif")]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the peak RSS from /proc (Linux)")
def test_high_bit_depth_decoding_costs_memory_in_proportion(tmp_path):
    """A 4000 x 4000 16-bit PNG and float TIFF each decode within 3x the memory of their 8-bit RGB result (float64
    copies of the whole image took about 9x)."""
    side = 4000
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, *_deep_images(tmp_path, side)], capture_output=True,
                         text=True, check=True, cwd=root)
    for line in out.stdout.split("\n")[:2]:
        pixels, peak_kib = map(int, line.split())
        assert pixels == side * side
        assert peak_kib * 1024 < 3 * (3 * pixels)  # 3x the 8-bit RGB image
