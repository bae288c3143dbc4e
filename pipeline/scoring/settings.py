"""Scoring's settings as one value: what loading and running the model needs (the checkpoint, its precision, how
micro-batches are sized, how images are decoded, whether to compile), validated once when it is built and taken
whole by the scoring stage, `load_scorer`, the public `UniFilterScorer` and `score_shards`. The defaults that depend
on the device are decided here, once (`decided`, `on_device`). Importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from model.limits import DEFAULT_DECODE_MEMORY, DEFAULT_MAX_IMAGE_PIXELS, ImageDecoding

Precision = Literal["auto", "bfloat16", "float16", "float32"]
ImageDecoder = Literal["pillow", "nvjpeg"]


@dataclass(frozen=True)
class ScoringSettings:
    """How one scoring actor (or a notebook's scorer) loads and runs the model. `dtype` `auto`, `compile` None and
    `token_budget` None are decided for the device (`on_device`); `weights` is the digest the run's identity names
    (the loaded weights are checked against it), None to check nothing."""

    model: str
    dtype: Precision = "auto"
    token_budget: int | None = None  # padded tokens per forward pass (rows x longest)
    max_batch: int = 256  # most samples per forward pass
    decode_threads: int = 1
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    jpeg_draft: bool = False
    decode_memory: int = DEFAULT_DECODE_MEMORY
    image_decoder: ImageDecoder = "pillow"
    compile: bool | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in get_args(Precision):
            raise ValueError(f"field 'dtype': {self.dtype!r} is not one of {', '.join(get_args(Precision))}")
        if self.image_decoder not in get_args(ImageDecoder):
            raise ValueError(f"field 'image_decoder': {self.image_decoder!r} is neither 'pillow' nor 'nvjpeg'")
        if self.image_decoder == "nvjpeg" and self.jpeg_draft:
            raise ValueError("field 'image_decoder': nvjpeg decodes JPEGs at full size on the device, so jpeg_draft "
                             "(reduced-scale decoding by Pillow) cannot apply: set one of them")
        for name in ("max_batch", "decode_threads", "max_image_pixels", "decode_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"field '{name}': must be at least 1, not {getattr(self, name)}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"field 'token_budget': must be at least 1, not {self.token_budget}")

    @property
    def decoding(self) -> ImageDecoding:
        """What the processor is built with."""
        return ImageDecoding(self.max_image_pixels, self.jpeg_draft, self.decode_memory)

    def decided(self, on_gpu: bool) -> ScoringSettings:
        """The defaults that change scores (the output's identity names them) decided for a device that is (or is
        not) a GPU: precision `auto` is bfloat16 on a GPU and float32 on CPUs; the model is compiled on a GPU."""
        dtype = ("bfloat16" if on_gpu else "float32") if self.dtype == "auto" else self.dtype
        return replace(self, dtype=dtype, compile=on_gpu if self.compile is None else self.compile)

    def on_device(self, on_gpu: bool) -> ScoringSettings:
        """Everything decided for the device this process holds: `decided`, and the token budget (32768 padded
        tokens on a GPU, 8192 on CPUs)."""
        decided = self.decided(on_gpu)
        return replace(decided, token_budget=decided.token_budget or (32768 if on_gpu else 8192))
