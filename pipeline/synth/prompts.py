"""The four designated quality levels (UniFilter paper) and the prompts that realise them, in one versioned place.

Bump PROMPT_VERSION whenever a text here changes: it is part of every cache key and of every training pair, so a
changed prompt never reuses replies written for an old one.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field, field_validator

PROMPT_VERSION = "v1"

LEVELS = {
    0: {"name": "easy negative",
        "caption": "a caption that is entirely unrelated to the image: it describes a different scene",
        "interleaved": "disfluent, incoherent text with no educational value; the images are unrelated to it"},
    1: {"name": "medium negative",
        "caption": "a caption with several obvious description errors (wrong objects, colours, counts or "
                   "positions) and clumsy wording",
        "interleaved": "readable text with noticeable writing errors (grammar, repetition, wrong words); the "
                       "images are on topic but not aligned with the text next to them"},
    2: {"name": "hard negative",
        "caption": "a fluent, detailed caption that is faithful except for exactly one wrong attribute (one "
                   "colour, count, position, size or object is wrong)",
        "interleaved": "well-written text with subtle factual or logical errors; the images are partly related "
                       "but do not help understanding"},
    3: {"name": "positive",
        "caption": "a high-quality, detailed caption that is entirely faithful to the image",
        "interleaved": "comprehensive, well-written, accurate text; the images are well placed and complement "
                       "the text"},
}

SYSTEM_PROMPT = (
    "You write training data for a classifier that judges the quality of image-text data for pretraining "
    "multimodal models. You are given real data and a designated quality level, and you write text that has "
    "exactly that quality. Reply with one JSON object and nothing else."
)


def caption_prompt(level: int, original_caption: str) -> str:
    spec = LEVELS[level]
    return (
        f"Target quality level: {level} ({spec['name']}).\n"
        f"Write {spec['caption']}.\n"
        "The image is attached. Its original alt-text, which may be noisy, is:\n"
        f"{json.dumps(original_caption)}\n"
        'Reply as {"caption": "<the caption>"}.'
    )


def document_prompt(level: int, texts: list[str], n_images: int) -> str:
    spec = LEVELS[level]
    numbered = "\n".join(f"[{i}] {json.dumps(t)}" for i, t in enumerate(texts))
    return (
        f"Target quality level: {level} ({spec['name']}).\n"
        f"Rewrite the text segments of this web document so that it is {spec['interleaved']}.\n"
        f"The document's {n_images} image(s) are attached in order; keep exactly {len(texts)} text segments, "
        "one for each of these:\n"
        f"{numbered}\n"
        'Reply as {"texts": ["<segment 0>", "<segment 1>", ...]}.'
    )


class CaptionReply(BaseModel):
    caption: str = Field(min_length=1)

    @field_validator("caption")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("caption is blank")
        return value.strip()


class DocumentReply(BaseModel):
    texts: list[str] = Field(min_length=1)


def parse_reply(content: str, kind: str, n_texts: int) -> list[str]:
    """An LLM reply -> the generated text segments; raises ValueError with the reason when it does not parse.
    Tolerates a fenced code block around the JSON, which chat models often add."""
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[text.find("{"):] if "{" in text else text
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"reply holds no JSON object: {content[:120]!r}")
    try:
        payload = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f"reply is not valid JSON ({err.msg}): {content[:120]!r}") from None
    if kind == "caption":
        return [CaptionReply.model_validate(payload).caption]
    texts = DocumentReply.model_validate(payload).texts
    if len(texts) != n_texts:
        raise ValueError(f"reply has {len(texts)} text segments, expected {n_texts}")
    return texts
