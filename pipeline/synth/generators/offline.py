"""The offline generator: deterministic perturbations of the origin's own text, no network. Level 3 keeps it,
level 2 swaps exactly one attribute, level 1 several and makes it clumsy, level 0 takes another origin's text."""

from __future__ import annotations

import hashlib
import random
import re

from pipeline.synth.generators.base import Generated, GenerationRequest

_ATTRIBUTES = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "grey", "brown",
              "pink"],
    "count": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "shape": ["circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars"],
    "position": ["left", "right", "top", "bottom", "center", "middle", "above", "below"],
    "size": ["small", "large", "big", "tiny", "huge", "tall", "short"],
    "object": ["dog", "cat", "car", "house", "tree", "man", "woman", "child", "bird", "boat", "table", "chair",
               "beach", "street", "mountain", "river", "city", "flower", "horse", "bicycle"],
}
_CATEGORY = {word: cat for cat, words in _ATTRIBUTES.items() for word in words}
_FALLBACK_UNRELATED = [
    "A bowl of steaming noodle soup on a wooden kitchen table.",
    "Stock market index chart with quarterly earnings figures.",
    "A violin resting on sheet music next to a window.",
    "Snow-covered pine forest under a grey winter sky.",
]
_WORD = re.compile(r"[A-Za-z]+")


def _rng(request: GenerationRequest, salt: str = "") -> random.Random:
    digest = hashlib.sha256(f"{request.seed_id()}|{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _swap_attributes(text: str, n: int, rng: random.Random) -> str:
    """Replace `n` attribute words (colour, count, shape, position, size, object) with different words of the
    same category; when the text names fewer attributes, replace other words with object words."""
    matches = [m for m in _WORD.finditer(text) if m.group().lower() in _CATEGORY]
    if len(matches) < n:
        others = [m for m in _WORD.finditer(text) if m.group().lower() not in _CATEGORY and len(m.group()) > 3]
        matches += rng.sample(others, min(n - len(matches), len(others)))
    chosen = sorted(rng.sample(matches, min(n, len(matches))), key=lambda m: m.start(), reverse=True)
    for m in chosen:
        word = m.group()
        category = _CATEGORY.get(word.lower(), "object")
        candidates = [w for w in _ATTRIBUTES[category] if w.rstrip("s") != word.lower().rstrip("s")]
        if category == "shape":  # keep the grammatical number: "two circles" -> "two squares"
            candidates = [w for w in candidates if w.endswith("s") == word.lower().endswith("s")]
        new = rng.choice(candidates)
        new = new.capitalize() if word[0].isupper() else new
        text = text[: m.start()] + new + text[m.end():]
    return text


def _disfluent(text: str, rng: random.Random, strength: int) -> str:
    """Writing errors: drop, duplicate and swap words (`strength` edits)."""
    words = text.split()
    for _ in range(strength):
        if len(words) < 3:
            break
        i = rng.randrange(len(words) - 1)
        op = rng.choice(("drop", "dup", "swap"))
        if op == "drop":
            del words[i]
        elif op == "dup":
            words.insert(i, words[i])
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _scrambled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(w.lower() for w in words)


class OfflineGenerator:
    """No network: level 3 keeps the faithful text; level 2 swaps exactly one attribute; level 1 makes several
    attribute errors and writing errors; level 0 takes another origin's text (scrambled, for documents)."""

    name = "offline"
    model = "offline"

    def generate(self, request: GenerationRequest) -> Generated:
        rng = _rng(request, "text")
        level, texts = request.level, request.texts
        if level == 3:
            return Generated(list(texts))
        if request.kind == "caption":
            caption = texts[0]
            if level == 2:
                return Generated([_swap_attributes(caption, 1, rng)])
            if level == 1:
                return Generated([_disfluent(_swap_attributes(caption, 3, rng), rng, 2)])
            donor = " ".join(request.donor_texts).strip()
            if not donor or donor == caption:
                donor = rng.choice(_FALLBACK_UNRELATED)
            return Generated([donor])
        if level == 2:
            target = rng.randrange(len(texts))
            return Generated([_swap_attributes(t, 1, rng) if i == target else t for i, t in enumerate(texts)])
        if level == 1:
            return Generated([_disfluent(_swap_attributes(t, 1, rng), rng, max(2, len(t.split()) // 8))
                              for t in texts])
        donors = request.donor_texts or _FALLBACK_UNRELATED
        return Generated([_scrambled(donors[i % len(donors)], rng) for i in range(len(texts))])


# -- LLM endpoints ---------------------------------------------------------------------------------------------
