"""Scoring's model stage: a pool of actors, one model replica each (loaded in `setup` with the run's
`ScoringSettings`, its threads ended in `teardown`), each scoring the samples it receives with its own decode threads
beside the device (`pipeline.scoring.scorer`). Two calls run at once on an
actor, so one call's decoding overlaps the other's last micro-batches. A device fault ends the actor's process
(`pipeline.runner.stage.StageActor`), and so does a kill (out of memory, a crash): Ray restarts it and retries the
batch, and the run's fault journal (`pipeline.scoring.device_faults`: a named actor on Ray, in memory with the local
executor) bounds those retries, narrowing a batch down to the sample that ends its worker."""

from __future__ import annotations

import pyarrow as pa

from pipeline.runner.stage import Resources, TableStage
from pipeline.scoring.device_faults import (
    CANARY_FAILURES_BEFORE_GIVING_UP,
    CULPRITS_PER_CALL,
    DEATHS_PER_CULPRIT,
)
from pipeline.scoring.scorer import SCORED_SCHEMA
from pipeline.scoring.settings import ScoringSettings


def load_scorer(settings: ScoringSettings | str, journal=None):
    """The model on this process's device (the GPU when there is one), with `settings` (a checkpoint URI alone:
    the defaults) decided for that device (`ScoringSettings.on_device`), checked against the weights they name,
    behind a `BatchScorer`: compiled where they say so, its JPEGs decoded on the device with
    `image_decoder="nvjpeg"` (`pipeline.scoring.gpu_decode`). What is in flight and device faults go into
    `journal` (the run's; an in-memory one by default)."""
    import torch

    import model as unifilter
    from pipeline.scoring.scorer import BatchScorer
    from pipeline.scoring.weights import check_weights

    if isinstance(settings, str):
        settings = ScoringSettings(model=settings)
    if settings.image_decoder == "nvjpeg":  # before the model loads: a missing torchvision is said at once
        from pipeline.scoring.gpu_decode import require_torchvision

        require_torchvision()
    on_gpu = torch.cuda.is_available()
    settings = settings.on_device(on_gpu)
    net, processor = unifilter.load(settings.model, device="cuda" if on_gpu else "cpu",
                                    dtype=getattr(torch, settings.dtype), decoding=settings.decoding)
    check_weights(settings.model, net.model_id, settings.weights)
    scorer = BatchScorer(net, processor, settings.token_budget, settings.max_batch, settings.decode_threads,
                         journal, image_decoder=settings.image_decoder)
    if settings.compile:
        from pipeline.scoring.compiled import compile_scorer

        compile_scorer(scorer)
    return scorer


class ScoreStage(TableStage):
    name = "score"
    schema = SCORED_SCHEMA
    # Each culprit costs its call DEATHS_PER_CULPRIT restarts before the journal narrows it down, and the call beside
    # it on the same actor is retried as often: room for CULPRITS_PER_CALL in each, and the canary's failures.
    call_retries = 2 * CULPRITS_PER_CALL * DEATHS_PER_CULPRIT + CANARY_FAILURES_BEFORE_GIVING_UP
    # Over an actor's life: room for 256 culprits (the journal bounds each call; broken workers end the run after
    # CANARY_FAILURES_BEFORE_GIVING_UP canary failures, whatever this bound).
    restarts = 256 * DEATHS_PER_CULPRIT

    def __init__(self, resources: Resources, settings: ScoringSettings, fault_journal=None):
        super().__init__(resources)
        self.settings = settings
        self.fault_journal = fault_journal  # the run's journal, or its actor's name on Ray
        self.scorer = None

    def setup(self) -> None:
        from pipeline.scoring.device_faults import RemoteJournal

        journal = RemoteJournal(self.fault_journal) if isinstance(self.fault_journal, str) else self.fault_journal
        self.scorer = load_scorer(self.settings, journal)

    def process_table(self, table: pa.Table) -> pa.Table:
        return self.scorer.score_table(table)  # a DeviceFault ends the actor (`StageActor`): Ray retries the batch

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
