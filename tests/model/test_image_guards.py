"""Image decoding guards: decompression bombs by pixel count, by aspect ratio (the padded square) and by JPEG scans,
high bit depths rescaled to 8 bits, EXIF orientation only when the model's config asks for it."""

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
from model.processing import JPEG_MAX_SCANS, decode_image, jpeg_scan_limit, jpeg_scans, prepare_image
from tests.support.hostile import scan_bomb_jpeg


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


# -- progressive JPEG scans (a scan bomb decodes for a time linear in its scans, and is then a valid image) -------
def _progressive(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True)
    return buf.getvalue()


def test_a_jpeg_with_more_scans_than_any_encoder_writes_is_refused_before_decoding():
    bomb = scan_bomb_jpeg(256, scans=JPEG_MAX_SCANS)  # 10 scans of its own, then 500 copies of the last
    with pytest.raises(SampleError) as err:
        decode_image(bomb)
    assert err.value.reason == (f"decode: JPEG has more than {JPEG_MAX_SCANS} scans at 256x256 (a scan bomb: "
                                "decoding time grows with scans times pixels)")


def test_the_scans_a_jpeg_may_have_shrink_as_its_pixels_grow():
    """As many scans as `JPEG_SCAN_PIXELS_FACTOR` at the pixel limit: the same decoding work at any size."""
    side, max_pixels = 200, 100_000  # 40,000 pixels: 32 x 100,000 / 40,000 = 80 scans allowed
    assert jpeg_scan_limit(side, side, max_pixels) == 80
    assert decode_image(scan_bomb_jpeg(side, scans=60), max_pixels=max_pixels).size == (side, side)  # 70 scans
    with pytest.raises(SampleError, match="JPEG has more than 80 scans at 200x200"):
        decode_image(scan_bomb_jpeg(side, scans=80), max_pixels=max_pixels)  # 90 scans


def test_ordinary_progressive_jpegs_decode_at_the_pixel_limit():
    """Libjpeg's own progressions (10 scans in colour, 18 in CMYK) stay within the limit at the largest size."""
    rgb = Image.new("RGB", (160, 120), (30, 140, 200))
    for img, scans in ((rgb, 10), (rgb.convert("L"), 6), (rgb.convert("CMYK"), 18)):
        data = _progressive(img)
        assert jpeg_scans(data, stop_after=100) == scans
        assert decode_image(data, max_pixels=160 * 160).size == (160, 120)


def test_scans_inside_metadata_segments_are_not_the_jpegs_own():
    """A marker segment (here a comment; an EXIF thumbnail alike) holding start-of-scan bytes is skipped whole."""
    data = _progressive(Image.new("RGB", (64, 48), (200, 100, 0)))
    comment = b"\xff\xda" * 1000
    with_comment = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
    assert jpeg_scans(with_comment, stop_after=JPEG_MAX_SCANS) == 10
    assert decode_image(with_comment).size == (64, 48)
