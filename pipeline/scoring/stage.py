"""Scoring's model stage: a pool of actors, one model replica each (loaded in `setup`), each scoring the samples it
receives with its own decode threads beside the device (`pipeline.scoring.scorer`). Two calls run at once on an
actor, so one call's decoding overlaps the other's last micro-batches. A device fault ends the actor's process
(`pipeline.runner.stage.StageActor`), and so does a kill (out of memory, a crash): Ray restarts it and retries the
batch, and the run's fault journal (`pipeline.scoring.device_faults`: a named actor on Ray, in memory with the local
executor) bounds those retries, narrowing a batch down to the sample that ends its worker."""

from __future__ import annotations

import pyarrow as pa

from model.limits import DEFAULT_DECODE_MEMORY, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.runner.stage import Resources, TableStage
from pipeline.scoring.device_faults import (
    CANARY_FAILURES_BEFORE_GIVING_UP,
    CULPRITS_PER_CALL,
    DEATHS_PER_CULPRIT,
)
from pipeline.scoring.scorer import SCORED_SCHEMA


def default_token_budget(on_gpu: bool) -> int:
    """Padded tokens per forward pass when none is set: 32768 on a GPU, 8192 on CPUs."""
    return 32768 if on_gpu else 8192


def load_scorer(model_uri: str, dtype: str = "auto", token_budget: int | None = None, max_batch: int = 256,
                weights: str | None = None, journal=None, decode_threads: int = 1,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, jpeg_draft: bool = False, compiled: bool | None = None,
                image_decoder: str = "pillow", decode_memory: int = DEFAULT_DECODE_MEMORY):
    """The model on this process's device (the GPU when there is one), checked against the weights the run's
    identity names, behind a `BatchScorer`; compiled on a GPU unless `compiled` says otherwise; its JPEGs decoded
    on that device with `image_decoder="nvjpeg"` (`pipeline.scoring.gpu_decode`); its decode threads holding
    `decode_memory` bytes of decoded pixels at once (`model.processing.DecodeBudget`)."""
    import torch

    import model as unifilter
    from model.processing import DecodeBudget
    from pipeline.scoring.config import resolve_dtype
    from pipeline.scoring.scorer import BatchScorer
    from pipeline.scoring.weights import check_weights

    if image_decoder not in ("pillow", "nvjpeg"):
        raise ValueError(f"image_decoder: {image_decoder!r} is neither 'pillow' nor 'nvjpeg'")
    if image_decoder == "nvjpeg" and jpeg_draft:
        raise ValueError("image_decoder: nvjpeg decodes JPEGs at full size, so jpeg_draft cannot apply")
    if image_decoder == "nvjpeg":  # before the model loads: a missing torchvision is said at once
        from pipeline.scoring.gpu_decode import require_torchvision

        require_torchvision()
    on_gpu = torch.cuda.is_available()
    net, processor = unifilter.load(model_uri, device="cuda" if on_gpu else "cpu",
                                    dtype=getattr(torch, resolve_dtype(dtype, on_gpu)))
    check_weights(model_uri, net.model_id, weights)
    processor.max_image_pixels, processor.jpeg_draft = max_image_pixels, jpeg_draft
    processor.decode_budget = DecodeBudget(decode_memory)
    scorer = BatchScorer(net, processor, token_budget or default_token_budget(on_gpu), max_batch, decode_threads,
                         journal, image_decoder=image_decoder)
    if on_gpu if compiled is None else compiled:
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

    def __init__(self, resources: Resources, model_uri: str, dtype: str, token_budget: int | None, max_batch: int,
                 decode_threads: int, max_image_pixels: int, jpeg_draft: bool = False, compiled: bool | None = None,
                 weights: str | None = None, fault_journal=None, image_decoder: str = "pillow",
                 decode_memory: int = DEFAULT_DECODE_MEMORY):
        super().__init__(resources)
        self.model_uri, self.dtype, self.token_budget, self.max_batch = model_uri, dtype, token_budget, max_batch
        self.decode_threads, self.max_image_pixels, self.jpeg_draft = decode_threads, max_image_pixels, jpeg_draft
        self.compiled, self.weights, self.fault_journal = compiled, weights, fault_journal
        self.image_decoder, self.decode_memory = image_decoder, decode_memory

    def setup(self) -> None:
        from pipeline.scoring.device_faults import RemoteJournal

        journal = RemoteJournal(self.fault_journal) if isinstance(self.fault_journal, str) else self.fault_journal
        self.scorer = load_scorer(self.model_uri, self.dtype, self.token_budget, self.max_batch, self.weights, journal,
                                  self.decode_threads, self.max_image_pixels, self.jpeg_draft, self.compiled,
                                  self.image_decoder, self.decode_memory)

    def process_table(self, table: pa.Table) -> pa.Table:
        return self.scorer.score_table(table)  # a DeviceFault ends the actor (`StageActor`): Ray retries the batch
