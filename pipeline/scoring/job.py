"""Batch scoring as a shard job (`pipeline.runner`): shards -> the read stage (CPU actors: the shards' samples as
read, encoded images and text) -> the score stage (model actors that decode, resize and tokenise beside the device,
then score) -> committed Parquet score records. `python -m jobs.score` runs it; `score_dataset` does the same for
code already connected to Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import CheckpointError, InputError
from pipeline.io.counting import count_samples
from pipeline.io.listing import list_shards
from pipeline.io.sniff import check_first_shard
from pipeline.runner.job import Job, JobSpec, Plan, PreparedJob, RunResult
from pipeline.runner.prepare import check_writable
from pipeline.runner.resources import ClusterView, cpus_per_actor, gpus_per_actor, read_workers
from pipeline.runner.run import run_job
from pipeline.runner.stage import Resources, Stage
from pipeline.scoring import duty_cycle
from pipeline.scoring.config import ScoreConfig
from pipeline.scoring.records import SCORE_SCHEMA, scores_folder


def locate_model(uri: str) -> None:
    """A model URI that cannot be a checkpoint fails in milliseconds (before torch loads), naming the field."""
    from model.locate import checkpoint_problem

    problem = checkpoint_problem(uri)
    if problem:
        raise InputError("model", problem)


def check_model(uri: str) -> tuple[object, str, str]:
    """Config and tokenizer only (no weights read, beyond a local checkpoint's digest): fails fast on a bad URI;
    returns (processor, the model id records carry, the weights' digest)."""
    from model.checkpoint import load_processor
    from model.digest import weights_digest

    locate_model(uri)
    try:
        processor, model_id = load_processor(uri)
        return processor, model_id, weights_digest(uri, model_id.rsplit("@", 1)[-1] if "@" in model_id else None)
    except (CheckpointError, OSError, ValueError) as err:
        raise InputError("model", str(err)) from None


class ScoringJob(Job):
    name = "score"
    config_class = ScoreConfig

    def __init__(self, config: ScoreConfig, sources: dict[str, str] | None = None):
        super().__init__(config, sources)
        self.model_id = None
        self.processor = None
        self._batches: list[tuple[int, int, int]] = []  # micro-batch sizes: (sum, count, max) per returned batch
        self._lowered: dict[str, dict] = {}  # token budgets lowered after out-of-memory errors, by actor
        self._scored = self._truncated = 0
        self._journal = None
        self._device_faults = {}
        self._weights = None
        self._journal_handle = None  # what the scoring stage reaches the journal by (its name on Ray)
        self._received = {"bytes": 0, "samples": 0, "largest_call": 0}  # what crossed to the scoring actors
        self._actors: dict[str, dict] = {}  # each actor's latest account (compiling, images, duty cycle)

    # -- before Ray --------------------------------------------------------------------------------------------
    def spec(self) -> JobSpec:
        """What the job is, from what can be checked without writing anything or starting Ray: the shards, the
        first shard's columns and records, the model and its weights (the cheap checks first)."""
        c = self.config
        check_writable(c.output, create=False)
        locate_model(c.model)
        listing = list_shards(c.input, c.format)
        check_first_shard(listing, c.format, c.source)
        self.processor, self.model_id, weights = check_model(c.model)
        if c.image_decoder == "nvjpeg":
            from pipeline.scoring.gpu_decode import require_torchvision

            require_torchvision()
        return JobSpec(job=self.name, output=c.output, listing=listing, identity=c.identity(self.model_id, weights),
                       schema=SCORE_SCHEMA, partition=scores_folder, no_progress_timeout_s=c.no_progress_timeout_s,
                       input=c.input, format=c.format, moved_from=c.moved_from)

    def dry_run_lines(self, prepared: PreparedJob) -> list[str]:
        from pipeline.scoring.estimate import human, parameter_count, reference_rate

        c = self.config
        params = parameter_count(self.processor.config)
        samples, how = count_samples(prepared.todo, c.format, c.source)
        rate, rate_source = c.gpu_rate, "--gpu-rate"
        if rate is None:
            rate = reference_rate(params, c.format)
            rate_source = "the reference rate for a model of this size (set --gpu-rate to your own)"
        lines = [
            f"UniFilter scoring, dry run (nothing started, nothing written): {c.input} ({c.format}) -> {c.output}",
            f"  shards     {len(prepared.shards)} total · {len(prepared.committed)} already committed · "
            f"{len(prepared.todo)} new",
            *(f"  note       {note}" for note in prepared.notes),
            f"  samples    {'unknown' if samples is None else f'{samples:,}'} in the new shards ({how})",
            f"  model      {self.model_id} · {human(params)} parameters · {c.settings().dtype}"
            + (" (auto: bfloat16 on GPU, float32 on CPU)" if c.dtype == "auto" else ""),
        ]
        if samples is not None:
            hours = samples / rate / 3600
            lines.append(f"  estimate   {hours:,.2f} GPU-hours at {rate:g} samples/s per GPU ({rate_source}) · "
                         f"${hours * c.gpu_hour_price:,.2f} at ${c.gpu_hour_price:g} per GPU-hour "
                         "(--gpu-hour-price)")
        return lines

    # -- sizing and stages -------------------------------------------------------------------------------------
    def resources(self, view: ClusterView) -> Plan:
        """Sized from what the cluster can scale to (`pipeline.runner.resources`)."""
        c, where = self.config, self.sources
        gpus = gpus_per_actor(c.gpus_per_actor, where.get("gpus_per_actor", "default"), view)
        cpus = cpus_per_actor(c.cpus_per_actor, where.get("cpus_per_actor", "default"), view, gpus.value)
        readers = read_workers(c.read_workers, where.get("read_workers", "default"), view, c.concurrency, gpus.value)
        return Plan(
            stages={"read": Resources(num_cpus=c.read_cpus, max_actors=readers.value),
                    "score": Resources(num_cpus=cpus.value, num_gpus=gpus.value, min_actors=c.min_actors,
                                       max_actors=c.concurrency, batch_size=c.batch_size or 4 * c.max_batch,
                                       concurrent_calls=2, accelerator_type=c.accelerator_type)},
            why={"gpus_per_actor": gpus.why, "cpus_per_actor": cpus.why, "read_workers": readers.why,
                 "concurrency": where.get("concurrency", "default")})

    def start_line(self, plan: Plan) -> str:
        score, read = plan.stages["score"], plan.stages["read"]
        return (f"asking for {score.max_actors} scoring actor(s) x {score.num_gpus:g} GPU "
                f"({plan.why['gpus_per_actor']}) x {score.num_cpus:g} CPUs to decode beside it "
                f"({plan.why['cpus_per_actor']}), and {read.max_actors} shard readers ({plan.why['read_workers']})")

    def stages(self, plan: Plan) -> list[Stage]:
        from pipeline.scoring.reading import ReadStage

        c = self.config
        seen = self.processor.images_seen if self.processor is not None else None  # known once spec() has run
        reader = ReadStage(plan.stages["read"], c.format, c.source, images_seen=seen)
        return [reader, self.model_stage(plan.stages["score"])]

    def model_stage(self, resources: Resources) -> Stage:
        from pipeline.scoring.stage import ScoreStage

        return ScoreStage(resources, self.config.settings(self._weights, resources.num_cpus), self._journal_handle)

    # -- the run -----------------------------------------------------------------------------------------------
    def before_execute(self, prepared: PreparedJob) -> None:
        self._weights = prepared.spec.identity["model"].get("weights")
        if prepared.todo:
            from pipeline.scoring.device_faults import FaultJournal, JournalActor

            if self.executor.name == "ray":  # a named actor the scoring actors reach by its name
                from pipeline.runner.ray_compat import calls_bounded_in_bytes

                self._journal = JournalActor()
                self._journal_handle = self._journal.name
                calls_bounded_in_bytes(self.config.call_bytes)  # last: after_execute unbounds it (run_job's finally)
            else:  # the stages run in this process: the journal itself
                self._journal = self._journal_handle = FaultJournal()

    def after_execute(self, prepared: PreparedJob, result: RunResult) -> None:
        if self.executor.name == "ray":
            from pipeline.runner.ray_compat import calls_unbounded

            calls_unbounded()
        if self._journal is not None:
            try:
                self._device_faults = self._journal.stats()
            finally:
                if self._journal is not self._journal_handle:  # the run's named actor
                    self._journal.stop()
                self._journal = self._journal_handle = None

    def on_batch(self, batch: pa.Table) -> None:
        sizes = batch.column("micro_batch").drop_null()
        if len(sizes):
            self._batches.append((pc.sum(sizes).as_py(), len(sizes), pc.max(sizes).as_py()))
        self._lowered.update((r["actor"], r) for r in batch.column("budget_lowered").drop_null().to_pylist())
        for call in batch.column("call").drop_null().to_pylist():
            self._received["bytes"] += call["bytes"]
            self._received["samples"] += call["samples"]
            self._received["largest_call"] = max(self._received["largest_call"], call["bytes"])
            latest = self._actors.get(call["actor"])  # accounts are cumulative; calls come back in any order
            if latest is None or call["wall_s"] >= latest["wall_s"]:
                self._actors[call["actor"]] = call

    def progress_note(self) -> str:
        busy = duty_cycle.summary(list(self._actors.values()))
        return f"device busy {busy['pct']:g}%" if busy else ""

    def on_records(self, records: pa.Table) -> None:
        self._scored += records.num_rows - records.column("error").drop_null().length()
        self._truncated += pc.sum(pc.fill_null(records.column("truncated"), False)).as_py() or 0

    # -- the summary -------------------------------------------------------------------------------------------
    def summary_fields(self, prepared: PreparedJob, result: RunResult) -> dict:
        rows = sum(n for _, n, _ in self._batches)
        lowered = self._lowered
        return {
            "model": self.model_id, "format": self.config.format, "input_root": prepared.spec.listing.root,
            "scored_this_run": self._scored, "truncated_this_run": self._truncated,
            "micro_batch_rows": {"mean": round(sum(t for t, _, _ in self._batches) / rows, 1) if rows else None,
                                 "max": max((m for _, _, m in self._batches), default=None),
                                 "configured": self.config.max_batch},
            "token_budget_lowered": {"actors": len(lowered), "from": max(r["from"] for r in lowered.values()),
                                     "to": min(r["to"] for r in lowered.values())} if lowered else None,
            "device_faults": self._device_faults,
            **self._transfer(prepared, result),
            **self._device_account(),
        }

    def _device_account(self) -> dict:
        """From the actors' latest accounts: compiling (the longest actor's time; graphs compiled after the
        warm-ups), images through the vision tower per real image, and the device's duty cycle."""
        actors = list(self._actors.values())
        compiled = [a for a in actors if a["compile_s"] is not None]
        images = sum(a["images"] for a in actors)
        return {"compile_s": max(a["compile_s"] for a in compiled) if compiled else None,
                "recompiles": sum(a["recompiles"] for a in compiled) if compiled else None,
                "vision_padding": round(sum(a["tower_images"] for a in actors) / images, 4) if images else None,
                "device_busy": duty_cycle.summary(actors)}

    def _transfer(self, prepared: PreparedJob, result: RunResult) -> dict:
        """What crossed from the readers to the scoring actors, per sample, against the input's own bytes per
        sample (of the shards this run committed): the figure networks are sized with."""
        done = set(result.committer.committed) if result.committer else set()
        sizes = [s.size for s in prepared.todo if s.key in done]
        samples = result.committer.samples if result.committer else 0
        received = self._received
        return {"transfer_bytes_per_sample": round(received["bytes"] / received["samples"]) if received["samples"]
                else None, "largest_call_bytes": received["largest_call"] or None,
                "input_bytes_per_sample": round(sum(sizes) / samples) if samples and sizes and None not in sizes
                else None}

    def every_sample_failed(self, summary: dict) -> bool:
        return bool(summary["records"]["this_run"]) and not summary[self.name]["scored_this_run"]

    def summary_lines(self, summary: dict) -> list[str]:
        own = summary[self.name]
        records = summary["records"]
        timing = summary["timing"]
        shards = summary["shards"]
        speed = f"{timing['records_per_s']} samples/s over the whole job ({timing['elapsed_s']} s)"
        if not records["this_run"]:
            speed = (f"nothing scored: the run stopped ({timing['elapsed_s']} s)" if shards["new"] else
                     f"nothing new to score ({timing['elapsed_s']} s)")
        elif timing.get("steady_records_per_s"):
            speed += f"; {timing['steady_records_per_s']} samples/s after start-up ({timing['startup_s']} s)"
        lines = [
            f"  model      {own['model']}",
            f"  samples    {records['this_run']} this run · {own['scored_this_run']} scored · {records['errors']} "
            f"errors · {own['truncated_this_run']} truncated",
            f"  speed      {speed}",
            f"  committed  {records['committed_total']} samples in "
            f"{shards['already_committed'] + shards['committed_this_run']} shards (read them with "
            "pipeline.scoring.read_scores)",
        ]
        if own.get("transfer_bytes_per_sample"):
            ratio = (f" ({own['transfer_bytes_per_sample'] / own['input_bytes_per_sample']:.2f}x the input's "
                     f"{own['input_bytes_per_sample']:,})" if own.get("input_bytes_per_sample") else "")
            lines.append(f"  transfer   {own['transfer_bytes_per_sample']:,} bytes per sample to the scoring actors"
                         f"{ratio}")
        return lines + _device_lines(own)


def _device_lines(own: dict) -> list[str]:
    """What the device and the workers went through: its duty cycle, compiling, budgets lowered after out-of-memory
    errors, device faults and process deaths, and whom they blamed."""
    lines = []
    for k, line in enumerate(duty_cycle.lines(own.get("device_busy"))):
        lines.append(f"  {'device' if k == 0 else '':10} {line}")
    if own.get("compile_s") is not None:
        lines.append(f"  compiled   {own['compile_s']:.1f} s compiling (the warm-up's and any after) · "
                     f"{own['recompiles']} graphs compiled after the warm-up · "
                     f"{own['vision_padding'] or 1:g} images through the vision tower per image")
    budget = own.get("token_budget_lowered")
    if budget:
        actors = f"{budget['actors']} actor" + ("s" if budget["actors"] > 1 else "")
        lowest = " (the lowest)" if budget["actors"] > 1 else ""
        lines.append(f"  memory     token budget lowered after out-of-memory: {budget['from']} -> {budget['to']}"
                     f"{lowest} on {actors}")
    faults = own.get("device_faults") or {}
    if faults.get("micro_batches") or faults.get("canary_faults") or faults.get("deaths"):
        blamed = ", ".join(f"{n} {category}" for category, n in sorted(faults.get("blamed_by_category", {}).items()))
        lines.append(f"  faults     {faults['micro_batches']} micro-batches faulted the device · {faults['deaths']} "
                     f"scoring processes died with samples in flight · {faults['samples_blamed']} samples fault "
                     f"or kill their worker on their own (error records{': ' + blamed if blamed else ''}) · "
                     f"{faults['canary_faults']} canary failures (the workers themselves)")
        for name in ("first_error", "last_death"):
            if faults.get(name):
                lines.append(f"             {name.replace('_', ' ')}: {faults[name][:160]}")
    return lines


def score_dataset(config: ScoreConfig, progress: bool = True) -> dict:
    """Score every sample of the shards not yet committed (connecting to Ray if this process is not); returns the
    summary."""
    return run_job(ScoringJob(config), progress)
