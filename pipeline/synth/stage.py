"""The generation stage of `jobs.synth`: reads shards and turns each origin into one training pair per level
(the request cache first, then the generator with retries; documents' images perturbed by level)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from model.errors import Category, SampleError
from model.limits import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.commit.markers import wire_schema
from pipeline.io.listing import Shard
from pipeline.io.samples import read_samples, sample_kind
from pipeline.runner.stage import Resources, ShardStage
from pipeline.synth.cache import RequestCache
from pipeline.synth.config import PAIR_SCHEMA, SynthConfig, split_key, split_of
from pipeline.synth.generators import GenerationRequest, RetryPolicy, generate_with_retries
from pipeline.synth.prompts import PROMPT_VERSION

# On the wire to the committer: a pair (PAIR_SCHEMA) with the wire columns, a pair per origin and level.
SYNTH_WIRE = wire_schema(*PAIR_SCHEMA)


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
            from model.processing import decode_image  # torch: on the workers only

            try:
                decode_image(image, max_pixels)
            except SampleError as err:
                return err
    return None


class SynthStage(ShardStage):
    """A generation worker: reads shards and turns each origin into one training pair per level. The generator, the
    request cache and the thread pool (its requests in flight) are made in `setup`, once per actor."""

    name = "synth"
    schema = SYNTH_WIRE

    def __init__(self, resources: Resources, config: SynthConfig):
        super().__init__(resources)
        self.config = config
        self.rows_per_sample = len(config.levels)

    def setup(self) -> None:
        cfg = self.config
        self.generator = cfg.make_generator()
        self.cache = None if cfg.generator == "offline" else RequestCache(cfg.output, self.generator.name)
        self.policy = RetryPolicy(cfg.max_attempts, cfg.max_malformed, cfg.backoff_base_s, cfg.backoff_max_s)
        self.pool = ThreadPoolExecutor(cfg.threads_per_actor)
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def process_shard(self, shard: Shard) -> Iterator[pa.Table]:
        block = []
        for row in read_samples(shard, self.config.format, self.config.source):
            block.append(row)
            if len(block) == self.config.origins_per_block:
                yield self._pairs(block)
                block = []
        if block:
            yield self._pairs(block)

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
        return self.table(rows)

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
