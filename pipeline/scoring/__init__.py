"""Batch scoring: a corpus' shards -> committed score records (`ScoringJob`, `score_dataset`: what
`python -m jobs.score` runs), reading them back (`read_scores`), and UniFilter as a stage of your own Ray Data
pipeline (`UniFilterScorer`, given a checkpoint or `ScoringSettings`). Nothing here imports torch until a model
stage is set up."""

from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.job import ScoringJob, score_dataset
from pipeline.scoring.public import UniFilterScorer, checked_num_gpus
from pipeline.scoring.records import SCORE_SCHEMA, SCORES_DIR, read_scores
from pipeline.scoring.settings import ScoringSettings

__all__ = ["SCORES_DIR", "SCORE_SCHEMA", "ScoreConfig", "ScoringJob", "ScoringSettings", "UniFilterScorer",
           "checked_num_gpus", "read_scores", "score_dataset"]
