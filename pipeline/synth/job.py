"""Semi-synthetic training data as a shard job (`pipeline.runner`): real images and documents, text written at the
four designated quality levels, as (sample, level) pairs. `python -m jobs.synth` runs it; `synthesize` does the
same for code already connected to Ray.

One stage does the work (`SynthStage`; its pool size times `threads_per_actor` bounds the requests in flight at
the endpoint, i.e. it is the rate limit): each call reads one shard, builds one request per origin and level,
answers it from the request cache or the generator (with retries), and yields training pairs. The committer
commits each shard's pairs (`train/`, `val/`, `errors/`) once all `levels x samples` of them have arrived.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit.markers import is_marker
from pipeline.io.counting import count_samples
from pipeline.io.listing import list_shards
from pipeline.io.sniff import check_first_shard
from pipeline.io.uris import join
from pipeline.runner.job import Job, JobSpec, Plan, PreparedJob, RunResult
from pipeline.runner.prepare import check_writable
from pipeline.runner.resources import ClusterView
from pipeline.runner.run import run_job
from pipeline.runner.stage import Resources, Stage
from pipeline.synth.config import DEFAULT_BEDROCK_MODEL, KNOWN_PRICES, PAIR_SCHEMA, SynthConfig
from pipeline.synth.prompts import PROMPT_VERSION

PAIR_FOLDERS = ("train", "val", "errors")


def pair_folders(pairs: pa.Table) -> list[str]:
    """train/, val/, or errors/ for a pair that could not be made."""
    return ["errors" if error else split for error, split in zip(pairs.column("error").to_pylist(),
                                                                   pairs.column("split").to_pylist())]


class SynthJob(Job):
    name = "synth"
    config_class = SynthConfig

    def __init__(self, config: SynthConfig, sources: dict[str, str] | None = None):
        super().__init__(config, sources)
        self.spent = Counter()  # what was spent, committed or not
        self.balance: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self.kinds = Counter()

    def identity(self) -> dict:
        """What the pairs depend on: the generator, the prompts, the levels and the split."""
        c, s = self.config, self.config.source
        return {"generator": c.generator_name(), "prompt_version": PROMPT_VERSION, "levels": c.levels,
                "val_fraction": c.val_fraction, "seed": c.seed,
                "columns": [s.image_column, s.text_column, s.texts_column, s.images_column, s.id_column]}

    def spec(self) -> JobSpec:
        """The shards, the first shard's columns and records, the generator's settings, the output."""
        c = self.config
        c.check_generator_environment()  # one line naming the field, not botocore's traceback
        for folder in ("", *PAIR_FOLDERS):  # every folder it writes, before the first byte
            check_writable(join(c.output, folder) if folder else c.output, create=False)
        listing = list_shards(c.input, c.format)
        check_first_shard(listing, c.format, c.source)
        c.make_generator()  # fail fast on an unusable generator configuration (e.g. no AWS region)
        return JobSpec(job=self.name, output=c.output, listing=listing, identity=self.identity(), schema=PAIR_SCHEMA,
                       partition=pair_folders, rows_per_sample=len(c.levels), key_columns=("ordinal", "label"),
                       unit="pairs", input=c.input, format=c.format, moved_from=c.moved_from)

    def dry_run_lines(self, prepared: PreparedJob) -> list[str]:
        c = self.config
        origins, how = count_samples(prepared.todo, c.format, c.source)
        pairs = None if origins is None else origins * len(c.levels)
        requests = 0 if c.generator == "offline" else pairs
        return [
            f"UniFilter synthetic data, dry run (nothing started, nothing written): {c.input} ({c.format}) -> "
            f"{c.output}",
            f"  generator  {c.generator_name()} · prompts {PROMPT_VERSION} · levels {c.levels}",
            f"  shards     {len(prepared.shards)} total · {len(prepared.committed)} already committed · "
            f"{len(prepared.todo)} new",
            f"  origins    {'unknown' if origins is None else f'{origins:,}'} in the new shards ({how}) -> "
            f"{'unknown' if pairs is None else f'{pairs:,}'} pairs",
            f"  requests   {'unknown' if requests is None else f'at most {requests:,}'} (fewer where the request "
            "cache under OUTPUT/_cache already holds them)",
        ]

    def resources(self, view: ClusterView) -> Plan:
        return Plan({"synth": Resources(num_cpus=1, max_actors=self.config.concurrency)},
                    {"concurrency": self.sources.get("concurrency", "default")})

    def stages(self, plan: Plan) -> list[Stage]:
        from pipeline.synth.stage import SynthStage

        return [SynthStage(plan.stages["synth"], self.config)]

    def on_batch(self, batch: pa.Table) -> None:
        pairs = batch.filter(pc.invert(is_marker(batch.column("kind"))))
        for row in pairs.select(["input_tokens", "output_tokens", "requests", "cached"]).to_pylist():
            self.spent.update(input_tokens=row["input_tokens"] or 0, output_tokens=row["output_tokens"] or 0,
                              requests=row["requests"] or 0, cache_hits=int(bool(row["cached"])))

    def on_records(self, records: pa.Table) -> None:
        for row in records.select(["error", "split", "label", "kind"]).to_pylist():
            if not row["error"]:
                self.balance[row["split"]][row["label"]] += 1
                self.kinds[row["kind"]] += 1

    def _cost(self) -> float | None:
        c = self.config
        if c.generator == "offline":
            return 0.0
        price_in, price_out = c.price_input_per_mtok, c.price_output_per_mtok
        known = next((p for name, p in KNOWN_PRICES.items() if name in (c.llm or DEFAULT_BEDROCK_MODEL)), None)
        if known:
            price_in = known[0] if price_in is None else price_in
            price_out = known[1] if price_out is None else price_out
        if price_in is None or price_out is None:
            return None
        return round((self.spent["input_tokens"] * price_in + self.spent["output_tokens"] * price_out) / 1e6, 4)

    def summary_fields(self, prepared: PreparedJob, result: RunResult) -> dict:
        c = self.config
        pairs = sum(sum(counts.values()) for counts in self.balance.values())
        origins = (result.committer.samples if result.committer else 0) // len(c.levels)
        warnings = []
        if pairs and c.val_fraction > 0 and not sum(self.balance["val"].values()):
            warnings.append(f"no origin of this run fell in the validation split (val_fraction {c.val_fraction}, "
                            f"{origins} origins): jobs.train needs val pairs, so raise --val-fraction or add "
                            "origins")
        return {
            "generator": c.generator_name(), "prompt_version": PROMPT_VERSION, "levels": c.levels,
            "format": c.format, "origins_this_run": origins, "pairs_this_run": pairs,
            "level_balance": {split: {str(lv): counts[lv] for lv in c.levels}
                              for split, counts in self.balance.items()},
            "kinds": dict(self.kinds), "requests_sent": self.spent["requests"], "cache_hits": self.spent["cache_hits"],
            "input_tokens": self.spent["input_tokens"], "output_tokens": self.spent["output_tokens"],
            "estimated_cost_usd": self._cost(), "warnings": warnings,
        }

    def every_sample_failed(self, summary: dict) -> bool:
        return bool(summary["records"]["this_run"]) and not summary[self.name]["pairs_this_run"]

    def summary_lines(self, summary: dict) -> list[str]:
        own, timing = summary[self.name], summary["timing"]
        cost = own["estimated_cost_usd"]
        lines = [
            f"  generator  {own['generator']} · prompts {own['prompt_version']} · levels {own['levels']}",
            f"  pairs      {own['pairs_this_run']} from {own['origins_this_run']} origins · "
            f"{summary['records']['errors']} errors · {timing['records_per_s']} pairs/s",
            "  balance    " + " · ".join(f"{split}: " + ", ".join(f"L{lv} {n}" for lv, n in counts.items())
                                         for split, counts in own["level_balance"].items()),
            f"  requests   {own['requests_sent']} sent · {own['cache_hits']} from cache · tokens "
            f"{own['input_tokens']} in / {own['output_tokens']} out · cost "
            f"{'unknown (set the price fields)' if cost is None else '$' + str(cost)}",
        ]
        return lines + [f"  warning    {w}" for w in own["warnings"]]


def synthesize(config: SynthConfig, progress: bool = True) -> dict:
    """Generate pairs for every origin of the input shards not yet committed; returns (and writes) the summary."""
    return run_job(SynthJob(config), progress)
