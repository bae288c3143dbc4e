"""Text generators for the synthetic training data, behind one interface: `offline` (deterministic perturbations,
no network), `openai` (any OpenAI-compatible chat endpoint, e.g. vLLM) and `bedrock` (Claude through the
Bedrock Converse API). A generator turns one request (an origin sample and a target level) into text segments;
`generate_with_retries` adds backoff with jitter on throttling and server errors, and re-asks on replies that do
not parse."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from model.errors import Category, SampleError
from pipeline.prompts import PROMPT_VERSION, SYSTEM_PROMPT, caption_prompt, document_prompt, parse_reply


@dataclass
class GenerationRequest:
    origin_key: str  # unique origin identity (source shard + sample id)
    level: int
    kind: str  # caption | interleaved
    texts: list[str]  # the origin's text segments (one for a caption)
    images: list[bytes]  # the images the model is shown
    donor_texts: list[str] = field(default_factory=list)  # another origin's text (offline level 0)
    seed_key: str | None = None  # what seeds offline perturbations (location-free); default the origin key

    def trace_id(self) -> str:
        return f"{self.origin_key}:L{self.level}"

    def seed_id(self) -> str:
        return f"{self.seed_key or self.origin_key}:L{self.level}"


@dataclass
class Generated:
    texts: list[str]
    input_tokens: int = 0
    output_tokens: int = 0


class RetryableError(RuntimeError):
    """Throttling, a server error or a timeout: worth another try after a pause."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class MalformedReply(ValueError):
    """The reply arrived but does not parse: worth asking again, a limited number of times. Its tokens were
    still billed, so it carries the usage."""

    def __init__(self, message: str, usage: tuple[int, int] = (0, 0)):
        super().__init__(message)
        self.usage = usage


class PermanentError(RuntimeError):
    """A request the endpoint refuses (bad request, auth): no retry."""


