"""The processor: image decoding guards, pad-to-square, the text layout, limits and truncation, and the bound on
what any text costs to tokenise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import model
from model.config import IMAGE_TOKEN_ID
from model.processing import PAD_COLOR, SampleError, decode_image, prepare_image
from tests.support.hostile import many_segment_document, unspaced_text
from tests.support.images import huge_png_header, jpeg_bytes


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


# -- the cost of text is bounded, and ordinary text keeps the tokens of the whole text ----------------------------
@pytest.fixture(scope="module")
def qwen_processor():
    """The real Qwen2.5 vocabulary at the released configs' limits (4096 tokens): no weights needed to plan."""
    from model.checkpoint import config_and_tokenizer
    from model.processing import UniFilterProcessor

    return UniFilterProcessor(*config_and_tokenizer("qwen2.5-0.5b"))


def _unbounded(monkeypatch, processor, texts, images, kind):
    """The plan with every text piece tokenised whole (no character bound): the tokens the bounded plan must keep."""
    from model import processing

    with monkeypatch.context() as patch:
        patch.setattr(processing, "CHARS_PER_TOKEN_BOUND", 10**12)
        return processor.plan(texts, images, kind)


def _ordinary_long_texts(n_chars: int) -> dict[str, str]:
    """Long texts of the kinds web corpora hold, `n_chars` each: prose, CJK prose, whitespace-heavy web text, ASCII
    tables (about 10 characters a Qwen2.5 token: past the first character bound) and URLs."""
    import random

    from jobs import sample_corpus as corpus

    rng = random.Random(0)
    n = n_chars // 40 + 1  # more than enough pieces of every kind
    prose = " ".join(f"{s.caption().capitalize()}, as the {rng.choice(['photo', 'drawing'])} shows."
                     for s in (corpus.random_scene(rng) for _ in range(n)))
    cjk = "".join(rng.choice(["今天的天气很好，", "我们在公园里散步。", "图片中有一只红色的猫，",
                              "它坐在蓝色的椅子上。", "这是一个关于颜色和形状的课程；"]) for _ in range(n))
    web = "".join(f"  Item {k}\n\n\t\t   {rng.choice(['Home', 'About us', 'Contact'])}   \n \n" for k in range(n))
    tables = "".join(f"| {k:6d} | {'-' * 60} | {'=' * 40} |\n" for k in range(n))
    urls = " ".join(f"https://example.com/a/{rng.getrandbits(64):x}/image_{k}.jpg?w=640&h=480" for k in range(n))
    return {name: text[:n_chars] for name, text in
            {"prose": prose, "cjk": cjk, "web": web, "tables": tables, "urls": urls}.items()}


@pytest.mark.parametrize("vocabulary", ["tiny", "qwen2.5"])
def test_the_bundled_corpus_keeps_the_tokens_of_the_whole_text(vocabulary, processor, qwen_processor, monkeypatch):
    """The one preprocessing path of training and scoring: bounding the text changes no id of an ordinary sample."""
    from jobs import sample_corpus as corpus

    proc = processor if vocabulary == "tiny" else qwen_processor
    for item in corpus.caption_samples(200, seed=3):
        sample = ([None, item["caption"]], [item["image"], None], "caption")
        assert proc.plan(*sample).input_ids.tolist() == _unbounded(monkeypatch, proc, *sample).input_ids.tolist()
    for doc in corpus.documents(100, seed=3):
        sample = (doc["texts"], doc["images"], "interleaved")
        assert proc.plan(*sample).input_ids.tolist() == _unbounded(monkeypatch, proc, *sample).input_ids.tolist()


