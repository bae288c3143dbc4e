"""Semi-synthetic training data on Ray Data: real images and documents, text written at the four designated
quality levels, as (sample, level) pairs. `synthesize(SynthConfig)` is what `python -m jobs.synth` calls.

One actor pool does the work (the pool size times `threads_per_actor` bounds the requests in flight at the
endpoint, i.e. it is the rate limit): each call reads one shard, builds one request per origin and level, answers
it from the request cache or the generator (with retries), and yields training pairs. The driver commits each
shard's pairs (`train/`, `val/`, `errors/`) once all `levels x samples` of them have arrived.
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa

from pipeline.manifest import MANIFEST_DIR
from pipeline.pairs import (
    DEFAULT_BEDROCK_MODEL,
    KNOWN_PRICES,
    PAIR_SCHEMA,
    RequestCache,
    SynthConfig,
    split_key,
    split_of,
)
from pipeline.prompts import PROMPT_VERSION
from pipeline.runner import (
    PreparedJob,
    ShardJob,
    Stage,
    common_summary,
    execute,
    prepare,
    summary_tail,
    write_summary,
)
from pipeline.sources import MARKERS
from pipeline.sources.sniff import check_first_shard
from pipeline.storage import list_shards

__all__ = ["PAIR_SCHEMA", "RequestCache", "SynthConfig", "dry_run_plan", "format_summary",
           "prepare_synth", "split_key", "split_of", "synthesize"]


def identity(config: SynthConfig) -> dict:
    """What the pairs depend on: the generator, the prompts, the levels and the split."""
    s = config.source
    return {"generator": config.generator_name(), "prompt_version": PROMPT_VERSION, "levels": config.levels,
            "val_fraction": config.val_fraction, "seed": config.seed,
            "columns": [s.image_column, s.text_column, s.texts_column, s.images_column, s.id_column]}


def _pair_folders(pairs: pa.Table) -> list[str]:
    """train/, val/, or errors/ for a pair that could not be made."""
    return ["errors" if error else split for error, split in zip(pairs.column("error").to_pylist(),
                                                                   pairs.column("split").to_pylist())]


def prepare_synth(config: SynthConfig, started: float | None = None, dry_run: bool = False) -> PreparedJob:
    """Everything before Ray: the shards, the first shard's columns, the generator's settings, the output."""
    listing = list_shards(config.input, config.format)
    check_first_shard(listing, config.format, config.source)
    config.make_generator()  # fail fast on an unusable generator configuration (e.g. no AWS region)
    spec = ShardJob(job="synth", output=config.output, listing=listing, identity=identity(config),
                    schema=PAIR_SCHEMA, rows_per_sample=len(config.levels),
                    key_columns=("ordinal", "label"), partition=_pair_folders, unit="pairs", format=config.format,
                    moved_from=config.moved_from)
    return prepare(spec, started, dry_run)


def dry_run_plan(config: SynthConfig) -> str:
    """What a run would do: shards, origins, pairs, requests. Starts nothing, writes nothing."""
    from pipeline.plan import count_samples

    prepared = prepare_synth(config, dry_run=True)
    origins, how = count_samples(prepared.todo, config.format, config.source)
    pairs = None if origins is None else origins * len(config.levels)
    requests = 0 if config.generator == "offline" else pairs
    return "\n".join([
        f"UniFilter synthetic data, dry run (nothing started, nothing written): {config.input} ({config.format}) "
        f"-> {config.output}",
        f"  generator  {config.generator_name()} · prompts {PROMPT_VERSION} · levels {config.levels}",
        f"  shards     {len(prepared.shards)} total · {len(prepared.committed)} already committed · "
        f"{len(prepared.todo)} new",
        f"  origins    {'unknown' if origins is None else f'{origins:,}'} in the new shards ({how}) -> "
        f"{'unknown' if pairs is None else f'{pairs:,}'} pairs",
        f"  requests   {'unknown' if requests is None else f'at most {requests:,}'} (fewer where the request cache "
        "under OUTPUT/_cache already holds them)",
    ])


def synthesize(config: SynthConfig, progress: bool = True, prepared: PreparedJob | None = None) -> dict:
    """Generate pairs for every origin of the input shards not yet committed; returns (and writes) the summary."""
    prepared = prepared or prepare_synth(config, time.time())
    accounting = Counter()  # what was spent, committed or not
    balance: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    kinds = Counter()

    def spent(batch: pa.Table) -> None:
        for row in batch.select(["kind", "input_tokens", "output_tokens", "requests", "cached"]).to_pylist():
            if row["kind"] not in MARKERS:
                accounting.update(input_tokens=row["input_tokens"] or 0, output_tokens=row["output_tokens"] or 0,
                                  requests=row["requests"] or 0, cache_hits=int(bool(row["cached"])))

    def committed(records: pa.Table) -> None:
        for row in records.select(["error", "split", "label", "kind"]).to_pylist():
            if not row["error"]:
                balance[row["split"]][row["label"]] += 1
                kinds[row["kind"]] += 1

    # the actor's module (the processor, torch) loads here, on first use, not for a bad flag
    from pipeline.synth_actor import SynthActor

    stage = Stage("synth", SynthActor, {"config": config.model_dump()}, num_cpus=1, max_actors=config.concurrency)
    result = execute(prepared, [stage], progress, on_batch=spent, on_records=committed)
    committer = result.committer
    common = common_summary(prepared, result)
    start = prepared.started
    elapsed = time.time() - start
    price_in, price_out = config.price_input_per_mtok, config.price_output_per_mtok
    if price_in is None or price_out is None:
        known = next((p for name, p in KNOWN_PRICES.items() if name in (config.llm or DEFAULT_BEDROCK_MODEL)), None)
        if config.generator != "offline" and known:
            price_in, price_out = (price_in if price_in is not None else known[0],
                                   price_out if price_out is not None else known[1])
    cost = None
    if config.generator == "offline":
        cost = 0.0
    elif price_in is not None and price_out is not None:
        cost = round((accounting["input_tokens"] * price_in + accounting["output_tokens"] * price_out) / 1e6, 4)
    pairs = sum(sum(c.values()) for c in balance.values())
    warnings = []
    if pairs and config.val_fraction > 0 and not sum(balance["val"].values()):
        warnings.append(f"no origin of this run fell in the validation split (val_fraction {config.val_fraction}, "
                        f"{committer.samples // len(config.levels)} origins): jobs.train needs val pairs, so raise "
                        "--val-fraction or add origins")
    summary = {
        "input": config.input, "format": config.format, "output": config.output,
        "generator": config.generator_name(), "prompt_version": PROMPT_VERSION, "levels": config.levels,
        "shards": {k: common["shards"][k] for k in ("total", "already_committed", "new", "committed_this_run",
                                                      "incomplete")},
        "incomplete_reasons": common["incomplete_reasons"],
        "origins_this_run": committer.samples // len(config.levels),
        "pairs_this_run": pairs,
        "errors_this_run": committer.errors.total(),
        "every_sample_failed": bool(committer.samples) and not pairs,
        "errors_by_category": common["errors_by_category"],
        "errors_by_reason": common["errors_by_reason"],
        "error_examples": common["error_examples"],
        "level_balance": {split: {str(lv): counts[lv] for lv in config.levels} for split, counts in balance.items()},
        "kinds": dict(kinds),
        "requests_sent": accounting["requests"],
        "cache_hits": accounting["cache_hits"],
        "input_tokens": accounting["input_tokens"],
        "output_tokens": accounting["output_tokens"],
        "estimated_cost_usd": cost,
        "elapsed_s": round(elapsed, 3),
        "pairs_per_s": round(pairs / elapsed, 2) if elapsed else 0.0,
        "manifest": MANIFEST_DIR,
        "warnings": warnings,
    }
    if result.aborted:
        summary["aborted"] = result.aborted
    if result.interrupted:
        summary["interrupted"] = True
    write_summary(prepared, result, summary)
    return summary


def format_summary(summary: dict) -> str:
    s = summary["shards"]
    lines = [
        f"UniFilter synthetic data: {summary['input']} ({summary['format']}) -> {summary['output']}",
        f"  generator  {summary['generator']} · prompts {summary['prompt_version']} · levels {summary['levels']}",
        f"  shards     {s['total']} total · {s['already_committed']} already committed · "
        f"{s['committed_this_run']} done now · {len(s['incomplete'])} incomplete",
        f"  pairs      {summary['pairs_this_run']} from {summary['origins_this_run']} origins · "
        f"{summary['errors_this_run']} errors · {summary['pairs_per_s']} pairs/s",
        "  balance    " + " · ".join(f"{split}: " + ", ".join(f"L{lv} {n}" for lv, n in counts.items())
                                     for split, counts in summary["level_balance"].items()),
        f"  requests   {summary['requests_sent']} sent · {summary['cache_hits']} from cache · tokens "
        f"{summary['input_tokens']} in / {summary['output_tokens']} out · cost "
        f"{'unknown (set the price fields)' if summary['estimated_cost_usd'] is None else '$' + str(summary['estimated_cost_usd'])}",
    ]
    lines += [f"  warning    {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines + summary_tail(summary))


def __getattr__(name: str):
    if name == "SynthActor":
        from pipeline.synth_actor import SynthActor

        return SynthActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
