"""Convert a released LLaVA-style UniFilter checkpoint (e.g. `weizhiwang/UniFilter-Qwen2.5-1.5B`) to ours.

    python -m model.convert --llava SRC --output DST

SRC is a local directory, an `s3://` prefix or a hub id; DST a directory or `s3://` prefix. `model.load` applies
the same conversion in memory when it meets a LLaVA-style checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.config import UniFilterConfig, get_config
from model.tokenization import ENDOFTEXT, add_pad_token

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


def convert_llava(directory: Path) -> tuple[UniFilterConfig, dict[str, torch.Tensor], object]:
    """(config, weights in our key layout, tokenizer) from a LLaVA-style checkpoint directory."""
    from model.checkpoint import CheckpointError, read_weights

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    source = read_weights(directory)

    weights: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in source.items():
        try:
            ours = map_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if ours is not None:
            weights[ours] = tensor
    if unknown:
        raise CheckpointError(f"LLaVA checkpoint {directory}: unexpected weight keys {sorted(unknown)[:8]}")
    if "score_head.weight" not in weights:
        raise CheckpointError(f"LLaVA checkpoint {directory}: missing weight key score.weight")
    if "llm.embed_tokens.weight" not in weights:
        raise CheckpointError(f"LLaVA checkpoint {directory}: missing weight key model.embed_tokens.weight")

    text = {k: raw[k] for k in _TEXT_FIELDS if k in raw}
    text["vocab_size"] = int(weights["llm.embed_tokens.weight"].shape[0])
    text["tie_word_embeddings"] = False
    vision = vision_config_for(raw["mm_vision_tower"], directory)
    vision["vision_use_head"] = False
    num_labels = int(weights["score_head.weight"].shape[0])
    if num_labels not in (1, 4):
        raise CheckpointError(f"LLaVA checkpoint {directory}: score head has {num_labels} outputs (expected 1 or 4)")
    image_tokens = int(raw.get("mm_num_image_tokens", 144))
    pool_size = math.isqrt(image_tokens)
    if pool_size * pool_size != image_tokens:
        raise CheckpointError(f"mm_num_image_tokens {image_tokens} is not a square number of pooled tokens")

    tokenizer = add_pad_token(AutoTokenizer.from_pretrained(str(directory)))
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = UniFilterConfig(
        name=f"llava:{raw.get('_name_or_path') or directory.name}",
        vision=vision,
        text=text,
        num_labels=num_labels,
        pool_size=pool_size,
        max_tokens=int(raw.get("tokenizer_model_max_length") or 4096),
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, weights, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n")[1])
    parser.add_argument("--llava", required=True, help="released checkpoint: local dir, s3:// prefix or hub id")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)

    from model.checkpoint import CheckpointError, build, resolve, save

    try:
        with tempfile.TemporaryDirectory(prefix="unifilter-convert-") as work:
            directory, _ = resolve(args.llava, work)
            config, weights, tokenizer = convert_llava(directory)
            model, _ = build(config, tokenizer, weights, source=args.llava)
            revision = save(model, tokenizer, args.output)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.llava} -> {args.output}: {n_params / 1e6:.1f}M parameters, "
          f"num_labels={config.num_labels}, revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
