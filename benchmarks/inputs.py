"""Realistic inputs for the benchmarks: photo-like JPEGs (smooth gradients, textures, edges and sensor noise, so
they compress and decode like photographs, not flat colours) at web sizes, web-like captions, and interleaved
documents; written as webdataset shards where a benchmark reads shards."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WORDS = ("a the photo of with in on near at by and two three small large red blue green white black old new "
         "dog cat car tree house street beach mountain city sunset people woman man child table food plate "
         "wooden vintage modern beautiful view close-up background light dark night summer winter garden "
         "kitchen room window door sign road river lake sky cloud grass flower building bridge boat").split()


def photo(rng: random.Random, width: int, height: int, quality: int = 85) -> bytes:
    """A photo-like JPEG: a low-frequency colour field, a few shapes with soft edges, fine texture and noise."""
    gen = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, phase = gen.uniform(0.5, 4) / width, gen.uniform(0.5, 4) / height, gen.uniform(0, 6.28)
            field[..., c] += gen.uniform(20, 60) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        field[..., c] += gen.uniform(60, 190)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(width // 20, width // 4)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.5)))
    pixels = np.asarray(img, np.float32) + gen.normal(0, 6, (height, width, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photos(n: int, size: str, seed: int = 0) -> list[bytes]:
    """`n` photos at `size`: "512" (long side 512 px) or "1mp" (about a megapixel), aspect ratios of the web."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        long_side = 512 if size == "512" else 1280
        short = int(long_side * rng.choice((0.56, 0.66, 0.75, 0.8, 1.0)))
        w, h = (long_side, short) if rng.random() < 0.7 else (short, long_side)
        out.append(photo(rng, w, h))
    return out


def caption(rng: random.Random) -> str:
    """Web alt-text length: mostly 5-30 words, now and then a long one."""
    n = rng.choice((rng.randint(5, 15), rng.randint(10, 30), rng.randint(30, 80)))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def caption_samples(n: int, images: list[bytes], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"key": f"b{seed}-{i:07d}", "image": images[i % len(images)], "caption": caption(rng)} for i in range(n)]


def documents(n: int, images: list[bytes], seed: int = 0) -> list[dict]:
    """Interleaved documents: 2-4 sections of a paragraph and an image."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        texts, imgs = [], []
        for _ in range(rng.randint(2, 4)):
            texts += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))), None]
            imgs += [None, images[rng.randrange(len(images))]]
        docs.append({"key": f"d{seed}-{i:07d}", "texts": texts, "images": imgs})
    return docs


def sample_rows(samples: list[dict]) -> list[dict]:
    """Caption samples (above) or documents as rows of the sample schema (what the scorer takes)."""
    rows = []
    for k, s in enumerate(samples):
        if "caption" in s:
            rows.append({"id": s["key"], "kind": "caption", "texts": [None, s["caption"]], "images": [s["image"], None],
                         "source": "bench", "ordinal": k})
        else:
            rows.append({"id": s["key"], "kind": "interleaved", "texts": s["texts"], "images": s["images"],
                         "source": "bench", "ordinal": k})
    return rows
