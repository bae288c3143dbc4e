"""Classifier training on Ray Train (V2): `train_classifier(TrainConfig)` is what `python -m jobs.train` calls.

Pairs arrive as Ray Datasets, encoded on CPU by the same processor the scorer uses. The default is the released
recipe: vision tower frozen; projector, LLM and score head trained; one regression output with MSE (4-way
cross-entropy as an option); AdamW with a cosine schedule and warmup; gradient accumulation; bf16 autocast and
gradient checkpointing on GPU; token-budget micro-batches. `stage: projector` trains the projector alone (LLaVA's
stage 1). Each epoch validates (accuracy per kind and level, MAE, Spearman, confusion matrix) and reports a
checkpoint; the best by validation accuracy is exported to `OUTPUT/best/`, a checkpoint `jobs.score --model` loads
directly. Rerunning with the same `name` and storage resumes from the furthest checkpoint.

Modules: `config` (TrainConfig), `preflight` (checks before Ray starts), `data` (pairs -> encoded datasets),
`metrics`, `state` (optimizer state, finding checkpoints), `loop` (one worker's TrainLoop, no Ray), `worker` (the
Ray Train worker function), `driver`.
"""

import importlib

from pipeline.errors import TrainingStalled
from pipeline.training.config import TrainConfig

# The rest loads on first use: torch and transformers take seconds to import, and a bad flag is reported first.
_LAZY = {"train_classifier": "driver", "spearman": "metrics",
         "validation_metrics": "metrics", "dry_run_plan": "summary", "format_summary": "summary"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipeline.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainingStalled", "dry_run_plan", "format_summary", "spearman", "train_classifier",
           "validation_metrics"]
