"""The pipeline's exceptions, all of them, on the model library's one hierarchy (`model.errors`); and `reason_key`,
how error reasons are counted."""

from __future__ import annotations

import re

from model.errors import Category, CheckpointError, ConfigFieldError, SampleError, UniFilterError

__all__ = ["BrokenWorker", "Category", "CheckpointError", "CompileFailed", "ConfigError", "ConfigFieldError",
           "Interrupted", "CorruptState", "DeviceFault", "InputError", "LeaseLost", "OutputBusy", "OutputMismatch",
           "SampleError", "ShardFault", "TrainingStalled", "UniFilterError", "reason_key"]


class InputError(ConfigFieldError):
    """A job's input or setting that cannot be used (nothing at the URI, no shards, no usable checkpoint, a column
    the first shard lacks). The jobs report it like a bad flag: one line naming the field, exit status 2."""


class OutputBusy(InputError):
    """Another job holds the output's lease."""

    def __init__(self, problem: str):
        super().__init__("output", problem)


class CorruptState(InputError):
    """A state file of an output (its identity, its lease, a commit record or manifest part) that cannot be read:
    the message names the file and what to do. Reported like a bad setting: one line, exit status 2."""

    def __init__(self, problem: str, field: str = "output"):
        super().__init__(field, problem)


class OutputMismatch(InputError):
    """The output belongs to another model or other score-changing settings: a run never mixes them."""


class ShardFault(UniFilterError):
    """A shard that cannot be read as configured (an I/O failure after retries, a missing column). Not bad data:
    the shard stays uncommitted, the summary names it with this reason, and a rerun tries it again."""

    def __init__(self, category: Category, detail: str):
        self.category = Category(category)
        self.detail = detail
        super().__init__(f"{self.category.value}: {detail}")


class LeaseLost(UniFilterError):
    """This job no longer holds its output's lease (it could not renew it, or another job took it over)."""


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"(?:[a-z][a-z0-9+.-]*://|/)[^\s()\[\],;]*[^\s()\[\],;:.]|[\w.-]+(?:/[\w.-]+)+", re.I)
_FILENAME = re.compile(r"\b[\w.-]+\.(?:jpe?g|png|webp|gif|bmp|tiff?|txt|json|tar|parquet)\b", re.I)
_NUMBER = re.compile(r"0x[0-9a-f]+|\d+x\d+|(?<![A-Za-z_-])\d+(?:\.\d+)?", re.I)


def reason_key(reason: str, limit: int = 160) -> str:
    """An error reason with what varies from sample to sample taken out (quoted names, paths and URIs, numbers),
    so that summaries count reasons, not samples: `decode: image too large: 20000x20000 pixels ...` and the same
    with 9000x9000 are one reason; a truncated JPEG and a zero-byte image are two."""
    text = _QUOTED.sub("'…'", str(reason))
    text = _PATHLIKE.sub("<path>", text)
    text = _FILENAME.sub("<file>", text)
    text = _NUMBER.sub(lambda m: "N" if m.group(0).lower().startswith("0x") or "x" not in m.group(0) else "NxN", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DeviceFault(UniFilterError):
    """The device failed (not the sample): the actor must end so Ray restarts it and retries the batch.
    `samples`: the micro-batch that met it (indices of the call's rows to score), when one did; `canary`: the
    canary sample met it (the device is broken); `unattributed`: met while preparing a micro-batch after another
    call's forward met a device error (that forward's call records the fault, not this one)."""

    def __init__(self, message: str, samples: list[int] | None = None, canary: bool = False,
                 unattributed: bool = False):
        super().__init__(message)
        self.samples = samples
        self.canary = canary
        self.unattributed = unattributed

    @property
    def first_line(self) -> str:
        return (str(self).strip().splitlines() or [""])[0][:300]


class BrokenWorker(UniFilterError):
    """Workers that keep failing: whatever the data (their device faults, or their process dies, on a synthetic
    sample time after time), or on one input until Ray's bounded retries are spent (a score file that kills curation's
    pass). The run ends with this one line, naming what kept dying; nothing is retried forever."""


class CompileFailed(UniFilterError):
    """torch.compile could not compile the scoring model (not a sample's fault, and not the device's): the call
    fails whole, nothing of it is committed, and the message says to score without compiling."""


class TrainingStalled(UniFilterError):
    """No training step for `no_progress_timeout_s`: the run was stopped."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C outside a run's commits (while it started, or ended): says what the output held before the run, for
    the line the entry point prints (still a KeyboardInterrupt: exit status 130)."""


class ConfigError(UniFilterError):
    """A configuration that cannot be used (possibly several fields at once): exit status 2."""
