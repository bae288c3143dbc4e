"""The processor: image decoding guards, pad-to-square, the text layout, limits and truncation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import model
from model.config import IMAGE_TOKEN_ID
from model.processing import PAD_COLOR, SampleError, decode_image, prepare_image
from tests.conftest import jpeg_bytes
from tests.support.images import huge_png_header


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return model.load(tiny_checkpoint)[1]


@pytest.mark.parametrize("payload, reason", [
    (b"", "decode: empty image payload"),
    (b"<html>not an image</html>", "decode: not a recognised image format"),
    (jpeg_bytes()[:200], "decode: corrupt image"),
    (huge_png_header(), "decode: image too large"),
], ids=["zero-bytes", "not-an-image", "truncated-jpeg", "20000x20000-png"])
def test_bad_image_payloads_raise_sample_errors(payload, reason):
    with pytest.raises(SampleError) as err:
        decode_image(payload)
    assert err.value.reason.startswith(reason)


def test_pad_to_square_centres_with_grey():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    out = prepare_image(img, 50)
    assert out.shape == (3, 50, 50) and out.dtype == np.uint8
    assert tuple(out[:, 2, 25]) == PAD_COLOR  # top band is padding
    assert tuple(out[:, 47, 25]) == PAD_COLOR  # bottom band is padding
    assert tuple(out[:, 25, 25]) == (255, 0, 0)


def _tokens(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def test_caption_layout_is_bos_image_newline_caption_eos(processor):
    cfg = processor.config
    enc = processor.encode([None, "a red circle"], [jpeg_bytes(), None], "caption")
    expected = [cfg.bos_token_id, *[IMAGE_TOKEN_ID] * cfg.tokens_per_image, *_tokens(processor, "\na red circle"),
                cfg.eos_token_id]
    assert enc.input_ids.tolist() == expected
    assert enc.n_images == 1 and not enc.truncated


def test_interleaved_layout_joins_segments_and_tokenises_pieces_separately(processor):
    cfg = processor.config
    img = jpeg_bytes()
    enc = processor.encode(["first", None, "second", "third", None], [None, img, None, None, img], "interleaved")
    slot = [IMAGE_TOKEN_ID] * cfg.tokens_per_image
    expected = [cfg.bos_token_id, *_tokens(processor, "first\n\n"), *slot,
                *_tokens(processor, "\n\nsecond\n\nthird\n\n"), *slot, cfg.eos_token_id]
    assert enc.input_ids.tolist() == expected
    assert enc.n_images == 2


def test_literal_image_marker_in_text_creates_no_slot(processor):
    enc = processor.encode([None, "look: <image> here <image>"], [jpeg_bytes(), None], "caption")
    assert (enc.input_ids == IMAGE_TOKEN_ID).sum() == processor.config.tokens_per_image
    assert enc.n_images == 1


def test_long_text_is_cut_before_the_eos(processor):
    cfg = processor.config
    enc = processor.encode([None, "word " * 5000], [jpeg_bytes(), None], "caption")
    assert enc.truncated
    assert enc.n_tokens == cfg.max_tokens
    assert enc.input_ids[-1] == cfg.eos_token_id
    assert enc.input_ids[0] == cfg.bos_token_id


def test_too_many_images_are_cut_to_the_limit(processor):
    cfg = processor.config
    n = cfg.max_images + 5
    texts = [t for i in range(n) for t in (f"part {i}", None)]
    images = [m for _ in range(n) for m in (None, jpeg_bytes("blue", (20, 20)))]
    enc = processor.encode(texts, images, "interleaved")
    assert enc.truncated
    assert enc.n_images == cfg.max_images
    assert (enc.input_ids == IMAGE_TOKEN_ID).sum() == cfg.max_images * cfg.tokens_per_image
    assert enc.input_ids[-1] == cfg.eos_token_id


@pytest.mark.parametrize("texts, images, kind, reason", [
    (["a", "b"], [None], "interleaved", "malformed: 2 text positions but 1 image positions"),
    ([None, None], [b"x", None], "interleaved", "malformed: position 1 holds neither"),
    (["a", None], [b"x", None], "interleaved", "malformed: position 0 holds both"),
    ([None, None, "two images"], [b"x", b"y", None], "caption", "malformed: a caption sample needs exactly 1 image"),
    ([None, "   "], [b"x", None], "caption", "empty: caption has no text"),
    (["only text", "more"], [None, None], "interleaved", "empty: interleaved document has no images"),
    ([None, None], [b"x", b"y"], "interleaved", "empty: interleaved document has no text"),
    ([None, "x"], [b"x", None], "video", "malformed: unknown sample kind"),
])
def test_malformed_samples_raise_with_a_reason(processor, texts, images, kind, reason):
    with pytest.raises(SampleError) as err:
        processor.encode(texts, images, kind)
    assert err.value.reason.startswith(reason)


def test_collate_right_pads_with_the_pad_token(processor):
    a = processor.encode([None, "short"], [jpeg_bytes(), None], "caption")
    b = processor.encode([None, "a much longer caption " * 5], [jpeg_bytes(), None], "caption")
    batch = processor.collate([a, b])
    assert batch["input_ids"].shape == (2, b.n_tokens)
    assert batch["attention_mask"][0].sum() == a.n_tokens
    assert (batch["input_ids"][0, a.n_tokens:] == processor.config.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == 2


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(SampleError, match="decode: image too large: 120x80 pixels exceeds the limit of 1000"):
        decode_image(jpeg_bytes(size=(120, 80)), max_pixels=1000)


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale_with_nearly_equal_output():
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1600, 0:1200] / 1600
    pixels = (127 + 100 * np.stack([np.sin(9 * xx), np.cos(7 * yy), xx * yy], -1)
              + rng.normal(0, 8, (1600, 1200, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    exact = decode_image(buf.getvalue())
    drafted = decode_image(buf.getvalue(), draft_size=384)
    assert exact.size == (1200, 1600)
    assert max(drafted.size) < 1600 and max(drafted.size) >= 384  # DCT-scaled, never below the target
    a, b = prepare_image(exact, 384).astype(int), prepare_image(drafted, 384).astype(int)
    assert np.abs(a - b).mean() < 1.5


def test_a_document_whose_images_are_all_cut_is_an_error_not_text_only(processor):
    cfg = processor.config
    long_text = "word " * (2 * cfg.max_tokens)
    with pytest.raises(SampleError) as err:
        processor.encode([long_text, None, "after"], [None, jpeg_bytes(), None], "interleaved")
    assert err.value.reason.startswith("empty: every image of the document was cut by the token limit")
    assert f"max_tokens {cfg.max_tokens}" in err.value.reason
    enc = processor.encode(["short", None, long_text], [None, jpeg_bytes(), None], "interleaved")
    assert enc.truncated and enc.n_images == 1  # an image kept, the text after it cut: scored as before
