"""Semi-synthetic training data on Ray Data: real images and documents, text written at the four designated
quality levels, as (sample, level) pairs. `synthesize(SynthConfig)` is what `python -m jobs.synth` calls.

One actor pool does the work (the pool size times `threads_per_actor` bounds the requests in flight at the
endpoint, i.e. it is the rate limit): each call reads one shard, builds one request per origin and level, answers
it from the request cache or the generator (with retries), and yields training pairs. The driver commits each
shard's pairs (`train/`, `val/`, `errors/`) once all `levels x samples` of them have arrived.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.errors import Category, SampleError
from model.processing import decode_image
from pipeline.errors import InputError
from pipeline.generators import (
    BedrockGenerator,
    GenerationRequest,
    OfflineGenerator,
    OpenAIGenerator,
    RetryPolicy,
    cache_namespace,
    generate_with_retries,
)
from pipeline.manifest import MANIFEST_DIR, write_json
from pipeline.prompts import PROMPT_VERSION
from pipeline.runner import PreparedJob, ShardJob, Stage, common_summary, execute, prepare
from pipeline.sources import (
    MARKERS,
    SAMPLE_SCHEMA,
    SHARD_FAILED,
    SourceOptions,
    check_columns,
    read_shard,
    sample_kind,
)
from pipeline.storage import Shard, filesystem_for, join, list_shards

DEFAULT_BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
# USD per million input / output tokens, for the cost estimate when the config gives no prices.
KNOWN_PRICES = {"claude-3-sonnet": (3.0, 15.0), "claude-3-5-sonnet": (3.0, 15.0), "claude-3-7-sonnet": (3.0, 15.0),
                "claude-3-haiku": (0.25, 1.25), "claude-3-5-haiku": (0.8, 4.0)}

# The sample schema's fields (declared once, in pipeline.sources) plus the pair's own.
PAIR_SCHEMA = pa.schema([SAMPLE_SCHEMA.field(name) for name in ("id", "source", "kind", "texts", "images", "meta")] + [
    ("label", pa.int8()),
    ("split", pa.string()),
    ("origin_id", pa.string()),
    ("generator", pa.string()),
    ("prompt_version", pa.string()),
    ("error", pa.string()),
    # accounting: tokens and requests this run spent on the pair (0 when it came from the cache)
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("requests", pa.int32()),
    ("cached", pa.bool_()),
])
_ACTOR_SCHEMA = PAIR_SCHEMA.append(pa.field("ordinal", pa.int64())).append(pa.field("error_category", pa.string()))


class SynthConfig(BaseModel):
    """`python -m jobs.synth`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="real images/documents: a directory, s3:// prefix, glob or .txt list")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] = Field(description="input format")
    output: str = Field(description="output directory or s3:// prefix (train/, val/, errors/, summary.json)")
    generator: Literal["offline", "bedrock", "openai"] = Field("offline", description="who writes the text")
    endpoint: str | None = Field(None, description="openai: base URL of the chat endpoint; bedrock: optional URL")
    llm: str | None = Field(None, description=f"model id (bedrock default: {DEFAULT_BEDROCK_MODEL})")
    region: str | None = Field(None, description="bedrock: AWS region (default: the AWS chain's)")
    levels: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], description="quality levels to generate")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of origins held out for validation")
    seed: int = Field(0, description="split and perturbation seed")
    concurrency: int = Field(4, ge=1, description="generation actors (x threads_per_actor = requests in flight)")
    threads_per_actor: int = Field(4, ge=1, le=64, description="concurrent requests per actor")
    origins_per_block: int = Field(16, ge=1, description="origins handled together (donors for level 0 come "
                                                          "from the same block and split)")
    max_attempts: int = Field(6, ge=1, description="tries per request on throttling and server errors")
    max_malformed: int = Field(3, ge=1, description="tries per request when replies do not parse")
    backoff_base_s: float = Field(1.0, ge=0, description="first backoff; doubles per retry, with full jitter")
    backoff_max_s: float = Field(60.0, ge=0, description="longest backoff")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    max_images_per_request: int = Field(4, ge=1, description="images of a document shown to the LLM")
    price_input_per_mtok: float | None = Field(None, ge=0, description="USD per million input tokens")
    price_output_per_mtok: float | None = Field(None, ge=0, description="USD per million output tokens")
    source: SourceOptions = Field(default_factory=SourceOptions, description="Parquet column names")

    @field_validator("levels")
    @classmethod
    def _valid_levels(cls, levels: list[int]) -> list[int]:
        if len(levels) < 2 or len(levels) > 4:
            raise ValueError(f"needs 2 to 4 distinct levels out of 0-3, got {len(levels)}")
        if len(set(levels)) != len(levels) or not all(0 <= lv <= 3 for lv in levels):
            raise ValueError(f"levels must be distinct values in 0-3, got {levels}")
        return sorted(levels)

    @model_validator(mode="after")
    def _generator_needs(self) -> SynthConfig:
        if self.generator == "openai":
            if not self.endpoint:
                raise ValueError("field 'endpoint' is required with generator 'openai' (e.g. http://host:8000/v1)")
            if not self.llm:
                raise ValueError("field 'llm' is required with generator 'openai' (the served model's name)")
        return self

    def make_generator(self):
        if self.generator == "offline":
            return OfflineGenerator()
        if self.generator == "openai":
            return OpenAIGenerator(self.endpoint, self.llm, timeout_s=self.timeout_s)
        return BedrockGenerator(self.llm or DEFAULT_BEDROCK_MODEL, region=self.region, endpoint_url=self.endpoint,
                                timeout_s=self.timeout_s)

    def generator_name(self) -> str:
        return {"offline": "offline", "openai": f"openai:{self.llm}",
                "bedrock": f"bedrock:{self.llm or DEFAULT_BEDROCK_MODEL}"}[self.generator]


