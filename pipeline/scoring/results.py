"""The values a scoring call passes between its steps (`pipeline.scoring.scorer`, `pipeline.scoring.narrowing`): a
micro-batch prepared for the device, and what became of each sample: its score, or its failure
(`model.errors.SampleFailure`; `ScoreFailure` when the model failed on it alone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.errors import Category, SampleFailure


@dataclass(frozen=True)
class Scored:
    """A sample's result from the model: its score and label, the 4 level probabilities of a 4-way head (None for
    a regression head), and the size of the micro-batch it was scored in."""

    score: float
    label: int
    probs: list[float] | None
    micro_batch: int


@dataclass(frozen=True)
class ScoreFailure(SampleFailure):
    """The model failed on this sample alone (category `score`). `cause`: what failed, without what varies per
    sample (its size in tokens), so failures of one cause are told apart from the samples' own."""

    category: Category = Category.SCORE
    detail: str = ""
    cause: str = ""


Result = Scored | SampleFailure  # what a call holds for each of its rows


@dataclass(frozen=True)
class PreparedBatch:
    """A micro-batch's host side, done ahead of the device: the rows whose images decoded (`group`, in order), the
    failures of those that did not, the collated tensors (`input_ids`, `attention_mask`, `pixel_values`: on the
    device, or their copy to it started on the side stream, `ready` its end), or the error that preparing them
    raised, told apart when the micro-batch is scored."""

    group: list[int]
    failed: dict[int, SampleFailure] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    ready: Any = None  # a torch.cuda.Event on a GPU
    error: Exception | None = None
