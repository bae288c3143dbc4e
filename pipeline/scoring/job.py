"""Batch scoring on Ray Data: shards -> samples -> CPU preprocessing -> a pool of model actors -> committed
Parquet score records. `prepare_scoring` + `run_scoring` is what `python -m jobs.score` calls (`score_dataset` does
both, for code that has already connected to Ray)."""

from __future__ import annotations

import sys
import time
from typing import Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import CheckpointError, InputError
from pipeline.resources import current_view, decode_workers, gpus_per_actor, model_dtype
from pipeline.runner import (
    PreparedJob,
    ShardJob,
    Stage,
    check_writable,
    claim,
    common_summary,
    execute,
    prepare,
    summary_tail,
    write_summary,
)
from pipeline.sinks import SCORE_SCHEMA
from pipeline.sources import SourceOptions
from pipeline.sources.sniff import check_first_shard
from pipeline.storage import list_shards

# torch and transformers (seconds to import) load with the first function that needs them, so a bad flag or
# YAML key is reported at once.


def load_processor(uri: str):
    from model.checkpoint import load_processor

    return load_processor(uri)


def _scoring_actor() -> type:
    from pipeline.scorer import ScoringActor

    return ScoringActor


def __getattr__(name: str):
    if name == "ScoringActor":
        return _scoring_actor()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ScoreConfig(BaseModel):
    """`python -m jobs.score`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="input shards: a directory, s3:// prefix, glob, {000..999} range or .txt list")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] = Field(description="input format")
    output: str = Field(description="output directory or s3:// prefix")
    model: str = Field(description="checkpoint: local dir, s3:// prefix or Hugging Face hub id")
    concurrency: int = Field(1, ge=1, description="most scoring actors (the pool autoscales up to this)")
    min_actors: int = Field(1, ge=1, description="fewest scoring actors kept alive")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per scoring actor (0.5 packs two per GPU); default: 1 on a cluster reached "
                                "through RAY_ADDRESS (which must have or be able to start GPU nodes), else 1 if "
                                "this machine has a GPU")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per scoring actor")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per preprocessing (decode + tokenize) worker")
    preprocess_workers: int | None = Field(
        None, ge=1, description="most preprocessing (decode) workers; default: 4 per GPU scoring actor on a cluster, "
                                "this machine's CPUs not reserved for scoring when local")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger images are errors (decompression bombs)")
    jpeg_draft: bool = Field(
        False, description="decode large JPEGs at reduced scale (1.4x faster preprocessing, <1 grey level mean diff)")
    batch_size: int | None = Field(
        None, ge=1, description="rows handed to a scoring actor per call; default 4 x max_batch, so micro-batches "
                                "fill up to max_batch or the token budget")
    token_budget: int | None = Field(
        None, ge=64, description="padded tokens per forward pass (rows x longest); default 32768 on GPU, 8192 on CPU")
    max_batch: int = Field(256, ge=1, description="most samples per forward pass")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="model precision; auto: bfloat16 on GPU, float32 on CPU")
    source: SourceOptions = Field(default_factory=SourceOptions, description="how inputs are read")
    moved_from: str | None = Field(
        None, description="the input root this output's committed shards were read from, when the corpus has moved "
                          "since (they are not scored again); default: none (a shard committed from another "
                          "location is refused)")
    no_progress_timeout_s: float = Field(
        3600.0, gt=0, description="seconds the job may make no progress (e.g. waiting for GPU nodes to start)")
    gpu_rate: float | None = Field(
        None, gt=0, description="for --dry-run's estimate: samples/s one GPU scores; default: the README's reference "
                                "rates for one H200 (captions: 379/s up to 1B parameters, 282/s above; documents: a "
                                "quarter of that)")
    gpu_hour_price: float = Field(5.0, ge=0, description="for --dry-run's estimate: USD per GPU-hour")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ScoreConfig:
        if self.min_actors > self.concurrency:
            raise ValueError(f"min_actors ({self.min_actors}) exceeds concurrency ({self.concurrency})")
        return self

    def resolved_dtype(self) -> str:
        """The precision the actors will use (`auto` resolved the way they resolve it)."""
        return model_dtype(self.dtype, self.gpus_per_actor)

    def identity(self, model_id: str, weights: str | None = None) -> dict:
        """What the output's records depend on: the model (its weights' digest) and the settings that change
        scores."""
        revision = model_id.rsplit("@", 1)[1] if "@" in model_id else None
        s = self.source
        return {"model": {"id": model_id, "revision": revision, "weights": weights}, "dtype": self.resolved_dtype(),
                "jpeg_draft": self.jpeg_draft,
                "max_image_pixels": self.max_image_pixels,
                "columns": [s.image_column, s.text_column, s.texts_column, s.images_column, s.id_column]}


def locate_model(uri: str) -> None:
    """A model URI that cannot be a checkpoint fails in milliseconds (before torch loads), naming the field."""
    from model.locate import checkpoint_problem

    problem = checkpoint_problem(uri)
    if problem:
        raise InputError("model", problem)


def check_model(uri: str) -> tuple[object, str, str]:
    """Config and tokenizer only (no weights read, beyond a local checkpoint's digest): fails fast on a bad URI;
    returns (processor, the model id records carry, the weights' digest)."""
    from model.digest import weights_digest

    locate_model(uri)
    try:
        processor, model_id = load_processor(uri)
        return processor, model_id, weights_digest(uri, model_id.rsplit("@", 1)[-1] if "@" in model_id else None)
    except (CheckpointError, OSError, ValueError) as err:
        raise InputError("model", str(err)) from None


def scoring_job(config: ScoreConfig) -> tuple[ShardJob, str]:
    """What the job is, from what can be checked without writing anything or starting Ray: the shards, the first
    shard's columns and records, the model and its weights."""
    check_writable(config.output, create=False)  # the cheap checks first: a typo is reported at once
    locate_model(config.model)
    listing = list_shards(config.input, config.format)
    check_first_shard(listing, config.format, config.source)
    _, model_id, weights = check_model(config.model)
    spec = ShardJob(job="score", output=config.output, listing=listing, identity=config.identity(model_id, weights),
                    schema=SCORE_SCHEMA, no_progress_timeout_s=config.no_progress_timeout_s, format=config.format,
                    moved_from=config.moved_from)
    return spec, model_id


def prepare_scoring(config: ScoreConfig, started: float | None = None, dry_run: bool = False
                    ) -> tuple[PreparedJob, str]:
    """The job surveyed (`dry_run`: nothing written, no lease) or claimed (the output's lease held, its identity
    recorded)."""
    spec, model_id = scoring_job(config)
    return prepare(spec, started, dry_run), model_id


def _resources(config: ScoreConfig, sources: dict[str, str]) -> tuple[dict, dict]:
    """(what the job asks for, why): sized from what the cluster can scale to (`pipeline.resources`)."""
    view = current_view()
    gpus = gpus_per_actor(config.gpus_per_actor, sources.get("gpus_per_actor", "default"), view)
    decode = decode_workers(config.preprocess_workers, sources.get("preprocess_workers", "default"), view,
                            config.concurrency, config.cpus_per_actor, gpus.value)
    values = {"min_actors": config.min_actors, "max_actors": config.concurrency, "gpus_per_actor": gpus.value,
              "cpus_per_actor": config.cpus_per_actor, "preprocess_workers": decode.value,
              "preprocess_cpus": config.preprocess_cpus, "no_progress_timeout_s": config.no_progress_timeout_s}
    why = {"gpus_per_actor": gpus.why, "preprocess_workers": decode.why,
           "max_actors": sources.get("concurrency", "default")}
    return values, why


def stages(config: ScoreConfig, resources: dict, actor_cls: type | None = None,
           fault_journal: str | None = None, weights: str | None = None) -> list[Stage]:
    from pipeline.preprocess import ShardEncoder

    return [
        # Read + decode + tokenize whole shards on CPU actors (the processor loads once per actor), apart from
        # the model actors so the GPU never waits on JPEG decoding.
        Stage("preprocess", ShardEncoder, {"model_uri": config.model, "fmt": config.format, "options": config.source,
                                           "max_image_pixels": config.max_image_pixels,
                                           "jpeg_draft": config.jpeg_draft},
              num_cpus=config.preprocess_cpus, max_actors=resources["preprocess_workers"]),
        # Ray Data restarts a crashed actor and retries its batches (max_restarts=-1); the run's fault journal
        # bounds the retries of a batch whose data faults the device (pipeline.device_faults).
        Stage("score", actor_cls or _scoring_actor(), {"model_uri": config.model, "dtype": config.resolved_dtype(),
                                   "token_budget": config.token_budget, "max_batch": config.max_batch,
                                   "fault_journal": fault_journal, "weights": weights},
              num_cpus=config.cpus_per_actor, num_gpus=resources["gpus_per_actor"],
              min_actors=config.min_actors, max_actors=config.concurrency,
              batch_size=config.batch_size or 4 * config.max_batch),
    ]


def run_scoring(surveyed: PreparedJob, config: ScoreConfig, model_id: str, progress: bool = True,
                actor_cls: type | None = None, sources: dict[str, str] | None = None) -> dict:
    """Score every sample of the shards not yet committed; returns (and writes) the summary. The resources are
    sized before the output is claimed, so a job the cluster cannot run writes nothing."""
    resources, why = _resources(config, sources or {}) if surveyed.todo else ({}, {})
    prepared = surveyed if surveyed.lease is not None else claim(surveyed.spec, surveyed.started)
    try:
        return _run_claimed(prepared, config, model_id, progress, actor_cls, resources, why)
    finally:
        if prepared.lease is not None:
            prepared.lease.release()


def _run_claimed(prepared: PreparedJob, config: ScoreConfig, model_id: str, progress: bool, actor_cls,
                 resources: dict, why: dict) -> dict:
    for note in prepared.notes:
        print(f"[score] note: {note}", file=sys.stderr, flush=True)
    if progress and prepared.todo:
        print(f"[score] asking for {resources['max_actors']} scoring actor(s) x {resources['gpus_per_actor']:g} GPU "
              f"({why['gpus_per_actor']}) and {resources['preprocess_workers']} decode workers "
              f"({why['preprocess_workers']})", file=sys.stderr, flush=True)
    batch_sizes, lowered = [], {}

    def device_batches(batch) -> None:  # how full the device's micro-batches were; budgets lowered, by actor
        sizes = batch.column("micro_batch").drop_null()
        if len(sizes):
            batch_sizes.append((pa.compute.sum(sizes).as_py(), len(sizes), pa.compute.max(sizes).as_py()))
        lowered.update((r["actor"], r) for r in batch.column("budget_lowered").drop_null().to_pylist())

    journal = _journal() if prepared.todo else None
    try:
        planned = stages(config, resources, actor_cls, journal and journal.name,
                         prepared.spec.identity["model"].get("weights")) if prepared.todo else []
        result = execute(prepared, planned, progress, on_batch=device_batches)
        device_faults = journal.stats() if journal else {}
    finally:
        if journal:
            journal.stop()
    c = result.committer
    common = common_summary(prepared, result)
    committed_before = prepared.committed
    summary = {
        "input": config.input, "input_root": prepared.spec.listing.root, "format": config.format,
        "output": config.output, "model": model_id,
        "shards": {**{k: common["shards"][k] for k in ("total", "already_committed", "new")},
                   "scored_this_run": len(c.committed), "incomplete": common["shards"]["incomplete"]},
        "incomplete_reasons": common["incomplete_reasons"],
        "duplicates_in_input": common["shards"]["duplicates_in_input"],
        "duplicate_spellings": common["shards"]["duplicate_spellings"],
        "resources": resources,
        "resources_why": why,
        "samples_this_run": c.samples,
        "scored_this_run": c.scored,
        "errors_this_run": c.errors.total(),
        "every_sample_failed": bool(c.samples) and not c.scored,
        "truncated_this_run": c.truncated,
        "errors_by_category": common["errors_by_category"],
        "errors_by_reason": common["errors_by_reason"],
        "error_examples": common["error_examples"],
        "elapsed_s": common["elapsed_s"],
        "throughput_samples_per_s": common["samples_per_s"],
        "micro_batch_rows": _micro_batch_stats(batch_sizes, config.max_batch),
        "token_budget_lowered": _lowered_budgets(lowered),
        "device_faults": device_faults,
        "committed_shards_total": len(committed_before) + len(c.committed),
        "committed_samples_total": sum(e["records"] for e in committed_before.values()) + c.samples,
    }
    for key in ("startup_s", "startup_samples", "steady_samples_per_s", "aborted", "interrupted"):
        if key in common:
            summary[key] = common[key]
    write_summary(prepared, result, summary)
    return summary


def _micro_batch_stats(sizes: list[tuple[int, int, int]], configured: int) -> dict:
    """How full the device's micro-batches were: the micro-batch size the average sample was scored in, and the
    largest, against `max_batch` (the token budget may cap them lower for long samples)."""
    rows = sum(n for _, n, _ in sizes)
    return {"mean": round(sum(t for t, _, _ in sizes) / rows, 1) if rows else None,
            "max": max((m for _, _, m in sizes), default=None), "configured": configured}


def _lowered_budgets(lowered: dict[str, dict]) -> dict | None:
    """Actors that lowered their token budget after an out-of-memory error: how many, from what, to how low."""
    if not lowered:
        return None
    return {"actors": len(lowered), "from": max(r["from"] for r in lowered.values()),
            "to": min(r["to"] for r in lowered.values())}


def _journal():
    from pipeline.device_faults import JournalActor

    return JournalActor()


def score_dataset(config: ScoreConfig, progress: bool = True, actor_cls: type | None = None) -> dict:
    """survey + run, on the Ray instance this process is connected to."""
    surveyed, model_id = prepare_scoring(config, time.time(), dry_run=True)
    return run_scoring(surveyed, config, model_id, progress, actor_cls)


# Reference rates on one H200 (README, "Running on a cluster"): captions/s with bf16 batching.
REFERENCE_RATES = ((1.0e9, 379.0), (float("inf"), 282.0))


def dry_run_plan(config: ScoreConfig) -> str:
    """What a run would do and cost: shards, samples, the model, GPU-hours at a rate. Starts nothing."""
    from pipeline.plan import count_samples, human, parameter_count

    prepared, model_id = prepare_scoring(config, dry_run=True)
    processor, _ = load_processor(config.model)
    params = parameter_count(processor.config)
    samples, how = count_samples(prepared.todo, config.format, config.source)
    rate = config.gpu_rate
    rate_source = "--gpu-rate"
    if rate is None:
        rate = next(r for limit, r in REFERENCE_RATES if params <= limit)
        if config.format in ("obelics", "interleaved-wds"):
            rate /= 4
        rate_source = "the reference rate for a model of this size (set --gpu-rate to your own)"
    s = prepared
    lines = [
        f"UniFilter scoring, dry run (nothing started, nothing written): {config.input} ({config.format}) -> "
        f"{config.output}",
        f"  shards     {len(s.shards)} total · {len(s.committed)} already committed · {len(s.todo)} new",
        *(f"  note       {note}" for note in s.notes),
        f"  samples    {'unknown' if samples is None else f'{samples:,}'} in the new shards ({how})",
        f"  model      {model_id} · {human(params)} parameters · {config.resolved_dtype()}"
        + (" (auto: bfloat16 on GPU, float32 on CPU)" if config.dtype == "auto" else ""),
    ]
    if samples is not None:
        hours = samples / rate / 3600
        lines.append(f"  estimate   {hours:,.2f} GPU-hours at {rate:g} samples/s per GPU ({rate_source}) · "
                     f"${hours * config.gpu_hour_price:,.2f} at ${config.gpu_hour_price:g} per GPU-hour "
                     "(--gpu-hour-price)")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The one-screen summary a job prints at the end."""
    s = summary["shards"]
    speed = f"{summary['throughput_samples_per_s']} samples/s over the whole job ({summary['elapsed_s']} s)"
    if not summary["samples_this_run"]:
        speed = (f"nothing scored: the run stopped ({summary['elapsed_s']} s)" if s["new"] else
                 f"nothing new to score ({summary['elapsed_s']} s)")
    elif summary.get("steady_samples_per_s"):
        speed += f"; {summary['steady_samples_per_s']} samples/s after start-up ({summary['startup_s']} s)"
    lines = [
        f"UniFilter scoring: {summary['input']} ({summary['format']}) -> {summary['output']}",
        f"  model      {summary['model']}",
        f"  shards     {s['total']} total · {s['already_committed']} already committed (skipped) · {s['new']} new · "
        f"{s['scored_this_run']} scored now · {len(s['incomplete'])} incomplete",
        f"  samples    {summary['samples_this_run']} this run · {summary['scored_this_run']} scored · "
        f"{summary['errors_this_run']} errors · {summary['truncated_this_run']} truncated",
        f"  speed      {speed}",
        f"  committed  {summary['committed_samples_total']} samples in {summary['committed_shards_total']} shards "
        f"(read them with pipeline.sinks.read_scores)",
    ]
    if summary.get("duplicates_in_input"):
        lines.append(f"  note       {summary['duplicates_in_input']} input entries named a shard already listed "
                     "(each shard is scored once)")
        for key, spelled in summary.get("duplicate_spellings", {}).items():
            lines.append(f"             {key} was named as {', '.join(map(repr, spelled))}")
    return "\n".join(lines + _device_lines(summary) + summary_tail(summary))


def _device_lines(summary: dict) -> list[str]:
    """What the device went through: budgets lowered after out-of-memory errors, faults and whom they blamed."""
    lines = []
    budget = summary.get("token_budget_lowered")
    if budget:
        actors = f"{budget['actors']} actor" + ("s" if budget["actors"] > 1 else "")
        lowest = " (the lowest)" if budget["actors"] > 1 else ""
        lines.append(f"  memory     token budget lowered after out-of-memory: {budget['from']} -> {budget['to']}"
                     f"{lowest} on {actors}")
    faults = summary.get("device_faults") or {}
    if faults.get("micro_batches") or faults.get("canary_faults"):
        lines.append(f"  device     {faults['micro_batches']} micro-batches faulted the device; "
                     f"{faults['samples_blamed']} samples fault it on their own (error records); "
                     f"{faults['canary_faults']} canary faults (the device itself)")
        lines.append(f"             first error: {(faults.get('first_error') or '')[:100]}")
    return lines


__all__ = ["ScoreConfig", "format_summary", "prepare_scoring", "run_scoring", "score_dataset"]
