"""The project's one exception hierarchy (docs/ARCHITECTURE.md, "Errors"), and the categories of error reasons.

Errors are values inside the data path (a record's `error`, "<category>: <detail>") and exceptions at the edges.
Every exception raised on purpose derives from `UniFilterError`; the command-line entry points print them, one
line each, and nothing below them prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Category(str, Enum):
    """Why a sample (or a shard) has no result. Sample categories become error records; shard categories keep the
    shard uncommitted (a fault is not bad data)."""

    # a sample's own bytes or text: an error record
    DECODE = "decode"  # an image or text that does not decode
    EMPTY = "empty"  # a sample with nothing to score (no image, no text)
    MALFORMED = "malformed"  # a sample whose structure is wrong (parallel lists, position types)
    DUPLICATE = "duplicate"  # a key that occurs more than once in its shard
    PREPROCESS = "preprocess"  # an unforeseen failure while encoding one sample
    SCORE = "score"  # the model failed on this sample alone (reproduced on its own)
    DEVICE = "device"  # the sample faults the device on its own (alone, on a fresh actor whose canary succeeded)
    KILLED = "killed"  # the sample's worker process died while it was in flight, alone (out of memory, a crash)
    GENERATE = "generate"  # the text generator gave up on this request
    # a shard that cannot be read as configured: left uncommitted, reported, rerun later
    IO = "io"  # reading failed after retries (network, throttling, a missing file)
    CONFIG = "config"  # the shard does not fit the job's settings (a missing column)
    INTERNAL = "internal"  # a bug of ours met while reading the shard: reported, never blamed on the data


class UniFilterError(Exception):
    """Base of every error raised on purpose in this project."""


class SampleError(UniFilterError, ValueError):
    """A sample that cannot be scored or used; becomes that sample's error record `"<category>: <detail>"`."""

    def __init__(self, category: Category | str, detail: str | None = None):
        if detail is None:  # "decode: corrupt image" given as one string
            category, _, detail = str(category).partition(": ")
        self.category = Category(category)
        self.detail = detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return f"{self.category.value}: {self.detail}"


REASON_CHARS = 500  # an error record's reason is cut to this many characters where its detail can run long


@dataclass(frozen=True)
class SampleFailure:
    """Why one sample has no result, as a value: its category and what happened. Its error record's `error` is
    `reason` ("<category>: <detail>") and its `error_category` the category's value, never parsed back."""

    category: Category
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.category.value}: {self.detail}"

    @classmethod
    def of(cls, err: Exception) -> SampleFailure:
        """A failure preparing one sample: a `SampleError`'s own category and detail, anything unforeseen as a
        preprocessing error naming its type (a sample is never lost to a failure nobody expected)."""
        if isinstance(err, SampleError):
            return cls(err.category, err.detail)
        return cls(Category.PREPROCESS, f"{type(err).__name__}: {err}")

    @classmethod
    def bounded(cls, category: Category, detail: str) -> SampleFailure:
        """One whose detail is cut so that its reason holds at most `REASON_CHARS` characters."""
        return cls(category, detail[:max(0, REASON_CHARS - len(category.value) - 2)])


class CheckpointError(UniFilterError):
    """A checkpoint that cannot be found, read or matched to the model."""


class ConfigFieldError(UniFilterError, ValueError):
    """A setting or input that cannot be used, naming the config field to change (exit status 2)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")