# -- offline: deterministic perturbations that realise each level ------------------------------------------------
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
def _image_mime(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "jpeg"


def _prompt(request: GenerationRequest) -> str:
    if request.kind == "caption":
        return caption_prompt(request.level, request.texts[0])
    return document_prompt(request.level, request.texts, len(request.images))


class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, OpenAI). Images travel as base64 data URLs. The
    API key, if the endpoint needs one, comes from OPENAI_API_KEY; it is never logged."""

    def __init__(self, endpoint: str, model: str, timeout_s: float = 120.0, max_tokens: int = 1024,
                 temperature: float = 0.7):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/chat/completions")
                                           else "/chat/completions")
        self.model, self.timeout_s, self.max_tokens, self.temperature = model, timeout_s, max_tokens, temperature
        self.name = f"openai:{model}"

    def generate(self, request: GenerationRequest) -> Generated:
        content = [{"type": "text", "text": _prompt(request)}]
        for image in request.images:
            data_url = f"data:image/{_image_mime(image)};base64,{base64.b64encode(image).decode()}"
            content.append({"type": "image_url", "image_url": {"url": data_url}})
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]}
        headers = {"Content-Type": "application/json", "X-Request-Id": request.trace_id()}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace")
            if err.code == 429 or err.code >= 500:
                retry_after = err.headers.get("Retry-After")
                raise RetryableError(f"HTTP {err.code}: {detail}",
                                     float(retry_after) if retry_after and retry_after.isdigit() else None) from None
            raise PermanentError(f"HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise RetryableError(f"connection: {err}") from None
        try:
            payload = json.loads(raw)
            message = payload["choices"][0]["message"]["content"]
            usage = payload.get("usage") or {}
            spent = (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise MalformedReply(f"response is not a chat completion ({type(err).__name__}: {raw[:120]!r})") from None
        try:
            texts = parse_reply(message or "", request.kind, len(request.texts))
        except ValueError as err:
            raise MalformedReply(str(err), spent) from None
        return Generated(texts, *spent)


class BedrockGenerator:
    """Claude on Amazon Bedrock through boto3's `bedrock-runtime` Converse API; images as image blocks.
    Credentials and region come from the standard AWS chain; `endpoint_url` overrides the service endpoint."""

    def __init__(self, model: str, region: str | None = None, endpoint_url: str | None = None,
                 timeout_s: float = 120.0, max_tokens: int = 1024, temperature: float = 0.7):
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=timeout_s,
                        connect_timeout=min(timeout_s, 30))
        self.client = boto3.client("bedrock-runtime", region_name=region, endpoint_url=endpoint_url, config=config)
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.name = f"bedrock:{model}"

    def generate(self, request: GenerationRequest) -> Generated:
        from botocore.exceptions import BotoCoreError, ClientError

        content = [{"text": _prompt(request)}]
        content += [{"image": {"format": _image_mime(img), "source": {"bytes": img}}} for img in request.images]
        try:
            resp = self.client.converse(
                modelId=self.model, system=[{"text": SYSTEM_PROMPT}],
                messages=[{"role": "user", "content": content}],
                inferenceConfig={"maxTokens": self.max_tokens, "temperature": self.temperature},
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("ThrottlingException", "ServiceUnavailableException", "ModelNotReadyException",
                        "InternalServerException", "ModelTimeoutException") or status == 429 or status >= 500:
                raise RetryableError(f"{code or status}: {err}") from None
            raise PermanentError(f"{code or status}: {err}") from None
        except BotoCoreError as err:
            raise RetryableError(f"{type(err).__name__}: {err}") from None
        usage = resp.get("usage") or {}
        spent = (int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0)))
        try:
            blocks = resp["output"]["message"]["content"]
            message = "".join(b.get("text", "") for b in blocks)
        except (KeyError, TypeError) as err:
            raise MalformedReply(f"response has no message ({type(err).__name__})", spent) from None
        try:
            texts = parse_reply(message, request.kind, len(request.texts))
        except ValueError as err:
            raise MalformedReply(str(err), spent) from None
        return Generated(texts, *spent)


# -- retries -----------------------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    max_attempts: int = 6  # throttling / server errors
    max_malformed: int = 3  # replies that do not parse
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class Outcome:
    generated: Generated | None
    error: SampleError | None
    attempts: int  # requests sent
    input_tokens: int = 0  # over all attempts, unparseable replies included (they are billed too)
    output_tokens: int = 0


def generate_with_retries(generator, request: GenerationRequest, policy: RetryPolicy,
                          sleep=time.sleep, rng: random.Random | None = None) -> Outcome:
    """Exponential backoff with full jitter (or the server's Retry-After) on RetryableError; re-asks on
    MalformedReply up to `max_malformed` times; gives up with an error reason, never an exception."""
    rng = rng or random.Random()
    attempts = malformed = transient = spent_in = spent_out = 0
    while True:
        attempts += 1
        try:
            generated = generator.generate(request)
            return Outcome(generated, None, attempts, spent_in + generated.input_tokens,
                           spent_out + generated.output_tokens)
        except RetryableError as err:
            transient += 1
            if transient >= policy.max_attempts:
                return Outcome(None, SampleError(Category.GENERATE, f"{err} (gave up after {attempts} attempts)"),
                               attempts, spent_in, spent_out)
            delay = err.retry_after if err.retry_after is not None else rng.uniform(
                0, min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (transient - 1)))
            sleep(delay)
        except MalformedReply as err:
            malformed += 1
            spent_in, spent_out = spent_in + err.usage[0], spent_out + err.usage[1]
            if malformed >= policy.max_malformed:
                return Outcome(None, SampleError(Category.MALFORMED, f"{err} (gave up after {malformed} unparseable "
                                                                   "replies)"), attempts, spent_in, spent_out)
        except PermanentError as err:
            return Outcome(None, SampleError(Category.GENERATE, str(err)), attempts, spent_in, spent_out)


def cache_namespace(generator_name: str) -> str:
    """The cache's folder for a generator and prompt version (filesystem-safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{generator_name}/{PROMPT_VERSION}").replace("_", "-")
