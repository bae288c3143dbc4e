"""Write a randomly initialised checkpoint from a named config (tests, benchmarks, the demo).

    python -m model.create --config tiny|qwen2.5-0.5b|qwen2.5-1.5b --output DIR [--num-labels 1|4] [--seed N]
"""

from __future__ import annotations

import argparse
import sys

import torch

from model.config import get_config, named_configs


def config_and_tokenizer(name: str, num_labels: int = 1):
    """A named config with its offline tokenizer, the config's special-token ids taken from that tokenizer."""
    from model.tokenization import build_tokenizer

    config = get_config(name, num_labels=num_labels)
    tokenizer = build_tokenizer(config.tokenizer)
    if len(tokenizer) > config.text["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the config's vocab_size")
    config = config.model_copy(update={
        "tokenizer": "checkpoint",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    })
    return config, tokenizer


def create(name: str, output: str, num_labels: int = 1, seed: int = 0, dtype: str = "float32") -> str:
    from model.checkpoint import build, save

    config, tokenizer = config_and_tokenizer(name, num_labels)
    torch.manual_seed(seed)
    model, _ = build(config, tokenizer)
    model.to(getattr(torch, dtype))
    return save(model, tokenizer, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.create", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, choices=named_configs())
    parser.add_argument("--output", required=True, help="directory or s3:// prefix")
    parser.add_argument("--num-labels", type=int, default=1, choices=(1, 4),
                        help="1: regression over levels 0-3 (the released recipe); 4: classification")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    revision = create(args.config, args.output, args.num_labels, args.seed, args.dtype)
    print(f"wrote a random-initialised {args.config} checkpoint (num_labels={args.num_labels}) "
          f"to {args.output}, revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
