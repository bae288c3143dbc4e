"""`TrainConfig`: every field of `python -m jobs.train` (a YAML key and a `--flag`), validated at the edge."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.io.uris import join


class TrainConfig(BaseModel):
    """`python -m jobs.train`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    train: str = Field(description="training pairs: a directory or s3:// prefix of Parquet (jobs.synth's train/)")
    val: str = Field(description="validation pairs (jobs.synth's val/)")
    output: str = Field(description="where best/ and the summary go (a directory or s3:// prefix)")
    architecture: Literal["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"] = Field(
        "tiny", alias="model_config", description="named config for a new model (ignored with --init)")
    init: str | None = Field(None, description="start from this checkpoint (dir, s3:// or hub id; LLaVA-style too); "
                                               "default: a new model of model_config")
    num_labels: Literal[1, 4] | None = Field(
        None, description="1: regression + MSE; 4: cross-entropy; default: the --init checkpoint's head, else 1")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool | None = Field(
        None, description="one GPU per worker; default: yes on a cluster reached through RAY_ADDRESS (which must have "
                          "or be able to start GPU nodes), else yes if this machine has a GPU")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; default: 1, less on a small local machine so the data "
                                "feed keeps a CPU")
    feed_cpus: float = Field(1.0, gt=0, description="CPUs kept free for the data feed (decode + tokenize) on the local "
                                                    "instance")
    epochs: int = Field(3, ge=1, description="passes over the training pairs")
    batch_size: int = Field(16, ge=1, description="samples per worker per optimizer step (before grad_accum)")
    token_budget: int | None = Field(
        None, ge=64, description="padded tokens per forward pass; a step's batch is split to fit (default 16384 on "
                                 "GPU, 8192 on CPU)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default: 1e-3 for a new tiny model, 2e-5 "
                                                     "otherwise")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    stage: Literal["full", "projector"] = Field("full", description="full: projector + LLM + head; projector: stage 1")
    train_vision: bool = Field(False, description="also train the vision tower (for a tower that is not pretrained, "
                                                  "e.g. a tiny model from scratch; the released recipe freezes it)")
    gradient_checkpointing: bool | None = Field(
        None, description="trade compute for memory in the LLM; default: on for the real configs on GPU")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU")
    seed: int = Field(0, description="initialisation, shuffling and (new model) weights seed")
    name: str = Field("unifilter", description="run name: rerun with the same name and storage to resume")
    storage: str | None = Field(None, description="Ray Train storage for checkpoints; default: OUTPUT/ray_train")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept (the best by validation accuracy)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps; default: at "
                                                                       "each epoch's end only")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps; default: no limit")
    shuffle_buffer: int = Field(256, ge=0, description="local shuffle buffer of training samples")
    no_progress_timeout_s: float = Field(
        1800.0, gt=0, description="seconds without a training step after which the run is ended with an error "
                                  "(start-up, e.g. GPU nodes starting, included)")

    @model_validator(mode="after")
    def _stage_needs(self) -> TrainConfig:
        if self.gradient_checkpointing and self.stage == "projector":
            raise ValueError("field 'gradient_checkpointing' has no effect with stage 'projector' (the LLM is frozen)")
        return self

    @property
    def storage_uri(self) -> str:
        return self.storage or join(self.output, "ray_train")

    @property
    def peak_lr(self) -> float:
        return self.lr or (1e-3 if self.architecture == "tiny" and not self.init else 2e-5)

    def checkpointing_on(self, on_gpu: bool) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return on_gpu and self.stage == "full" and (self.init is not None or self.architecture != "tiny")

    def micro_token_budget(self, on_gpu: bool) -> int:
        return self.token_budget or (16384 if on_gpu else 8192)
