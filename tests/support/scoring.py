"""Scoring jobs whose model stage is swapped for a test's subclass (a stage that injects a fault, or waits), built
with the arguments the job gives its own."""

from __future__ import annotations

from pipeline.runner import run_job
from pipeline.scoring import ScoreConfig, ScoringJob
from pipeline.scoring.stage import ScoreStage


class ScoringWith(ScoringJob):
    """A scoring job whose model stage is `stage_class`, built with the arguments the job gives its own."""

    def __init__(self, config: ScoreConfig, stage_class: type[ScoreStage], sources: dict | None = None):
        super().__init__(config, sources)
        self.stage_class = stage_class

    def model_stage(self, resources):
        stage = super().model_stage(resources)
        stage.__class__ = self.stage_class  # the job's own stage, arguments and all, with the test's hooks
        return stage


def score_with(stage_class: type[ScoreStage], config: ScoreConfig) -> tuple[ScoringJob, dict]:
    job = ScoringWith(config, stage_class)
    return job, run_job(job, progress=False)
