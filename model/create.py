"""Write a randomly initialised checkpoint from a named config (tests, benchmarks, the demo).

    python -m model.create --config tiny|qwen2.5-0.5b|qwen2.5-1.5b --output DIR [--num-labels 1|4] [--seed N]
"""

from __future__ import annotations

import argparse
import sys

from model.checkpoint import config_and_tokenizer, create
from model.config import named_configs

__all__ = ["config_and_tokenizer", "create", "main"]


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
