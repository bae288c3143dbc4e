"""Synthetic training pairs: their configuration (`SynthConfig`, every field of `python -m jobs.synth`), their
schema, and how origins are split between training and validation."""

from __future__ import annotations

import hashlib
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import InputError
from pipeline.io.samples import SAMPLE_SCHEMA, SourceOptions
from pipeline.runner.executors import ExecutorName, executor_field
from pipeline.synth.generators import BedrockGenerator, OfflineGenerator, OpenAIGenerator

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
    moved_from: str | None = Field(
        None, description="the input root this output's committed shards were read from, when the corpus has moved "
                          "since (they are not read again); default: none (a shard committed from another location "
                          "is refused)")
    executor: ExecutorName = executor_field()

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

    def check_generator_environment(self) -> None:
        """What a generator needs from the environment rather than the config (Bedrock: a region and credentials from
        the AWS chain), refused naming the field to set, before anything starts: botocore would otherwise fail
        with a traceback (no region) or every request would (no credentials)."""
        if self.generator != "bedrock":
            return
        import boto3

        session = boto3.session.Session()
        if not (self.region or session.region_name):
            raise InputError("region", "generator 'bedrock' needs an AWS region and the AWS chain has none: set "
                                       "region (e.g. us-east-1), or AWS_REGION, or a region in ~/.aws/config")
        if session.get_credentials() is None:
            raise InputError("generator", "generator 'bedrock' needs AWS credentials and the AWS chain has none "
                                          "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an "
                                          "instance role)")

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
