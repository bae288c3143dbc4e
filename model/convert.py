"""Convert a released LLaVA-style UniFilter checkpoint (e.g. `weizhiwang/UniFilter-Qwen2.5-1.5B`) to ours.

    python -m model.convert --llava SRC --output DST

SRC is a local directory, an `s3://` prefix or a hub id; DST a directory or `s3://` prefix. `model.load` applies
the same conversion (`model.llava`) as it reads a LLaVA-style checkpoint; this writes the result out.
"""

from __future__ import annotations

import argparse
import sys

from model.checkpoint import load, save
from model.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--llava", required=True, help="released checkpoint: local dir, s3:// prefix or hub id")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    try:
        model, processor = load(args.llava)
        revision = save(model, processor.tokenizer, args.output)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.llava} -> {args.output}: {n_params / 1e6:.1f}M parameters, "
          f"num_labels={model.config.num_labels}, revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
