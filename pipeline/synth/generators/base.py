"""What every text generator shares: the request (an origin sample and a target level), the generated reply, the
errors a generator raises (retryable, malformed, permanent), and `generate_with_retries`, which adds backoff with
full jitter on throttling and server errors and re-asks on replies that do not parse."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

from model.errors import Category, SampleError
from pipeline.synth.prompts import PROMPT_VERSION


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
