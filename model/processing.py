"""The one preprocessing path, shared by training and scoring: image decoding and resizing, the text layout with
image slots, the image and token limits, and batching into model inputs."""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from model.config import IMAGE_TOKEN_ID, UniFilterConfig
from model.errors import Category, SampleError
from model.limits import (  # noqa: F401 - re-exported
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageDecoding,
    images_seen,
)

PAD_COLOR = (127, 127, 127)  # int(255 * image_mean) for SigLIP's mean of 0.5, as LLaVA's expand2square

Kind = Literal["caption", "interleaved"]
ImageInput = bytes | Image.Image | np.ndarray


@dataclass
class EncodedSample:
    """One sample, ready for batching: token ids with expanded image slots, and its images at model size."""

    input_ids: np.ndarray  # (n_tokens,) int64; IMAGE_TOKEN_ID at image positions, tokens_per_image per image
    # (n_images, 3, S, S) uint8, normalised later on the model's device; a tensor already on it when the images
    # were decoded there (`pipeline.scoring.gpu_decode`)
    pixel_values: np.ndarray | torch.Tensor
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class PlannedSample:
    """One sample with its tokens decided and its images still encoded: what it costs (`n_tokens`) is known before
    a pixel is decoded, so batches can be planned first and the images decoded beside the device."""

    input_ids: np.ndarray  # as EncodedSample's
    images: list  # the kept images, as given (encoded bytes, PIL images, or prepared arrays)
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.images)


# Text is tokenised only up to a character bound (`UniFilterProcessor._token_ids`): each piece to
# `CHARS_PER_TOKEN_BOUND` characters per token of `max_tokens`, and a sample's pieces together to twice that.
# Ordinary text, under 8 characters a token, fills the budget well before the bound, and the tokens kept are the
# whole text's; text of more characters a token (ASCII tables, runs of spaces) is tokenised once more, up to
# `MAX_CHARS_PER_TOKEN` a token. Past that (a word longer than half the cut, as in a caption without a space) the
# cut's own tokens are kept: the cost of any text is bounded (an 8 MB caption without a space once took GBs and
# tens of seconds).
CHARS_PER_TOKEN_BOUND = 8
MAX_CHARS_PER_TOKEN = 64

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what web corpora hold; never EPS/PS/PDF
# Pillow allocates an image in blocks (16 MB by default). glibc serves blocks of that size from each thread's own
# arena once its adaptive mmap threshold has grown past them, and keeps them after they are freed: six decode threads
# then hold six big images' worth for good. Blocks above glibc's largest adaptive threshold (32 MB) are always mapped
# and given back when freed (measured: two 8000x8000 RGBA PNGs decoded at once, 2,014 -> 1,323 MB peak).
PILLOW_BLOCK_BYTES = 64 * 2**20
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3,
               "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


class DecodeBudget:
    """Decoded-pixel bytes the decode threads of one process may hold at once for big images, shared by them (a
    process decoding big images with six threads otherwise holds six of them). Each image reserves what decoding it
    will take, estimated from its header before a pixel is decoded (`decode_cost`), and gives it back once it is at
    the model's size. Big images wait for each other, in order; small ones (at most 1/16 of the budget) flow without
    waiting, so a process holds at most the budget plus a small image per thread. An image that alone exceeds the
    budget waits for all of it (its size is bounded by `max_image_pixels` all the same)."""

    SMALL = 16  # an image costing at most capacity / SMALL never waits

    def __init__(self, capacity: int = DEFAULT_DECODE_MEMORY):
        self.capacity = capacity
        self._init_state()

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self.in_use = 0  # bytes the big images being decoded reserved
        self._waiting: deque[object] = deque()  # big requests waiting, in order

    def __getstate__(self):  # a processor travels to other processes with its budget's size, not its locks
        return {"capacity": self.capacity}

    def __setstate__(self, state):
        self.capacity = state["capacity"]
        self._init_state()

    @contextmanager
    def reserving(self) -> Iterator[Callable[[int], None]]:
        """A function that reserves bytes (a big image's wait until they are free); all are given back at the end."""
        held = []

        def reserve(nbytes: int) -> None:
            held.append(self._acquire(min(int(nbytes), self.capacity)))

        try:
            yield reserve
        finally:
            if any(held):
                with self._cond:
                    self.in_use -= sum(held)
                    self._cond.notify_all()

    def _acquire(self, n: int) -> int:
        if n <= self.capacity // self.SMALL:
            return 0
        with self._cond:
            ticket = object()
            self._waiting.append(ticket)
            self._cond.wait_for(lambda: self._waiting[0] is ticket and self.in_use + n <= self.capacity)
            self._waiting.popleft()
            self.in_use += n
            self._cond.notify_all()
            return n


