"""`python -m jobs.curate`'s configuration: every field is a YAML key and a `--flag`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.curation import rank, where
from pipeline.curation.rule import Rule
from pipeline.io.samples import SourceOptions
from pipeline.io.uris import normalize_uri
from pipeline.runner.executors import ExecutorName, executor_field


class CurateConfig(BaseModel):
    """`python -m jobs.curate`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    scores: str = Field(description="a scoring job's output (its committed records are read)")
    output: str = Field(description="where selected/, shards/ (with materialize) and summary.json go")
    min_score: float | None = Field(None, allow_inf_nan=False, description="keep records scoring at least this")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="keep this share of the best-scored records")
    per_kind: bool = Field(False, description="apply the rule within each kind (captions, documents) separately")
    input: str | None = Field(None, description="the scored corpus, if it moved since it was scored (default: the "
                                                "shards the score records name)")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] | None = Field(
        None, description="the scored corpus' format")
    where: str | None = Field(None, description="keep only records meeting this condition over the score records' "
                                                "and the corpus metadata's columns, e.g. \"width >= 200 and not "
                                                "truncated\" (applied before keep_fraction)")
    drop_truncated: bool = Field(False, description="drop records whose text was truncated (as where \"not "
                                                    "truncated\")")
    min_images: int | None = Field(None, ge=0, description="drop records with fewer images (as where "
                                                           "\"n_images >= N\")")
    rank_by: str | None = Field(None, description="rank by this numeric expression of score and metadata columns "
                                                   "instead of the score, with pct(column) the record's percentile "
                                                   "in its kind, e.g. \"0.7*pct(score) + 0.3*pct(similarity)\" "
                                                   "(with keep_fraction; records carry it as rank_value)")
    balance_by: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="cap what each value of this column (of the score records or the "
                                               "metadata) contributes: at most max_per_group kept records each, the "
                                               "best by the ranking")
    max_per_group: int | None = Field(None, ge=1, description="with balance_by: the most kept records per value")
    exclude: list[str] | None = Field(None, description="drop the samples a list names, whatever their score: a "
                                                        "Parquet or text file of ids, keys, URLs or image sha256 "
                                                        "values (repeatable; the column from its header or "
                                                        "exclude_column)")
    exclude_column: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                       description="the column every exclude list matches (id, key, url, sha256, "
                                                   "...); a text list then has no header line")
    write_dropped: bool = Field(False, description="also write the dropped records to dropped/, each with the "
                                                   "first rule that removed it (dropped_by)")
    export_ids: bool = Field(False, description="once every shard is committed, write the kept ids to "
                                                "kept_ids.parquet (id, key, url, score) and, where the metadata has "
                                                "DataComp's uid column, uids.npy as DataComp's training reads it")
    sweep: list[float] | None = Field(None, description="with --dry-run: the fractions (or, with min_score, the "
                                                        "minimum scores) to tabulate, also compared in --report; "
                                                        "refused in a run with neither (default: a standard set)")
    materialize: bool = Field(False, description="also write the kept samples as shards in the input's format")
    samples_per_shard: int | None = Field(None, ge=1, description="write the kept samples as balanced shards of N "
                                                                  "samples per format in shards/<format>/ (with "
                                                                  "img2dataset sidecars), instead of one per input "
                                                                  "shard; implies materialize")
    report: str | None = Field(None, description="write an HTML report (index.html) to this directory")
    examples: int = Field(8, ge=1, le=64, description="example records per report section")
    report_shards: int = Field(8, ge=1, description="input shards the report reads its examples from")
    histogram_bins: int = Field(50, ge=5, le=500, description="bins of the report's score histograms")
    workers: int = Field(2, ge=1, description="most selection workers (one input shard per call)")
    source: SourceOptions = Field(default_factory=SourceOptions, description="how inputs are read")
    executor: ExecutorName = executor_field()
    no_progress_timeout_s: float = Field(3600.0, gt=0, description="how long the job may make no progress")

    @model_validator(mode="after")
    def _rule(self) -> CurateConfig:
        if (self.min_score is None) == (self.keep_fraction is None):
            raise ValueError("set exactly one of field 'min_score' and field 'keep_fraction'")
        if (self.input is None) != (self.format is None):
            raise ValueError("fields 'input' and 'format' go together")
        if normalize_uri(self.output).rstrip("/") == normalize_uri(self.scores).rstrip("/"):
            raise ValueError(f"field 'output': {self.output} is the scores' own output: curation writes its "
                             "records, shards and summary elsewhere (choose another output)")
        if self.where is not None:
            where.parse(self.where)  # the syntax, before anything runs; the columns once the corpus is known
        if self.rank_by is not None:
            if self.keep_fraction is None:
                raise ValueError("field 'rank_by': it ranks the records for keep_fraction (a minimum score is a "
                                 "cut on the score itself): use --keep-fraction with --rank-by")
            rank.parse(self.rank_by)  # the syntax, before anything runs; the columns once the corpus is known
        if (self.balance_by is None) != (self.max_per_group is None):
            missing = "max_per_group" if self.max_per_group is None else "balance_by"
            raise ValueError(f"field '{missing}': balance_by and max_per_group go together (at most N kept records "
                             "per value of the column)")
        if self.exclude_column is not None and not self.exclude:
            raise ValueError("field 'exclude_column': it names the column of the exclude lists, and none is given "
                             "(add --exclude FILE)")
        if self.exclude is not None and (not self.exclude or not all(f.strip() for f in self.exclude)):
            raise ValueError("field 'exclude': give a list's file (a Parquet or text file)")
        if self.sweep is not None:
            self.rule.check_sweep(self.sweep)
        return self

    @property
    def rule(self) -> Rule:
        """The rule, the one place that tells a minimum score from a fraction (`pipeline.curation.rule`)."""
        if self.keep_fraction is not None:
            return Rule("keep_fraction", self.keep_fraction, self.per_kind, self.rank_by)
        return Rule("min_score", self.min_score, self.per_kind)
