"""The released LLaVA-style UniFilter layout (e.g. `weizhiwang/UniFilter-Qwen2.5-1.5B`): recognise it, and convert
its config and weight names to ours. Needs only config.json, the tokenizer and the weights' shapes (from the
safetensors headers), never the weights themselves: `model.load` renames tensors as it reads them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from model.config import UniFilterConfig, get_config
from model.errors import CheckpointError
from model.tokenization import ENDOFTEXT, add_pad_token

SCORE_KEY = "score.weight"
EMBED_KEY = "model.embed_tokens.weight"
# Vision towers whose config we know without a download (the weights come from the checkpoint itself).
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": lambda: get_config("qwen2.5-1.5b").vision,
}
_TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "hidden_act",
    "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
)
_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "layer_norm_eps", "hidden_act", "attention_dropout",
)
# (LLaVA prefix, our prefix); None drops keys UniFilter never uses (SigLIP's attention-pooling head).
KEY_MAP = (
    ("model.vision_tower.vision_tower.vision_model.head.", None),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.mm_projector.mlp_projector.", "projector.mlp."),
    ("score.", "score_head."),
    ("model.", "llm."),
)


def is_llava_config(raw: Mapping) -> bool:
    return "mm_vision_tower" in raw


def map_key(key: str) -> str | None:
    """Our name for a LLaVA-style weight key; None for a key that is dropped on purpose; KeyError otherwise."""
    for prefix, ours in KEY_MAP:
        if key.startswith(prefix):
            if ours is None:
                return None
            rest = key[len(prefix):]
            if ours == "llm." and rest.startswith(("vision_tower.", "mm_projector.")):
                break  # a projector or tower layout this converter does not know
            return ours + rest
    raise KeyError(key)


def rename_table(keys: Iterable[str], source: str) -> dict[str, str | None]:
    """LLaVA key -> our key (None: dropped) for every key of a checkpoint; raises naming keys it does not know."""
    table, unknown = {}, []
    for key in keys:
        try:
            table[key] = map_key(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"LLaVA checkpoint {source}: unexpected weight keys {sorted(unknown)[:8]}")
    return table


def vision_config_for(tower: str, checkpoint_dir: Path) -> dict:
    """The vision tower's config from `mm_vision_tower`: a local directory with config.json, or a known hub id."""
    for candidate in (Path(tower).expanduser(), checkpoint_dir / tower):
        cfg_path = candidate / "config.json"
        if cfg_path.is_file():
            raw = json.loads(cfg_path.read_text())
            raw = raw.get("vision_config", raw)  # a full SigLIP config nests the vision part
            return {k: raw[k] for k in _VISION_FIELDS if k in raw}
    if tower in KNOWN_VISION_TOWERS:
        return KNOWN_VISION_TOWERS[tower]()
    raise ValueError(
        f"mm_vision_tower {tower!r} is neither a local directory with a config.json nor a known tower "
        f"({sorted(KNOWN_VISION_TOWERS)})"
    )


def convert_config(raw: Mapping, shapes: Mapping[str, tuple[int, ...]], tokenizer, directory: Path,
                   source: str) -> UniFilterConfig:
    """Our config for a LLaVA-style checkpoint from its config.json (`raw`), its weights' shapes (LLaVA names:
    the head's width gives num_labels, the embedding's rows the vocabulary size) and its tokenizer (given the
    recipe's `[PAD]` here if it lacks one)."""
    for key in (SCORE_KEY, EMBED_KEY):
        if key not in shapes:
            raise CheckpointError(f"LLaVA checkpoint {source}: missing weight key {key}")
    num_labels = int(shapes[SCORE_KEY][0])
    if num_labels not in (1, 4):
        raise CheckpointError(f"LLaVA checkpoint {source}: score head has {num_labels} outputs (expected 1 or 4)")
    image_tokens = int(raw.get("mm_num_image_tokens", 144))
    pool_size = math.isqrt(image_tokens)
    if pool_size * pool_size != image_tokens:
        raise CheckpointError(f"mm_num_image_tokens {image_tokens} is not a square number of pooled tokens")

    text = {k: raw[k] for k in _TEXT_FIELDS if k in raw}
    text["vocab_size"] = int(shapes[EMBED_KEY][0])
    text["tie_word_embeddings"] = False
    vision = {**vision_config_for(raw["mm_vision_tower"], directory), "vision_use_head": False}
    add_pad_token(tokenizer)
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return UniFilterConfig(
        name=f"llava:{raw.get('_name_or_path') or directory.name}",
        vision=vision,
        text=text,
        num_labels=num_labels,
        pool_size=pool_size,
        vision_select_layer=int(raw.get("mm_vision_select_layer", -1)),
        max_tokens=int(raw.get("tokenizer_model_max_length") or 4096),
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