def decode_cost(img: Image.Image) -> int:
    """Bytes decoding, converting, padding and resizing one image holds at its peak, from its header (after draft
    scaling): the decoded pixels, an RGB copy where the mode is another, and the padded square where it is not one."""
    width, height = img.size
    side = max(width, height)
    cost = width * height * _MODE_BYTES.get(img.mode, 4)
    if img.mode != "RGB":
        cost += width * height * 3
    if width != height:
        cost += side * side * 3
    return cost
_STRIPE_PIXELS = 2**20  # high bit depths are rescaled this many pixels at a time: float64 work of ~8 MB

# A JPEG's decoding time grows with its scans times its pixels (a progressive JPEG of 1,000 duplicated scans at
# 2000x2000 decodes for 13 s, and passes as a valid image). Libjpeg's own progressions use 6-18 scans; a JPEG may
# have `JPEG_SCAN_PIXELS_FACTOR` scans at `max_image_pixels` (more at fewer pixels: the same work), and never more
# than `JPEG_MAX_SCANS` (libjpeg-turbo's fuzzers' and tools' limit).
JPEG_MAX_SCANS = 500
JPEG_SCAN_PIXELS_FACTOR = 32
_JPEG_NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")  # past entropy-coded data: not 0xFF00, RSTn or fill


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None,
                 exif_transpose: bool = False, reserve: Callable[[int], None] | None = None) -> Image.Image:
    """Encoded bytes -> RGB image, refusing empty, non-image, corrupt and oversized (bomb) payloads, and formats
    outside `ACCEPTED_FORMATS` (Pillow would otherwise open any format it knows, and hand EPS to Ghostscript).

    Two bounds, both checked before the pixels are allocated: the decoded size (width x height, from the header)
    and the square the image is padded to (the longer side squared), so a 1 x 20000 strip cannot allocate 20000^2
    pixels. 16-bit, 32-bit and float images are rescaled to 8 bits rather than clipped, a stripe at a time (no
    full-size float copies). With `exif_transpose`
    the EXIF orientation is applied (the released preprocessing, `Image.open(f).convert("RGB")`, does not, so the
    default leaves it off). With `draft_size`, a JPEG much larger than that is decoded at a reduced scale in the
    DCT domain (libjpeg's 1/2, 1/4, 1/8), never below `draft_size` on its long side: about 1.4x faster
    preprocessing of large photos for a mean difference under one grey level after the resize (see
    benchmarks/preprocess_throughput.py). `reserve(bytes)`, when given, is called with what decoding will hold
    (`decode_cost`) once the header is checked and before any pixel is decoded (a `DecodeBudget`'s)."""
    if not data:
        raise SampleError(Category.DECODE, "empty image payload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = img.size
            refuse_too_many_pixels(width, height, max_pixels)
            if draft_size and img.format == "JPEG" and max(width, height) >= 2 * draft_size:
                scale = draft_size / max(width, height)
                img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            refuse_too_large_square(width, height, max(img.size), max_pixels)
            if img.format in ("JPEG", "MPO"):
                refuse_too_many_scans(data, width, height, max_pixels)
            if reserve is not None:
                reserve(decode_cost(img))
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
    except SampleError:
        raise
    except Image.UnidentifiedImageError:
        refused = _refused_format(data)
        if refused:
            raise SampleError(Category.DECODE, f"image format {refused} is not accepted (accepted: "
                                               f"{', '.join(ACCEPTED_FORMATS)})") from None
        raise SampleError(Category.DECODE, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError(Category.DECODE, f"image too large: {err}") from None
    except Exception as err:  # corrupt or truncated data: PIL raises OSError, SyntaxError, ValueError, ...
        raise SampleError(Category.DECODE, f"corrupt image ({type(err).__name__}: {err})") from None
    if _is_deep(img):
        img = _rescaled_to_grey8(img)  # rebinding frees the deep original before the RGB copy is made
    return to_rgb8(img)


def refuse_too_many_pixels(width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard's first bound, from the header: the decoded size (`decode_image` and the
    device decoder, `pipeline.scoring.gpu_decode`, word it alike)."""
    if width * height > max_pixels:
        raise SampleError(Category.DECODE,
                          f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")


def refuse_too_large_square(width: int, height: int, side: int, max_pixels: int) -> None:
    """The second bound: the square the image is padded to, `side` its long side as decoded (smaller than the
    header's after draft scaling)."""
    if side * side > max_pixels:
        raise SampleError(Category.DECODE, f"image too large: padding {width}x{height} to a square gives "
                                           f"{side}x{side} pixels, over the limit of {max_pixels}")


def jpeg_scan_limit(width: int, height: int, max_pixels: int) -> int:
    """The most scans a `width` x `height` JPEG may have: as much decoding work as `JPEG_SCAN_PIXELS_FACTOR` scans of
    the largest image accepted, and at most `JPEG_MAX_SCANS`."""
    at_this_size = JPEG_SCAN_PIXELS_FACTOR * max_pixels // max(1, width * height)
    return min(JPEG_MAX_SCANS, max(JPEG_SCAN_PIXELS_FACTOR, at_this_size))


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The start-of-scan markers of a JPEG's own frame, counted up to `stop_after + 1`: its marker segments skipped
    by their lengths (an EXIF thumbnail's scans are not its own), its entropy-coded data searched for the next
    marker at C speed. Linear in the bytes, read once."""
    scans, at, end = 0, 2, len(data)  # after the start-of-image marker
    while at + 4 <= end and scans <= stop_after:
        if data[at] != 0xFF:  # garbage between segments: on to the next marker
            found = _JPEG_NEXT_MARKER.search(data, at)
            if found is None:
                break
            at = found.start()
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0xD9:  # end of image
            break
        elif 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # markers without a length
            at += 2
        else:
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
            if marker == 0xDA:  # the scan's header, then its entropy-coded data up to the next marker
                scans += 1
                found = _JPEG_NEXT_MARKER.search(data, at)
                if found is None:
                    break
                at = found.start()
    return scans


def refuse_too_many_scans(data: bytes, width: int, height: int, max_pixels: int) -> None:
    """The scan-bomb guard, before decoding: a JPEG with more scans than `jpeg_scan_limit` allows (`decode_image`
    and the device decoder word it alike)."""
    limit = jpeg_scan_limit(width, height, max_pixels)
    if jpeg_scans(data, stop_after=limit) > limit:
        raise SampleError(Category.DECODE, f"JPEG has more than {limit} scans at {width}x{height} (a scan bomb: "
                                           "decoding time grows with scans times pixels)")


def _refused_format(data: bytes) -> str | None:
    """The name of a format Pillow knows but we refuse, from its signature alone (each plugin's own prefix check,
    as `Image.open` makes it; no other plugin parses the bytes)."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's prefix check that cannot judge these bytes
            continue
    return None


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. High bit depths are rescaled (PIL's own conversion clips them): 16-bit to 8 by
    /257, 32-bit integers by their range, floats in [0, 1] by 255."""
    if img.mode == "RGB":
        return img
    if _is_deep(img):
        img = _rescaled_to_grey8(img)
    return img.convert("RGB")


def _is_deep(img: Image.Image) -> bool:
    return img.mode.startswith("I;16") or img.mode in ("I", "F")


def _rescaled_to_grey8(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image -> 8-bit grey, a stripe of rows at a time: the float64 arithmetic of a
    whole-image conversion, bit for bit, in the memory of one stripe (a whole 8000 x 8000 image in float64 would
    take 512 MB per copy). The scale depends on the whole image's range: floats in [0, 1] by 255, 16-bit by /257,
    other ranges stretched to 0-255; NaN and infinities count as 0."""
    width, height = img.size
    rows = max(1, _STRIPE_PIXELS // max(width, 1))
    stripes = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def values(top: int, bottom: int) -> np.ndarray:
        stripe = np.asarray(img.crop((0, top, width, bottom)), dtype=np.float64)
        return np.nan_to_num(stripe, copy=False, nan=0.0, posinf=0.0, neginf=0.0)

    low = high = 0.0  # the range always includes 0, as it always has
    if not img.mode.startswith("I;16"):
        for top, bottom in stripes:
            stripe = values(top, bottom)
            low, high = min(low, float(stripe.min(initial=0.0))), max(high, float(stripe.max(initial=0.0)))
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in stripes:
        stripe = values(top, bottom)
        if img.mode == "F" and low >= 0 and high <= 1.0:
            stripe *= 255.0
        elif img.mode.startswith("I;16") or (low >= 0 and high <= 65535 and high > 255):
            stripe /= 257.0
        elif low < 0 or high > 255:
            stripe -= low
            stripe *= 255.0 / max(high - low, 1e-12)
        out[top:bottom] = np.clip(np.rint(stripe, out=stripe), 0, 255, out=stripe)
    return Image.fromarray(out)


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """Pad to a square with grey (centred), resize to `size` (bicubic): (3, size, size) uint8."""
    img = to_rgb8(img)
    width, height = img.size
    if width != height:
        side = max(width, height)
        square = Image.new("RGB", (side, side), PAD_COLOR)
        square.paste(img, ((side - width) // 2, (side - height) // 2))
        img = square
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # channels first, in memory too


@dataclass
class _TextPiece:
    """A text piece's token ids; `cut`: tokenised only up to a character bound, not to its end."""

    ids: list[int]
    cut: bool


def _last_word_start(word_ids: list[int | None]) -> int:
    """The index of the first token of the last pre-token (word): the tokens before it are the same however the
    text goes on after it."""
    last = word_ids[-1] if word_ids else None
    return next((k for k, w in enumerate(word_ids) if w == last), 0)


class UniFilterProcessor:
    """Turns samples (ordered text/image segments) into model inputs, identically for training and scoring.

    Layout (docs/ARCHITECTURE.md): a caption is `BOS <image> "\\n" caption EOS`; an interleaved document joins its
    segments with "\\n\\n", one image slot per image, then EOS. Text between two slots is tokenised as its own piece.
    """

    def __init__(self, config: UniFilterConfig, tokenizer, decoding: ImageDecoding | None = None):
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, field) is None:
                raise ValueError(f"model config field {field!r} is not set (the tokenizer's special tokens)")
        self.config = config
        self.tokenizer = tokenizer
        self._encode_texts = tokenizer.backend_tokenizer.encode_batch
        decoding = decoding or ImageDecoding()
        self.max_image_pixels = decoding.max_image_pixels
        self.jpeg_draft = decoding.jpeg_draft  # off by default: bit-identical to SigLIP's own preprocessing
        self.decode_budget = DecodeBudget(decoding.decode_memory)  # what this process's decode threads hold at once
        if Image.core.get_block_size() < PILLOW_BLOCK_BYTES:
            Image.core.set_block_size(PILLOW_BLOCK_BYTES)

    @property
    def images_seen(self) -> int:
        """The most images a sample brings to the model (`model.limits.drop_unseen_images` drops the rest early)."""
        return images_seen(self.config.max_images, self.config.max_tokens, self.config.tokens_per_image)

    # -- one sample ------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str | None], images: Sequence[ImageInput | None], kind: Kind) -> EncodedSample:
        """Encode one sample given as parallel per-position lists (text or image at each position)."""
        return self.decode(self.plan(texts, images, kind))

    def plan(self, texts: Sequence[str | None], images: Sequence[ImageInput | None], kind: Kind) -> PlannedSample:
        """The sample's layout and tokens, with the image and token limits applied; its images not decoded yet."""
        pieces = self._layout(texts, images, kind)  # [("text", str) | ("image", ImageInput)]
        encoded = self._token_ids([p for t, p in pieces if t == "text"])
        text_ids = iter(encoded)

        cfg = self.config
        budget = cfg.max_tokens - 2  # BOS and EOS are always kept
        ids: list[int] = [cfg.bos_token_id]
        kept_images: list[ImageInput] = []
        truncated = False
        for piece_kind, piece in pieces:
            if piece_kind == "image":
                if len(kept_images) == cfg.max_images or cfg.tokens_per_image > budget:
                    truncated = True
                    break
                kept_images.append(piece)
                ids.extend([IMAGE_TOKEN_ID] * cfg.tokens_per_image)
                budget -= cfg.tokens_per_image
                continue
            text = next(text_ids, None)
            if text is None:  # past the characters a sample's texts are tokenised up to (pathological text only)
                truncated = True
                break
            if text.cut or len(text.ids) > budget:  # a cut piece ends the sample, whatever its tokens
                ids.extend(text.ids[:budget])
                truncated = True
                break
            ids.extend(text.ids)
            budget -= len(text.ids)
        ids.append(cfg.eos_token_id)
        if not kept_images:  # only a document can lose all its images (a caption's image comes first)
            lead = len(encoded[0].ids) if pieces[0][0] == "text" else 0
            raise SampleError(Category.EMPTY, f"every image of the document was cut by the token limit ({lead} "
                                              f"tokens of text before the first image; max_tokens {cfg.max_tokens})")
        return PlannedSample(np.asarray(ids, dtype=np.int64), kept_images, truncated)

    def decode(self, planned: PlannedSample) -> EncodedSample:
        """A planned sample's images decoded (guarded), padded and resized: what the model takes."""
        pixels = [self.image_pixels(img) for img in planned.images]
        size = self.config.image_size
        pixel_values = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), dtype=np.uint8)
        return EncodedSample(planned.input_ids, pixel_values, planned.truncated)

    def _token_ids(self, texts: list[str]) -> list[_TextPiece]:
        """The text pieces' token ids, in order, up to the first piece that is cut (it ends the sample). A piece is
        tokenised up to `CHARS_PER_TOKEN_BOUND` characters per token of `max_tokens`, and the pieces together up to
        twice that. A cut changes only the pre-token (word) it falls in, so the tokens before that word are the
        whole piece's: when they fill what is left of the budget the cut is exact; when not, because the text has
        more than 8 characters a token, the piece is tokenised once more, up to `MAX_CHARS_PER_TOKEN` per token.
        A piece is kept as the last tokenising gives it: its ids differ from the whole piece's only for a word
        longer than half the cut (thousands of characters) or more than 64 characters a token."""
        limit = self.config.max_tokens
        bound = CHARS_PER_TOKEN_BOUND * limit
        room = 2 * bound
        cut: list[str] = []
        for text in texts:
            if room <= 0:  # pieces past it are never reached: the budget is spent before them
                break
            cut.append(text[:min(bound, room)])
            room -= len(cut[-1])
        out: list[_TextPiece] = []
        used, retried = 0, False  # tokens before this piece: it can keep at most `limit - used`
        for text, piece, enc in zip(texts, cut, self._encode_texts(cut, add_special_tokens=False) if cut else []):
            start = _last_word_start(enc.word_ids) if len(piece) < len(text) else None
            # Not provably exact, and not for one word longer than half the cut: more characters help.
            if start is not None and not retried and start < limit - used and 2 * enc.offsets[start][0] >= len(piece):
                retried = True
                piece = text[:MAX_CHARS_PER_TOKEN * limit]
                enc = self._encode_texts([piece], add_special_tokens=False)[0]
            out.append(_TextPiece(enc.ids, cut=len(piece) < len(text)))
            if out[-1].cut:
                break
            used += len(enc.ids)
        return out

    def _layout(self, texts, images, kind: Kind) -> list[tuple[str, object]]:
        if len(texts) != len(images):
            raise SampleError(
                Category.MALFORMED, f"{len(texts)} text positions but {len(images)} image positions "
                "(texts and images must be parallel lists)"
            )
        segments: list[tuple[str, object]] = []
        for i, (text, image) in enumerate(zip(texts, images)):
            if text is not None and image is not None:
                raise SampleError(Category.MALFORMED, f"position {i} holds both a text and an image")
            if text is None and image is None:
                raise SampleError(Category.MALFORMED, f"position {i} holds neither a text nor an image")
            if image is not None:
                segments.append(("image", image))
            elif not isinstance(text, str):
                raise SampleError(Category.MALFORMED, f"position {i} text is {type(text).__name__}, not a string")
            elif text.strip():
                segments.append(("text", text))
        n_images = sum(1 for t, _ in segments if t == "image")
        n_texts = len(segments) - n_images

        if kind == "caption":
            if n_images != 1:
                raise SampleError(Category.MALFORMED, f"a caption sample needs exactly 1 image, found {n_images}")
            if n_texts == 0:
                raise SampleError(Category.EMPTY, "caption has no text")
            caption = "\n\n".join(str(p) for t, p in segments if t == "text")
            image = next(p for t, p in segments if t == "image")
            return [("image", image), ("text", "\n" + caption)]
        if kind != "interleaved":
            raise SampleError(Category.MALFORMED, f"unknown sample kind {kind!r} (caption or interleaved)")
        if n_images == 0:
            raise SampleError(Category.EMPTY, "interleaved document has no images")
        if n_texts == 0:
            raise SampleError(Category.EMPTY, "interleaved document has no text")

        # Join segments with "\n\n"; consecutive texts and their separators form one text piece, joined once
        # (appending to it segment by segment was quadratic: 600,000 segments took minutes).
        pieces: list[tuple[str, object]] = []
        run: list[str] = []  # the text piece being gathered
        for j, (seg_kind, seg) in enumerate(segments):
            sep = "\n\n" if j > 0 else ""
            if seg_kind == "image":
                if sep:
                    run.append(sep)
                if run:
                    pieces.append(("text", "".join(run)))
                    run = []
                pieces.append(("image", seg))
            else:
                run.append(sep + str(seg))
        if run:
            pieces.append(("text", "".join(run)))
        return pieces

    def image_pixels(self, image: ImageInput) -> np.ndarray:
        """One image (encoded bytes, a PIL image or prepared pixels) decoded (guarded), padded and resized:
        (3, S, S) uint8; raises SampleError."""
        size = self.config.image_size
        if isinstance(image, np.ndarray):  # already prepared by a CPU stage
            if image.shape != (3, size, size) or image.dtype != np.uint8:
                raise SampleError(Category.MALFORMED, f"prepared image has shape {image.shape} {image.dtype}, "
                                  f"expected (3, {size}, {size}) uint8")
            return image
        if isinstance(image, (bytes, bytearray, memoryview)):
            draft = self.config.image_size if self.jpeg_draft else None
            with self.decode_budget.reserving() as reserve:  # held until the image is at the model's size
                decoded = decode_image(bytes(image), self.max_image_pixels, draft, self.config.exif_transpose, reserve)
                return prepare_image(decoded, size)
        if not isinstance(image, Image.Image):
            raise SampleError(Category.MALFORMED, f"unsupported image value of type {type(image).__name__}")
        return prepare_image(image, size)

    # -- batches ---------------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Right-padded batch: `input_ids`, `attention_mask` (B, L) and `pixel_values` (N, 3, S, S) uint8,
        the images of all samples in order."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        length = max(s.n_tokens for s in samples)
        input_ids = np.full((len(samples), length), self.config.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(samples), length), dtype=np.int64)
        for row, s in enumerate(samples):
            input_ids[row, : s.n_tokens] = s.input_ids
            attention_mask[row, : s.n_tokens] = 1
        pixels = [s.pixel_values for s in samples]
        if all(isinstance(p, torch.Tensor) for p in pixels):  # decoded on the device (pipeline.scoring.gpu_decode)
            pixel_values = torch.cat(pixels)
        else:
            pixel_values = torch.from_numpy(np.concatenate(pixels, axis=0))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "pixel_values": pixel_values,
        }

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Encode and collate samples given as dicts with `texts`, `images` and `kind` (raises SampleError)."""
        return self.collate([self.encode(s["texts"], s["images"], s["kind"]) for s in samples])
