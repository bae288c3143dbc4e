"""What `python -m jobs.train` checks before Ray starts, each refusal one line naming the field in seconds (Ray's
start-up and a dataset count took 35-45 s to say `val` was missing): the pairs of both splits, the output and the
checkpoint storage writable, the `init` checkpoint there; and a run that already finished, which a rerun would only
resume past its last epoch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import InputError
from pipeline.io.counting import count_samples
from pipeline.io.listing import list_shards
from pipeline.io.publish import read_json
from pipeline.io.uris import join
from pipeline.runner.prepare import check_writable
from pipeline.training.config import TrainConfig

SUMMARY_NAME = "train_summary.json"


@dataclass
class Preflight:
    pairs: dict[str, int | None]  # "train"/"val" -> pairs in the split (from the Parquet footers)
    resume: tuple[str, dict] | None  # the furthest checkpoint of this run name: (its URI, its train state)
    finished: dict | None  # the summary of this run when it already finished, else None


def check_before_start(config: TrainConfig) -> Preflight:
    """Every path and setting that can be checked without Ray, the cheap ones first (nothing here imports torch
    until the pairs, outputs and init are known good)."""
    pairs = {}
    for split, uri in (("train", config.train), ("val", config.val)):
        listing = list_shards(uri, "parquet", field=split)
        pairs[split], _ = count_samples(listing.shards, "parquet")
        if pairs[split] == 0:  # validation ranks the checkpoints: without pairs there is no ranking
            raise InputError(split, f"no {split} pairs at {uri} (jobs.synth writes them to OUTPUT/{split}/)")
    check_writable(config.output, create=False)
    check_writable(config.storage_uri, create=False, field="storage")
    if config.init:
        from model.locate import checkpoint_problem

        if problem := checkpoint_problem(config.init):
            raise InputError("init", problem)
    from pipeline.training.state import latest_checkpoint

    resume = latest_checkpoint(config.storage_uri, config.name)
    return Preflight(pairs, resume, finished_summary(config, resume))


def finished_summary(config: TrainConfig, resume: tuple[str, dict] | None) -> dict | None:
    """This run's summary when it finished: its furthest checkpoint ends its last epoch (or reached max_steps) and
    its best checkpoint was exported (the summary is written after). None when there is anything left to do."""
    if resume is None:
        return None
    state = resume[1]
    done = (state["epoch"] >= config.epochs and not state.get("batches_into_epoch")) or \
        bool(config.max_steps and state["step"] >= config.max_steps)
    if not done:
        return None
    summary = read_json(join(config.output, SUMMARY_NAME), field="output",
                        remedy="delete it and rerun (the run exports its best checkpoint again)")
    if summary is None or summary.get("name") != config.name or summary.get("storage") != config.storage_uri:
        return None  # trained, not yet exported: the rerun exports it
    return summary
