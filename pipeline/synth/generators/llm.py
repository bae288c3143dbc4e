"""Generators that ask an LLM: any OpenAI-compatible chat endpoint (vLLM, OpenAI) and Claude through the Bedrock
Converse API. Both send the level's prompt with the origin's images and parse the reply (`pipeline.synth.prompts`)."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request

from pipeline.synth.generators.base import (
    Generated,
    GenerationRequest,
    MalformedReply,
    PermanentError,
    RetryableError,
)
from pipeline.synth.prompts import SYSTEM_PROMPT, caption_prompt, document_prompt, parse_reply


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
        self.model = model
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
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
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
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
