"""Batch scoring on Ray Data: shards -> samples -> CPU preprocessing -> a pool of model actors -> committed
Parquet score records. `score_dataset(ScoreConfig)` is what `python -m jobs.score` calls."""

from __future__ import annotations

import sys
import time
from typing import Literal

import pyarrow as pa
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import model as unifilter
from model.checkpoint import CheckpointError, load_processor
from pipeline.preprocess import ShardEncoder, decode_encoded, token_budget_batches
from pipeline.sinks import SCORE_SCHEMA, ShardCommitter, committed_shards, write_json
from pipeline.sources import SHARD_END, SourceOptions
from pipeline.storage import InputError, join, list_shards, storage_env


class ScoreConfig(BaseModel):
    """`python -m jobs.score`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="input shards: a directory, s3:// prefix, glob or .txt list of URIs")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] = Field(description="input format")
    output: str = Field(description="output directory or s3:// prefix")
    model: str = Field(description="checkpoint: local dir, s3:// prefix or Hugging Face hub id")
    concurrency: int = Field(1, ge=1, description="most scoring actors (the pool autoscales up to this)")
    min_actors: int = Field(1, ge=1, description="fewest scoring actors kept alive")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per scoring actor (0.5 packs two per GPU); default: 1 if the cluster has GPUs")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per scoring actor")
    preprocess_cpus: float = Field(1.0, gt=0, description="CPUs per preprocessing (decode + tokenize) worker")
    preprocess_workers: int | None = Field(
        None, ge=1, description="most preprocessing workers; default: the cluster's CPUs not reserved for scoring")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger images are errors (decompression bombs)")
    jpeg_draft: bool = Field(
        False, description="decode large JPEGs at reduced scale (1.4x faster preprocessing, <1 grey level mean diff)")
    batch_size: int = Field(64, ge=1, description="rows handed to a scoring actor per call")
    token_budget: int | None = Field(
        None, ge=64, description="padded tokens per forward pass (rows x longest); default 32768 on GPU, 8192 on CPU")
    max_batch: int = Field(256, ge=1, description="most samples per forward pass")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="model precision; auto: bfloat16 on GPU, float32 on CPU")
    source: SourceOptions = Field(default_factory=SourceOptions, description="Parquet column names")
    no_progress_timeout_s: float = Field(
        3600.0, gt=0, description="how long the job may make no progress (e.g. waiting for GPU nodes to start)")

    @model_validator(mode="after")
    def _pool_bounds(self) -> ScoreConfig:
        if self.min_actors > self.concurrency:
            raise ValueError(f"min_actors ({self.min_actors}) exceeds concurrency ({self.concurrency})")
        return self


class ScoringActor:
    """One model replica: loaded once per actor (NeMo-Curator style `setup` in `__init__`), then scores batches
    of encoded rows. Error rows and shard markers pass through; a failing forward pass is retried per sample."""

    def __init__(self, model_uri: str, dtype: str = "auto", token_budget: int | None = None, max_batch: int = 256):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.model, self.processor = unifilter.load(model_uri, device=device, dtype=getattr(torch, dtype))
        self.token_budget = token_budget or (32768 if device == "cuda" else 8192)
        self.max_batch = max_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [_passthrough_record(r, self.model.model_id) for r in rows]
        todo = [i for i, r in enumerate(rows) if r["kind"] != SHARD_END and not r["error"]]
        size = self.processor.config.image_size
        encoded = [decode_encoded(rows[i], size) for i in todo]
        for micro in token_budget_batches(encoded, self.token_budget, self.max_batch):
            try:
                results = [self._score([encoded[j] for j in micro])]
                groups = [micro]
            except Exception:  # e.g. out of memory on one large batch: retry one sample at a time
                results, groups = [], []
                for j in micro:
                    try:
                        results.append(self._score([encoded[j]]))
                        groups.append([j])
                    except Exception as err:
                        out[todo[j]]["error"] = f"score: {type(err).__name__}: {err}"[:500]
            for group, result in zip(groups, results):
                for k, j in enumerate(group):
                    record = out[todo[j]]
                    record["score"] = float(result["score"][k])
                    record["label"] = int(result["label"][k])
                    record["probs"] = None if result["probs"] is None else result["probs"][k].tolist()
        return pa.Table.from_pylist(out, schema=_ACTOR_OUTPUT_SCHEMA)

    def _score(self, samples) -> dict:
        batch = self.processor.collate(samples)
        if self.model.device.type == "cuda":
            batch = {k: v.pin_memory().to(self.model.device, non_blocking=True) for k, v in batch.items()}
        out = self.model.score(**batch)
        return {k: (None if v is None else v.float().cpu().numpy()) for k, v in out.items()}


_ACTOR_OUTPUT_SCHEMA = SCORE_SCHEMA.append(pa.field("ordinal", pa.int64()))


def _passthrough_record(row: dict, model_id: str) -> dict:
    return {"id": row["id"], "source": row["source"], "kind": row["kind"], "ordinal": row["ordinal"],
            "score": None, "label": None, "probs": None, "n_images": row["n_images"], "n_tokens": row["n_tokens"],
            "truncated": row["truncated"], "error": row["error"], "model": model_id}


def score_dataset(config: ScoreConfig, progress: bool = True) -> dict:
    """Score every sample of the input shards not yet committed in the output; returns (and writes) the summary."""
    start = time.time()
    shards = list_shards(config.input, config.format)
    already = committed_shards(config.output)
    todo = [s for s in shards if s not in already]
    try:
        _, model_id = load_processor(config.model)  # config and tokenizer only: fails fast on a bad URI
    except CheckpointError as err:
        raise InputError("model", str(err)) from None

    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = config.no_progress_timeout_s

    def report(committer: ShardCommitter) -> None:
        if progress:
            rate = committer.samples / max(time.time() - start, 1e-9)
            print(f"\r[score] shards {len(committer.committed)}/{len(todo)} committed · {committer.samples} samples · "
                  f"{sum(committer.errors_by_reason.values())} errors · {rate:.1f} samples/s",
                  end="", file=sys.stderr, flush=True)

    committer = ShardCommitter(config.output, on_commit=report)
    cpus = ray.cluster_resources().get("CPU", 1)
    workers = config.preprocess_workers or max(1, int(cpus - config.concurrency * config.cpus_per_actor))
    env = storage_env()  # workers read and write object storage too
    stage_args = {"runtime_env": {"env_vars": env}} if env else {}
    if todo:
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        # Read + decode + tokenize, one shard per call, on a pool of CPU actors (the processor loads once per
        # actor), apart from the model actors so the GPU never waits on JPEG decoding.
        ds = ds.map_batches(ShardEncoder, batch_size=1, batch_format="pyarrow",
                            fn_constructor_kwargs={"model_uri": config.model, "fmt": config.format,
                                                   "options": config.source,
                                                   "max_image_pixels": config.max_image_pixels,
                                                   "jpeg_draft": config.jpeg_draft},
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                            num_cpus=config.preprocess_cpus, **stage_args)
        ds = ds.map_batches(
            ScoringActor,
            fn_constructor_kwargs={"model_uri": config.model, "dtype": config.dtype,
                                   "token_budget": config.token_budget, "max_batch": config.max_batch},
            compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.concurrency),
            num_gpus=gpus, num_cpus=config.cpus_per_actor, batch_size=config.batch_size, batch_format="pyarrow",
            **stage_args,  # Ray Data restarts a crashed actor and retries its batches (max_restarts=-1)
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            committer.add(batch)
        if progress:
            print(file=sys.stderr)

    elapsed = time.time() - start
    total = committed_shards(config.output)
    steady = None
    if committer.first_commit and committer.samples > committer.first_commit[1]:
        first_time, first_samples = committer.first_commit
        steady = (committer.samples - first_samples) / max(time.time() - first_time, 1e-9)
    summary = {
        "input": config.input, "format": config.format, "output": config.output, "model": model_id,
        "shards": {"total": len(shards), "already_committed": len(shards) - len(todo), "new": len(todo),
                   "scored_this_run": len(committer.committed),
                   "incomplete": sorted(committer.pending)},
        "resources": {"min_actors": config.min_actors, "max_actors": config.concurrency, "gpus_per_actor": gpus,
                      "cpus_per_actor": config.cpus_per_actor, "preprocess_workers": workers,
                      "preprocess_cpus": config.preprocess_cpus,
                      "no_progress_timeout_s": ctx.execution_no_progress_timeout_s},
        "samples_this_run": committer.samples,
        "scored_this_run": committer.scored,
        "errors_this_run": sum(committer.errors_by_reason.values()),
        "truncated_this_run": committer.truncated,
        "errors_by_reason": dict(committer.errors_by_reason),
        "error_examples": committer.error_examples,
        "elapsed_s": round(elapsed, 3),
        "throughput_samples_per_s": round(committer.samples / elapsed, 2) if elapsed else None,
        "startup_s": round(committer.first_commit[0] - start, 3) if committer.first_commit else None,
        "steady_samples_per_s": round(steady, 2) if steady else None,
        "committed_shards_total": sum(1 for s in shards if s in total),
        "committed_samples_total": sum(total[s]["records"] for s in shards if s in total),
    }
    write_json(join(config.output, "summary.json"), summary)
    return summary


def format_summary(summary: dict) -> str:
    """The one-screen summary a job prints at the end."""
    s = summary["shards"]
    lines = [
        f"UniFilter scoring: {summary['input']} ({summary['format']}) -> {summary['output']}",
        f"  model      {summary['model']}",
        f"  shards     {s['total']} total · {s['already_committed']} already committed (skipped) · {s['new']} new · "
        f"{s['scored_this_run']} scored now · {len(s['incomplete'])} incomplete",
        f"  samples    {summary['samples_this_run']} this run · {summary['scored_this_run']} scored · "
        f"{summary['errors_this_run']} errors · {summary['truncated_this_run']} truncated",
        f"  speed      {summary['throughput_samples_per_s']} samples/s over {summary['elapsed_s']} s "
        f"({summary['steady_samples_per_s']} samples/s after the first commit at {summary['startup_s']} s)",
        f"  committed  {summary['committed_samples_total']} samples in {summary['committed_shards_total']} shards "
        f"(read them with pipeline.sinks.read_scores)",
    ]
    for reason, n in sorted(summary["errors_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  error      {n:6d} × {summary['error_examples'][reason][:90]}")
    if s["incomplete"]:
        lines.append(f"  INCOMPLETE shards (rerun the job to finish them): {s['incomplete'][:5]}")
    return "\n".join(lines)


__all__ = ["ScoreConfig", "ScoringActor", "format_summary", "score_dataset"]
