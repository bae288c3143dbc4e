"""`python -m jobs.score`'s configuration: every field is a YAML key and a `--flag`; it builds the scoring actors'
settings (`pipeline.scoring.settings.ScoringSettings`, where the precision and compiling defaults are decided)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.limits import DEFAULT_DECODE_MEMORY, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.io.samples import SourceOptions
from pipeline.runner.executors import ExecutorName, executor_field
from pipeline.runner.resources import expects_gpu
from pipeline.scoring.settings import ImageDecoder, Precision, ScoringSettings

# Images are decoded beside the GPU now, by the scoring actor's own threads: the CPU workers that decoded them
# before are gone, and the stage before the model only reads shards.
REMOVED_FIELDS = {
    "preprocess_workers": "images are decoded beside the GPU by the scoring actors' own threads (cpus_per_actor, "
                          "decode_threads); shard readers are read_workers",
    "preprocess_cpus": "images are decoded beside the GPU (cpus_per_actor sizes the decoding); the CPUs of a shard "
                       "reader are read_cpus",
}


class ScoreConfig(BaseModel):
    """`python -m jobs.score`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="input shards: a directory, s3:// prefix, glob or {000..999} range (quote "
                                   "both), or .txt list")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] = Field(description="input format")
    output: str = Field(description="output directory or s3:// prefix")
    model: str = Field(description="checkpoint: local dir, s3:// prefix or Hugging Face hub id")
    concurrency: int = Field(1, ge=1, description="most scoring actors (the pool autoscales up to this)")
    min_actors: int = Field(1, ge=1, description="fewest scoring actors kept alive")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per scoring actor (0.5 packs two per GPU); default: 1 on a cluster reached "
                                "through RAY_ADDRESS (which must have or be able to start GPU nodes), else 1 if "
                                "this machine has a GPU")
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs per scoring actor: its images are decoded, resized and tokenised by its own "
                                "threads beside the device; default: 6 beside a GPU (a core decodes 140-330 web "
                                "images/s; a GPU scores 600+), 1 on CPUs")
    decode_threads: int | None = Field(
        None, ge=1, description="decode threads per scoring actor; default: its CPUs")
    read_cpus: float = Field(1.0, gt=0, description="CPUs per shard reader (it hands the scoring actors the samples "
                                         "as read: encoded images and text)")
    read_workers: int | None = Field(
        None, ge=1, description="most shard readers; default: one per 4 GPU scoring actors on a cluster (at least "
                    "one), one when local")
    compile: bool | None = Field(
        None, description="compile the model (torch.compile: the vision tower per image-count bucket, the LLM with "
                          "dynamic shapes); default: on when the scoring actors hold GPUs, off on CPUs")
    accelerator_type: str | None = Field(
        None, description="pin the scoring actors to one GPU type (Ray's accelerator types: H200, H100, L40S, ...); "
                          "default: any GPU")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1,
                                  description="larger images are errors (decompression bombs)")
    decode_memory: int = Field(
        DEFAULT_DECODE_MEMORY, ge=2**20,
        description="bytes of decoded pixels a scoring actor's decode threads hold at once (each image's estimated "
                    "from its header before it is decoded: big images wait for each other, small ones flow; an "
                    "image larger than this is decoded alone, max_image_pixels bounding it)")
    jpeg_draft: bool = Field(
        False, description="decode large JPEGs at reduced scale (1.4x faster preprocessing, <1 grey level mean diff)")
    image_decoder: ImageDecoder = Field(
        "pillow", description="what decodes JPEGs: pillow (the actors' decode threads) or nvjpeg (a batched "
                              "torchvision decode_jpeg on the actor's device, then pad and resize there; needs "
                              "torchvision; on CPU actors torchvision's CPU decoder; other formats stay Pillow's); "
                              "off by default until a GPU run shows its scores agree (benchmarks/gpu.py)")
    batch_size: int | None = Field(
        None, ge=1, description="rows handed to a scoring actor per call; default 4 x max_batch, so micro-batches "
                                "fill up to max_batch or the token budget")
    call_bytes: int = Field(
        128 * 2**20, ge=2**20,
        description="bytes of samples handed to a scoring actor per call, besides batch_size rows: calls of big "
                    "samples (documents) have fewer rows, captions fill batch_size as before; a call holds at most "
                    "about twice this")
    token_budget: int | None = Field(
        None, ge=64, description="padded tokens per forward pass (rows x longest); default 32768 on GPU, 8192 on CPU")
    max_batch: int = Field(256, ge=1, description="most samples per forward pass")
    dtype: Precision = Field(
        "auto", description="model precision; auto: bfloat16 on GPU, float32 on CPU")
    source: SourceOptions = Field(default_factory=SourceOptions, description="how inputs are read")
    moved_from: str | None = Field(
        None, description="the input root this output's committed shards were read from, when the corpus has moved "
                          "since (they are not scored again); default: none (a shard committed from another "
                          "location is refused)")
    no_progress_timeout_s: float = Field(
        3600.0, gt=0, description="seconds the job may make no progress (e.g. waiting for GPU nodes to start)")
    executor: ExecutorName = executor_field()
    gpu_rate: float | None = Field(
        None, gt=0, description="for --dry-run's estimate: samples/s one GPU scores; default: the README's reference "
                                "rates for one H200 (captions: 379/s up to 1B parameters, 282/s above; documents: a "
                                "quarter of that)")
    gpu_hour_price: float = Field(5.0, ge=0, description="for --dry-run's estimate: USD per GPU-hour")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, values):
        """Fields of earlier releases whose meaning changed: named, never quietly mapped onto their successors."""
        if isinstance(values, dict):
            for name, why in REMOVED_FIELDS.items():
                if name in values:
                    raise ValueError(f"field '{name}': removed: {why}")
        return values

    @model_validator(mode="after")
    def _pool_bounds(self) -> ScoreConfig:
        if self.min_actors > self.concurrency:
            raise ValueError(f"min_actors ({self.min_actors}) exceeds concurrency ({self.concurrency})")
        return self

    @model_validator(mode="after")
    def _valid_settings(self) -> ScoreConfig:
        """The scoring settings' own checks (nvjpeg with jpeg_draft, say), made as the configuration is read."""
        self._settings(None, 1.0)
        return self

    def _settings(self, weights: str | None, actor_cpus: float) -> ScoringSettings:
        return ScoringSettings(
            model=self.model, dtype=self.dtype, token_budget=self.token_budget, max_batch=self.max_batch,
            decode_threads=self.decode_threads or max(1, int(actor_cpus)), max_image_pixels=self.max_image_pixels,
            jpeg_draft=self.jpeg_draft, decode_memory=self.decode_memory, image_decoder=self.image_decoder,
            compile=self.compile, weights=weights)

    def settings(self, weights: str | None = None, actor_cpus: float = 1.0) -> ScoringSettings:
        """What each scoring actor loads and runs the model with: `weights` the digest its identity names, decode
        threads one per CPU of the actor unless set; the precision and compiling decided (`ScoringSettings.decided`)
        for the device the actors are expected to hold (the output's identity names both); the token budget left
        to the device they get."""
        on_gpu = expects_gpu(self.gpus_per_actor, self.executor == "ray")
        return self._settings(weights, actor_cpus).decided(on_gpu)

    def identity(self, model_id: str, weights: str | None = None) -> dict:
        """What the output's records depend on: the model (its weights' digest) and the settings that change
        scores."""
        revision = model_id.rsplit("@", 1)[1] if "@" in model_id else None
        s, settings = self.source, self.settings(weights)
        return {"model": {"id": model_id, "revision": revision, "weights": weights}, "dtype": settings.dtype,
                "jpeg_draft": self.jpeg_draft, **({"compiled": True} if settings.compile else {}),
                **({"image_decoder": self.image_decoder} if self.image_decoder != "pillow" else {}),
                "max_image_pixels": self.max_image_pixels,
                "columns": [s.image_column, s.text_column, s.texts_column, s.images_column, s.id_column]}