def split_key(source: str, sample_id: str) -> str:
    """What the split hashes: the shard's file name and the sample id, not where the corpus lives, so a copy of
    the corpus (local, another bucket) splits the same way."""
    return f"{source.rstrip('/').rsplit('/', 1)[-1]}#{sample_id}"


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """`train` or `val`, from a hash of the origin's `split_key`: all levels of one real image land in the same
    split."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


class RequestCache:
    """Generated texts by (origin, level) under OUTPUT/_cache/<generator>/<prompt version>/: a rerun never
    pays for a request twice. One small JSON object per entry, written as soon as the reply arrives."""

    def __init__(self, output: str, generator_name: str):
        self.prefix = join(output, "_cache", cache_namespace(generator_name))
        self.fs, self.root = filesystem_for(self.prefix)

    @staticmethod
    def _name(origin_key: str, level: int) -> str:
        return hashlib.sha256(f"{origin_key}|{level}".encode()).hexdigest()[:40] + ".json"

    def get(self, origin_key: str, level: int) -> list[str] | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{self._name(origin_key, level)}") as f:
                return json.loads(f.read())["texts"]
        except (FileNotFoundError, OSError, ValueError, KeyError):
            return None

    def put(self, origin_key: str, level: int, texts: list[str], usage: tuple[int, int]) -> None:
        write_json(join(self.prefix, self._name(origin_key, level)),
                   {"texts": texts, "input_tokens": usage[0], "output_tokens": usage[1]})


def _origin_problem(row: dict, kind: str, max_pixels: int) -> SampleError | None:
    """Why an origin cannot make training pairs, or None."""
    if row["error"]:
        return SampleError(row.get("error_category") or row["error"].split(":", 1)[0],
                           row["error"].split(": ", 1)[-1])
    texts, images = row["texts"] or [], row["images"] or []
    n_images = sum(1 for i in images if i is not None)
    n_texts = sum(1 for t in texts if t is not None and t.strip())
    if kind == "caption" and (n_images != 1 or n_texts == 0):
        return SampleError(Category.EMPTY, "caption origin needs one image and a caption")
    if kind == "interleaved" and (n_images == 0 or n_texts == 0):
        return SampleError(Category.EMPTY, "document origin needs images and text")
    for image in images:
        if image is not None:
            try:
                decode_image(image, max_pixels)
            except SampleError as err:
                return err
    return None


class SynthActor:
    """A generation worker: reads shards and turns each origin into one training pair per level."""

    def __init__(self, config: dict, max_image_pixels: int = 64_000_000):
        self.config = SynthConfig.model_validate(config)
        self.generator = self.config.make_generator()
        self.cache = None if self.config.generator == "offline" else RequestCache(self.config.output,
                                                                                 self.generator.name)
        self.policy = RetryPolicy(self.config.max_attempts, self.config.max_malformed, self.config.backoff_base_s,
                                  self.config.backoff_max_s)
        self.pool = ThreadPoolExecutor(self.config.threads_per_actor)
        self.max_image_pixels = max_image_pixels

    def __call__(self, batch: pa.Table):
        cfg = self.config
        for shard in (Shard(**s) for group in batch.column("shards").to_pylist() for s in group):
            block = []
            for row in read_shard(shard, cfg.format, cfg.source):
                if row["kind"] in MARKERS:
                    if block and row["kind"] != SHARD_FAILED:
                        yield self._pairs(block)
                    marker = {k: row.get(k) for k in _ACTOR_SCHEMA.names}
                    yield pa.Table.from_pylist([marker], schema=_ACTOR_SCHEMA)
                    continue
                block.append(row)
                if len(block) == cfg.origins_per_block:
                    yield self._pairs(block)
                    block = []

    def _pairs(self, origins: list[dict]) -> pa.Table:
        cfg = self.config
        kind = sample_kind(cfg.format)
        jobs, rows = [], []
        prepared = []
        for origin in origins:
            origin_key = f"{origin['source']}#{origin['id']}"
            location_free = split_key(origin["source"], origin["id"])
            split = split_of(location_free, cfg.val_fraction, cfg.seed)
            problem = _origin_problem(origin, kind, self.max_image_pixels)
            prepared.append((origin, origin_key, split, problem, f"{cfg.seed}|{location_free}"))
        for index, (origin, origin_key, split, problem, seed_key) in enumerate(prepared):
            donor = self._donor(prepared, index)
            for level in cfg.levels:
                row = self._row(origin, origin_key, split, level)
                rows.append(row)
                if problem:
                    row.update(error=problem.reason, error_category=problem.category.value)
                    continue
                texts = [t for t in origin["texts"] if t is not None and t.strip()]
                images = [i for i in origin["images"] if i is not None]
                donor_texts = [t for t in donor["texts"] if t is not None and t.strip()] if donor else []
                request = GenerationRequest(origin_key, level, kind, [" ".join(texts)] if kind == "caption" else texts,
                                            images[: cfg.max_images_per_request], donor_texts, seed_key)
                jobs.append((row, request, origin, donor))
        for (row, request, origin, donor), result in zip(jobs, self.pool.map(self._answer, [j[1] for j in jobs])):
            texts, error, usage, requests, cached = result
            row.update(requests=requests, cached=cached, input_tokens=usage[0], output_tokens=usage[1])
            if error:
                row.update(error=error.reason, error_category=error.category.value)
            else:
                row["texts"], row["images"] = _assemble(origin, donor, kind, request.level, texts,
                                                         random.Random(f"{request.seed_id()}|images"))
        return pa.Table.from_pylist(rows, schema=_ACTOR_SCHEMA)

    def _donor(self, prepared, index: int) -> dict | None:
        """Another usable origin of the same block and split (never the origin itself), deterministically."""
        _, _, split, _, seed_key = prepared[index]
        candidates = [p[0] for i, p in enumerate(prepared) if i != index and p[2] == split and not p[3]]
        if not candidates:
            return None
        pick = int(hashlib.sha256(seed_key.encode()).hexdigest()[:8], 16) % len(candidates)
        return candidates[pick]

    def _answer(self, request: GenerationRequest):
        """(texts, error, (input tokens, output tokens), requests sent, from cache)."""
        if self.cache is not None:
            cached = self.cache.get(request.origin_key, request.level)
            if cached is not None:
                return cached, None, (0, 0), 0, True
        outcome = generate_with_retries(self.generator, request, self.policy)
        usage = (outcome.input_tokens, outcome.output_tokens)
        sent = outcome.attempts if self.cache is not None else 0  # the offline generator sends nothing
        if outcome.generated is None:
            return None, outcome.error, usage, sent, False
        if self.cache is not None:
            self.cache.put(request.origin_key, request.level, outcome.generated.texts, usage)
        return outcome.generated.texts, None, usage, sent, False

    def _row(self, origin: dict, origin_key: str, split: str, level: int) -> dict:
        return {"id": f"{origin['id']}:L{level}", "source": origin["source"], "kind": origin["kind"],
                "texts": None, "images": None, "meta": origin["meta"], "label": level, "split": split,
                "origin_id": origin["id"], "generator": self.generator.name, "prompt_version": PROMPT_VERSION,
                "error": None, "input_tokens": 0, "output_tokens": 0, "requests": 0, "cached": False,
                "ordinal": origin["ordinal"]}


def _assemble(origin: dict, donor: dict | None, kind: str, level: int, texts: list[str], rng: random.Random):
    """The pair's texts/images lists: generated text in the origin's text positions; for documents, the images
    perturbed by level (3: as they are; 2: one replaced by another origin's; 1: order rotated, misaligned with
    the text; 0: all replaced by another origin's)."""
    if kind == "caption":
        image = next(i for i in origin["images"] if i is not None)
        return [None, texts[0]], [image, None]
    segments = [("image", i) if i is not None else ("text", t) for t, i in zip(origin["texts"], origin["images"])
                if i is not None or (t is not None and t.strip())]
    images = [s for k, s in segments if k == "image"]
    donor_images = [i for i in (donor or {}).get("images") or [] if i is not None]
    if level == 0:
        images = [donor_images[k % len(donor_images)] for k in range(len(images))] if donor_images else images[::-1]
    elif level == 1:
        images = images[1:] + images[:1] if len(images) > 1 else images
        if len(images) == 1:  # one image: move it away from the text it belongs to
            segments = [s for s in segments if s[0] != "image"]
            segments = ([("image", None)] + segments) if origin["images"][0] is None else (segments + [("image", None)])
    elif level == 2 and len(images) > 1 and donor_images:
        images[rng.randrange(len(images))] = donor_images[0]
    out_texts, out_images, t, m = [], [], iter(texts), iter(images)
    for seg_kind, _ in segments:
        if seg_kind == "image":
            out_texts.append(None)
            out_images.append(next(m))
        else:
            out_texts.append(next(t))
            out_images.append(None)
    return out_texts, out_images


def identity(config: SynthConfig) -> dict:
    """What the pairs depend on: the generator, the prompts, the levels and the split."""
    s = config.source
    return {"generator": config.generator_name(), "prompt_version": PROMPT_VERSION, "levels": config.levels,
            "val_fraction": config.val_fraction, "seed": config.seed,
            "columns": [s.image_column, s.text_column, s.texts_column, s.images_column, s.id_column]}


def prepare_synth(config: SynthConfig, started: float | None = None, dry_run: bool = False) -> PreparedJob:
    """Everything before Ray: the shards, the first shard's columns, the generator's settings, the output."""
    listing = list_shards(config.input, config.format)
    if config.format in ("parquet", "obelics"):
        problem = check_columns(listing.shards[0].uri, config.format, config.source)
        if problem:
            raise InputError(*problem)
    config.make_generator()  # fail fast on an unusable generator configuration (e.g. no AWS region)
    spec = ShardJob(job="synth", output=config.output, listing=listing, identity=identity(config),
                    schema=PAIR_SCHEMA, rows_per_sample=len(config.levels),
                    row_key=lambda r: (r["ordinal"], r["label"]),
                    partition=lambda r: "errors" if r["error"] else r["split"], unit="pairs", format=config.format)
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

    def committed(records: list[dict]) -> None:
        for row in records:
            if not row["error"]:
                balance[row["split"]][row["label"]] += 1
                kinds[row["kind"]] += 1

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
        "errors_this_run": sum(committer.errors_by_category.values()),
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
    write_json(join(config.output, "summary.json"), summary)
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
    for reason, n in sorted(summary["errors_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  error      {n:6d} × {summary['error_examples'][reason][:90]}")
    lines += [f"  warning    {w}" for w in summary.get("warnings", [])]
    if s["incomplete"]:
        lines.append(f"  INCOMPLETE {len(s['incomplete'])} shards were not committed; rerun the same command to "
                     "finish them:")
        for shard, reason in list(summary["incomplete_reasons"].items())[:5]:
            lines.append(f"             {shard}: {reason[:100]}")
    if summary.get("aborted"):
        lines.append(f"  ABORTED    {summary['aborted'][:150]}")
    return "\n".join(lines)
