"""UniFilter configuration: the named configs are JSON data in `model/configs/`, validated here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import Qwen2Config, SiglipVisionConfig

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_FORMAT = "unifilter/1"
# Image slots in `input_ids` hold this id (LLaVA's IMAGE_TOKEN_INDEX): it is no vocabulary id, so no text,
# not even a literal "<image>" in web text, can ever produce it.
IMAGE_TOKEN_ID = -200
NUM_LEVELS = 4  # quality levels 0 (easy negative) .. 3 (positive)


class UniFilterConfig(BaseModel):
    """Everything needed to build the model and its processor; saved as a checkpoint's `config.json`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["unifilter/1"] = CHECKPOINT_FORMAT
    name: str = "custom"
    tokenizer: Literal["tiny", "qwen2.5", "checkpoint"] = "checkpoint"
    vision: dict[str, Any]  # SiglipVisionConfig fields
    text: dict[str, Any]  # Qwen2Config fields
    num_labels: Literal[1, 4] = 1
    pool_size: int = Field(12, ge=1)  # tokens per side after the average pool: 12 -> 144 tokens per image
    # Which vision encoder output feeds the projector, indexed like LLaVA's `mm_vision_select_layer` into the
    # encoder's hidden states (0 = the patch embeddings): -1 is the last layer's output, -2 the penultimate.
    # Always before `post_layernorm`.
    vision_select_layer: int = -1
    max_images: int = Field(16, ge=1)
    max_tokens: int = Field(4096, ge=8)
    # Apply EXIF orientation when decoding images. Off: the released preprocessing (`Image.open(f).convert("RGB")`)
    # ignores it, and the model must see images as it was trained on them.
    exif_transpose: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    revision: str | None = None  # content hash of the weights, set when a checkpoint is saved

    @model_validator(mode="after")
    def _check_geometry(self) -> UniFilterConfig:
        grid = self.grid_size
        if self.pool_size > grid:
            raise ValueError(f"pool_size ({self.pool_size}) exceeds the vision patch grid ({grid}x{grid})")
        if self.max_tokens < self.tokens_per_image + 3:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must leave room for one image ({self.tokens_per_image} "
                "tokens) plus BOS, EOS and one text token"
            )
        layers = int(self.vision.get("num_hidden_layers", 0))
        if not -(layers + 1) <= self.vision_select_layer <= layers:
            raise ValueError(f"vision_select_layer ({self.vision_select_layer}) is outside the vision encoder's "
                             f"{layers + 1} hidden states")
        return self

    @property
    def vision_layers_used(self) -> int:
        """How many vision encoder layers run: all but those after the selected hidden state."""
        layers = int(self.vision["num_hidden_layers"])
        return self.vision_select_layer % (layers + 1)

    @property
    def image_size(self) -> int:
        return int(self.vision.get("image_size", 384))

    @property
    def grid_size(self) -> int:
        return self.image_size // int(self.vision.get("patch_size", 14))

    @property
    def tokens_per_image(self) -> int:
        return self.pool_size * self.pool_size

    def vision_config(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(**{**self.vision, "vision_use_head": False})

    def text_config(self) -> Qwen2Config:
        return Qwen2Config(**{**self.text, "pad_token_id": self.pad_token_id})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name: str, num_labels: int = 1) -> UniFilterConfig:
    """A named config (`tiny`, `qwen2.5-0.5b`, `qwen2.5-1.5b`) with a regression (1) or 4-way (4) head."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model config {name!r}; choose one of {named_configs()}")
    return UniFilterConfig(**json.loads(path.read_text()), num_labels=num_labels)
