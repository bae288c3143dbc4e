"""UniFilter: SigLIP vision tower -> average-pool projector + MLP -> Qwen2 -> last-token pooling -> score head.

Reads top to bottom like the diagram in docs/ARCHITECTURE.md. No Ray here: the model is a plain `nn.Module`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Model, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

from model.config import IMAGE_TOKEN_ID, NUM_LEVELS, UniFilterConfig

# Weights that stay fp32 whatever dtype the rest of the model is cast to: a bf16 regression head could only output
# 65 distinct scores between 2 and 3.
FP32_WEIGHT_PREFIXES = ("score_head.",)


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
        # Qwen2's rotary frequencies as its constructor computes them, fp32 on the host even when the model is
        # built on the meta device: every cast restores them from here, so a bf16 model rotates long documents
        # exactly as training (autocast, fp32 buffers) did.
        with torch.device("cpu"):
            rotary = type(self.llm.rotary_emb)(self.llm.rotary_emb.config)
        self._rotary_fp32 = dict(rotary.named_buffers())  # inv_freq, original_inv_freq

    @property
    def device(self) -> torch.device:
        return self.llm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's dtype (the score head is always fp32)."""
        return self.llm.embed_tokens.weight.dtype

    @staticmethod
    def keeps_fp32(weight_name: str) -> bool:
        """Whether a state-dict entry stays fp32 whatever dtype the model is loaded or cast to."""
        return weight_name.startswith(FP32_WEIGHT_PREFIXES)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 (or float in [0, 255]) -> (N, tokens_per_image, D) LLM-space image tokens."""
        tower = self.vision_tower
        # Normalise on the device: (x / 255 - 0.5) / 0.5, in fp32 before casting to the tower's dtype.
        x = pixel_values.to(self.device, torch.float32) / 127.5 - 1.0
        hidden = tower.embeddings(x.to(tower.embeddings.patch_embedding.weight.dtype))  # (N, g*g, Dv)
        # The selected encoder hidden state (LLaVA's mm_vision_select_layer), before `post_layernorm`: only the
        # layers up to it run.
        for layer in tower.encoder.layers[: self.config.vision_layers_used]:
            hidden = layer(hidden, None)
        return self.projector(hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        check_slots: bool = True,
    ) -> torch.Tensor:
        """Right-padded `input_ids` (B, L) with IMAGE_TOKEN_ID at image slots -> logits (B, num_labels), fp32.

        Pass `input_ids` on the host, as the processor makes them: the image/slot check then needs no device sync
        (a caller that checked the batch on the host before copying it passes `check_slots=False`)."""
        if check_slots:
            check_image_slots(input_ids, pixel_values, self.config.tokens_per_image)
        image_tokens = None
        if pixel_values is not None and pixel_values.shape[0]:
            image_tokens = self.encode_images(pixel_values)  # (N, T, D), in slot order
        embeds = self.embed(input_ids, image_tokens)  # (B, L, D)
        # No padding mask: with right padding and causal attention no real token attends to a pad, so the
        # pooled token's state is the same, and SDPA / flash attention take their causal fast path.
        hidden = self.llm(inputs_embeds=embeds, use_cache=False).last_hidden_state  # (B, L, D)
        return self.head(hidden, attention_mask)

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image tokens spliced in at the image slots: (B, L, D)."""
        input_ids = input_ids.to(self.device)
        image_slots = input_ids == IMAGE_TOKEN_ID  # (B, L)
        embeds = self.llm.embed_tokens(input_ids.masked_fill(image_slots, 0))  # (B, L, D)
        if image_tokens is not None:
            embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), image_tokens.to(embeds.dtype))
        return embeds

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state of each row's last non-pad token (right padding) through the fp32 score head."""
        last = attention_mask.to(hidden.device).sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # (B, D)
        with torch.autocast(pooled.device.type, enabled=False):  # the head runs in fp32, under autocast too
            return self.score_head(pooled)

    @torch.inference_mode()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        check_slots: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """Score records' `score`, `label` and `probs` (docs/ARCHITECTURE.md) for a collated batch:
        `model.score(**batch)`."""
        return scores_from_logits(self(input_ids, attention_mask, pixel_values, check_slots))

    # -- dtype and device ----------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Every `.to()`, `.half()`, `.bfloat16()`, `.cuda()` comes through here: the score head and the rotary
        frequencies follow the device but stay fp32, restored from exact fp32 values (never rounded and back)."""
        exact = self._fp32_sources()

        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            applied = fn(tensor)
            source = exact.get(id(tensor))
            if source is None or applied.dtype == torch.float32:
                return applied
            return applied.float() if applied.is_meta else source.to(applied.device, torch.float32, copy=True)

        return super()._apply(keep_fp32, recurse)

    def _fp32_sources(self) -> dict[int, torch.Tensor]:
        """id of each tensor that stays fp32 -> the exact value to restore it from."""
        sources: dict[int, torch.Tensor] = {}
        for name, param in self.named_parameters():
            if self.keeps_fp32(name):
                sources[id(param)] = param
                if param.grad is not None:
                    sources[id(param.grad)] = param.grad
        rotary = self.llm.rotary_emb
        for name, value in self._rotary_fp32.items():
            sources[id(getattr(rotary, name))] = value
        return sources

    def materialise_buffers(self, device: str | torch.device) -> None:
        """Compute the non-persistent buffers (never in a checkpoint) of a model built on the meta device, as the
        modules' constructors do; raises naming any meta tensor left over (a buffer a newer transformers added)."""
        rotary = self.llm.rotary_emb
        for name, value in self._rotary_fp32.items():
            setattr(rotary, name, value.to(device, copy=True))
        for module in self.modules():
            if isinstance(module, SiglipVisionEmbeddings):
                module.position_ids = torch.arange(module.num_positions, device=device).expand((1, -1))
        left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"still on the meta device after loading: {left} (a parameter missing from the "
                               "checkpoint, or a buffer this transformers version added that "
                               "UniFilter.materialise_buffers does not compute)")


def check_image_slots(input_ids: torch.Tensor, pixel_values: torch.Tensor | None, tokens_per_image: int) -> None:
    """Raise unless the batch has exactly one image per `tokens_per_image` image-slot tokens. Counting on the
    host costs no device sync; tensors already on an accelerator are counted there (a sync)."""
    n_slots = int((input_ids == IMAGE_TOKEN_ID).sum())
    n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
    if n_slots != n_images * tokens_per_image:
        raise ValueError(
            f"image/slot mismatch: the batch has {n_images} images ({n_images * tokens_per_image} image tokens) "
            f"but {n_slots} image-slot tokens ({n_slots / tokens_per_image:g} images' worth)"
        )


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