@pytest.mark.parametrize("vocabulary", ["tiny", "qwen2.5"])
def test_long_ordinary_texts_keep_the_tokens_of_the_whole_text(vocabulary, processor, qwen_processor, monkeypatch):
    """Each text past the character bound (tiny: 8,192 characters; Qwen2.5: 32,768), as a caption and as a document's
    text after an image."""
    proc = processor if vocabulary == "tiny" else qwen_processor
    for name, text in _ordinary_long_texts(20_000 if vocabulary == "tiny" else 60_000).items():
        for sample in (([None, text], [jpeg_bytes(), None], "caption"),
                       ([text[:200], None, text], [None, jpeg_bytes(), None], "interleaved")):
            planned = proc.plan(*sample)
            expected = _unbounded(monkeypatch, proc, *sample)
            assert planned.input_ids.tolist() == expected.input_ids.tolist(), name
            assert planned.truncated and planned.n_tokens == proc.config.max_tokens


def _characters_tokenised(processor, monkeypatch) -> list[int]:
    """Records how many characters each call of the processor's tokenizer is given, in all."""
    seen: list[int] = []
    encode = processor._encode_texts

    def recording(texts, **kw):
        seen.append(sum(len(t) for t in texts))
        return encode(texts, **kw)

    monkeypatch.setattr(processor, "_encode_texts", recording)
    return seen


@pytest.mark.parametrize("script", ["latin", "cjk"])
def test_a_text_without_spaces_is_tokenised_only_up_to_a_character_bound(script, qwen_processor, monkeypatch):
    """A caption of one 500,000-character word (8 MB once took 2 GB and tens of seconds, all of it tokenised):
    cut to the token limit like any long caption, its tokenising bounded by the limit, not by the text."""
    from model.processing import CHARS_PER_TOKEN_BOUND, MAX_CHARS_PER_TOKEN

    proc = qwen_processor
    seen = _characters_tokenised(proc, monkeypatch)
    planned = proc.plan([None, unspaced_text(500_000, script)], [jpeg_bytes(), None], "caption")
    assert planned.truncated and planned.n_tokens == proc.config.max_tokens
    assert planned.input_ids[-1] == proc.config.eos_token_id
    assert sum(seen) <= (2 * CHARS_PER_TOKEN_BOUND + MAX_CHARS_PER_TOKEN) * proc.config.max_tokens


def test_a_document_of_many_long_pieces_is_tokenised_only_up_to_a_character_bound(processor, monkeypatch):
    """Pieces past what a sample can keep are never tokenised: 300 images each followed by a long text."""
    from model.processing import CHARS_PER_TOKEN_BOUND, MAX_CHARS_PER_TOKEN

    seen = _characters_tokenised(processor, monkeypatch)
    long_text = unspaced_text(30_000)
    planned = processor.plan([x for _ in range(300) for x in (None, long_text)],
                             [x for _ in range(300) for x in (jpeg_bytes(), None)], "interleaved")
    assert planned.truncated and planned.n_images == 1 and planned.n_tokens == processor.config.max_tokens
    assert sum(seen) <= (2 * CHARS_PER_TOKEN_BOUND + MAX_CHARS_PER_TOKEN) * processor.config.max_tokens


def test_a_document_of_many_segments_is_laid_out_as_one_piece(processor, monkeypatch):
    """20,000 one-word segments after an image join into one text piece (appending them one by one was quadratic:
    600,000 took minutes), with the tokens of that piece tokenised whole."""
    cfg = processor.config
    texts, images = many_segment_document(20_000, jpeg_bytes())
    planned = processor.plan(texts, images, "interleaved")
    joined = "\n\n" + "\n\n".join(texts[1:])
    budget = cfg.max_tokens - 2 - cfg.tokens_per_image
    assert planned.input_ids.tolist() == [cfg.bos_token_id, *[IMAGE_TOKEN_ID] * cfg.tokens_per_image,
                                          *_tokens(processor, joined)[:budget], cfg.eos_token_id]
    unbounded = _unbounded(monkeypatch, processor, texts, images, "interleaved")
    assert planned.input_ids.tolist() == unbounded.input_ids.tolist()
