"""Limits the model library enforces, importable without torch (a job's configuration shows them as defaults, and
the scoring job's shard readers apply `drop_unseen_images` without loading the model's processor)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: checked from the header, before decoding
DEFAULT_DECODE_MEMORY = 2**30  # decoded-pixel bytes a process's decode threads hold at once (processing.DecodeBudget)


@dataclass(frozen=True)
class ImageDecoding:
    """How a processor decodes images, given to it when it is built: the decompression-bomb bound, JPEGs at reduced
    scale or not (off: bit-identical to SigLIP's own preprocessing), and the decoded-pixel bytes its decode threads
    hold at once."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_draft: bool = False
    decode_memory: int = DEFAULT_DECODE_MEMORY


def images_seen(max_images: int, max_tokens: int, tokens_per_image: int) -> int:
    """The most images any sample can bring to the model: `max_images`, or as many slots as fit in the tokens
    between BOS and EOS."""
    return min(max_images, (max_tokens - 2) // tokens_per_image)


def drop_unseen_images(texts: list | None, images: list | None, kind: str,
                       seen: int) -> tuple[list | None, list | None]:
    """A document with what the model can never see taken out, so it is not shipped (`seen`: `images_seen`).

    The processor (`model.processing.UniFilterProcessor.plan`) stops at the first image that does not fit, the
    (seen+1)-th at the latest, and cuts the sample there (`truncated`). Every position after that image is dropped,
    and that image kept as an empty placeholder it never decodes, so planning the result gives the same tokens, images
    and `truncated` as planning the whole: the scores cannot change. So that the processor's checks of the whole
    layout also decide the same, a text is kept after the placeholder when one follows it and none comes before it
    (a document needs one), and a sample it would reject for its layout, or any other kind, is left as it is."""
    if kind != "interleaved" or texts is None or images is None or len(texts) != len(images):
        return texts, images
    if sum(image is not None for image in images) <= seen:
        return texts, images
    if any((text is None) == (image is None) or (text is not None and not isinstance(text, str))
           for text, image in zip(texts, images)):
        return texts, images  # malformed: the processor's error must stay the same
    cut = [i for i, image in enumerate(images) if image is not None][seen]  # the first image that cannot fit
    kept_texts, kept_images = list(texts[:cut]) + [None], list(images[:cut]) + [b""]
    later_text = next((t for t in texts[cut + 1:] if t is not None and t.strip()), None)
    if later_text is not None and not any(t is not None and t.strip() for t in kept_texts):
        kept_texts.append("text")  # never reached: it only says the document has some
        kept_images.append(None)
    return kept_texts, kept_images
