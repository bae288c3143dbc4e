"""Scoring's model stage: a pool of actors, one model replica each (loaded in `setup`), scoring encoded rows in
token-budget micro-batches (`pipeline.scoring.scorer`). A device fault ends the actor's process: Ray restarts it
and retries the batch, and the run's fault journal (`pipeline.scoring.device_faults`) bounds those retries."""

from __future__ import annotations

import os
import sys

import pyarrow as pa

from pipeline.errors import DeviceFault
from pipeline.runner.stage import Resources, TableStage
from pipeline.scoring.scorer import SCORED_SCHEMA


def default_token_budget(on_gpu: bool) -> int:
    """Padded tokens per forward pass when none is set: 32768 on a GPU, 8192 on CPUs."""
    return 32768 if on_gpu else 8192


def load_scorer(model_uri: str, dtype: str, token_budget: int | None, max_batch: int, weights: str | None = None,
                journal=None):
    """The model on this process's device (the GPU when there is one), checked against the weights the run's
    identity names, behind a `BatchScorer`."""
    import torch

    import model as unifilter
    from pipeline.scoring.config import resolve_dtype
    from pipeline.scoring.scorer import BatchScorer, check_weights

    on_gpu = torch.cuda.is_available()
    net, processor = unifilter.load(model_uri, device="cuda" if on_gpu else "cpu",
                                    dtype=getattr(torch, resolve_dtype(dtype, on_gpu)))
    check_weights(model_uri, net.model_id, weights)
    return BatchScorer(net, processor, token_budget or default_token_budget(on_gpu), max_batch, journal=journal)


class ScoreStage(TableStage):
    name = "score"
    schema = SCORED_SCHEMA

    def __init__(self, resources: Resources, model_uri: str, dtype: str, token_budget: int | None, max_batch: int,
                 weights: str | None = None, fault_journal: str | None = None):
        super().__init__(resources)
        self.model_uri, self.dtype, self.token_budget, self.max_batch = model_uri, dtype, token_budget, max_batch
        self.weights, self.fault_journal = weights, fault_journal

    def setup(self) -> None:
        from pipeline.scoring.device_faults import RemoteJournal

        journal = RemoteJournal(self.fault_journal) if self.fault_journal else None
        self.scorer = load_scorer(self.model_uri, self.dtype, self.token_budget, self.max_batch, self.weights,
                                  journal)

    def process_table(self, table: pa.Table) -> pa.Table:
        try:
            return self.scorer.score_table(table)
        except DeviceFault as fault:
            print(f"[score] device error in a scoring actor ({fault.first_line}); ending it so Ray restarts it and "
                  "retries the batch", file=sys.stderr, flush=True)
            os._exit(3)
