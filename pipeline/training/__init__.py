"""Classifier training on Ray Train (V2): `train_classifier(TrainConfig)` is what `python -m jobs.train` calls.

Pairs arrive as Ray Datasets, encoded on CPU by the same processor the scorer uses. The default is the released
recipe: vision tower frozen; projector, LLM and score head trained; one regression output with MSE (4-way
cross-entropy as an option); AdamW with a cosine schedule and warmup; gradient accumulation; bf16 autocast and
gradient checkpointing on GPU; token-budget micro-batches. `stage: projector` trains the projector alone (LLaVA's
stage 1). Each epoch validates (accuracy per kind and level, MAE, Spearman, confusion matrix) and reports a
checkpoint; the best by validation accuracy is exported to `OUTPUT/best/`, a checkpoint `jobs.score --model` loads
directly. Rerunning with the same `name` and storage resumes from the furthest checkpoint.

Modules: `config` (TrainConfig), `data` (pairs -> encoded datasets), `metrics`, `state` (optimizer state, finding
checkpoints), `loop` (one worker's TrainLoop, no Ray), `worker` (the Ray Train worker function), `driver`.
"""

from pipeline.training.config import TrainConfig
from pipeline.training.driver import TrainingStalled, train_classifier
from pipeline.training.metrics import spearman, validation_metrics
from pipeline.training.summary import dry_run_plan, format_summary

__all__ = ["TrainConfig", "TrainingStalled", "dry_run_plan", "format_summary", "spearman", "train_classifier", "validation_metrics"]
