"""UniFilter: SigLIP vision tower -> average-pool projector + MLP -> Qwen2 -> last-token pooling -> score head.

Reads top to bottom like the diagram in DESIGN.md. No Ray here: the model is a plain `nn.Module`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Model, SiglipVisionModel

from model.config import IMAGE_TOKEN_ID, NUM_LEVELS, UniFilterConfig


class Projector(nn.Module):
    """Patch grid (g x g) -> AdaptiveAvgPool2d to (p x p) tokens -> Linear, GELU, Linear to the LLM width."""

    def __init__(self, vision_width: int, llm_width: int, pool_size: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((pool_size, pool_size))  # 27x27 -> 12x12: overlapping windows
        self.mlp = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, num_patches, width = patches.shape  # (N, g*g, Dv)
        grid = int(num_patches**0.5)
        x = patches.transpose(1, 2).reshape(n, width, grid, grid)  # (N, Dv, g, g), row-major patches
        x = self.pool(x).flatten(2).transpose(1, 2)  # (N, p*p, Dv)
        return self.mlp(x)  # (N, p*p, D)


class UniFilter(nn.Module):
    def __init__(self, config: UniFilterConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config())
        self.llm = Qwen2Model(config.text_config())
        self.projector = Projector(
            config.vision["hidden_size"], config.text["hidden_size"], config.pool_size
        )
        self.score_head = nn.Linear(config.text["hidden_size"], config.num_labels, bias=False)
        self.model_id = config.name  # replaced by `model.load` with the checkpoint's URI and revision

    @property
    def device(self) -> torch.device:
        return self.score_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.score_head.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 (or float in [0, 255]) -> (N, tokens_per_image, D) LLM-space image tokens."""
        # Normalise on the device: (x / 255 - 0.5) / 0.5, in fp32 before casting to the model's dtype.
        x = (pixel_values.to(self.device, torch.float32) / 127.5 - 1.0).to(self.dtype)
        tower = self.vision_tower
        # The last encoder layer's patch features, before `post_layernorm` (= hidden_states[-1]).
        patches = tower.encoder(inputs_embeds=tower.embeddings(x)).last_hidden_state  # (N, g*g, Dv)
        return self.projector(patches)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Right-padded `input_ids` (B, L) with IMAGE_TOKEN_ID at image slots -> logits (B, num_labels), fp32."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        image_slots = input_ids == IMAGE_TOKEN_ID  # (B, L)
        embeds = self.llm.embed_tokens(input_ids.masked_fill(image_slots, 0))  # (B, L, D)

        n_slots = int(image_slots.sum())
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        per_image = self.config.tokens_per_image
        if n_slots != n_images * per_image:
            raise ValueError(
                f"image/slot mismatch: the batch has {n_images} images ({n_images * per_image} image tokens) "
                f"but {n_slots} image-slot tokens ({n_slots / per_image:g} images' worth)"
            )
        if n_images:
            image_tokens = self.encode_images(pixel_values)  # (N, T, D), in slot order
            embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), image_tokens.to(embeds.dtype))

        hidden = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # the last non-pad token (right padding)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
        return self.score_head(pooled).float()

    @torch.inference_mode()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Score records' `score`, `label` and `probs` (DESIGN.md) for a collated batch: `model.score(**batch)`."""
        return scores_from_logits(self(input_ids, attention_mask, pixel_values))


def scores_from_logits(logits: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Regression head: score = output, label = round and clip to 0-3, no probs. 4-way head: probs = softmax,
    score = expected level sum_k k * p_k, label = argmax."""
    if logits.shape[-1] == 1:
        score = logits[:, 0]
        label = score.round().clamp(0, NUM_LEVELS - 1).to(torch.int8)
        return {"score": score, "label": label, "probs": None}
    probs = logits.softmax(dim=-1)
    levels = torch.arange(NUM_LEVELS, dtype=probs.dtype, device=probs.device)
    return {"score": probs @ levels, "label": probs.argmax(dim=-1).to(torch.int8), "probs": probs}
