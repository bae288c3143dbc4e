"""How many samples shards hold, from listings and metadata alone (what dry runs say): no Ray, nothing written.

Sample counts come from the shards' own metadata where there is some (Parquet footers; img2dataset's
`<stem>_stats.json` beside each tar), else from reading a few shards and scaling by size; the plan says which.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import ShardFault
from pipeline.io.listing import Shard
from pipeline.io.samples import SourceOptions, read_samples
from pipeline.io.uris import filesystem_for

FOOTERS_READ = 200  # Parquet footers read at most (spread evenly; more shards: scaled)
TARS_READ = 3  # tar shards counted by reading them, when they carry no stats file


def _spread(shards: list[Shard], n: int) -> list[Shard]:
    if len(shards) <= n:
        return shards
    return [shards[int(i)] for i in np.linspace(0, len(shards) - 1, n).round().astype(int)]


def _scaled(picked: list[Shard], counts: list[int], shards: list[Shard]) -> int:
    if len(picked) == len(shards):
        return sum(counts)
    sizes = [s.size for s in shards]
    if all(s is not None for s in sizes) and all(s.size for s in picked):
        per_byte = sum(counts) / sum(s.size for s in picked)
        return int(round(per_byte * sum(sizes)))
    return int(round(sum(counts) / len(picked) * len(shards)))


def count_samples(shards: list[Shard], fmt: str, options: SourceOptions | None = None) -> tuple[int | None, str]:
    """(samples in these shards, how it was counted); (None, why) when it cannot be told cheaply."""
    if not shards:
        return 0, "no shards"
    if fmt in ("parquet", "obelics"):
        picked = _spread(shards, FOOTERS_READ)
        counts = []
        for s in picked:
            fs, path = filesystem_for(s.uri)
            try:
                with fs.open_input_file(path) as f:
                    counts.append(pq.ParquetFile(f).metadata.num_rows)
            except (OSError, ValueError):
                return None, f"the footer of {s.key} could not be read"
        how = "Parquet footers" if len(picked) == len(shards) else \
            f"Parquet footers of {len(picked)} of {len(shards)} shards, scaled by size"
        return _scaled(picked, counts, shards), how
    stats = [_img2dataset_successes(s) for s in _spread(shards, FOOTERS_READ)]
    if all(n is not None for n in stats):
        picked = _spread(shards, FOOTERS_READ)
        how = "img2dataset _stats.json files" if len(picked) == len(shards) else \
            f"img2dataset _stats.json of {len(picked)} of {len(shards)} shards, scaled by size"
        return _scaled(picked, stats, shards), how
    picked = _spread(shards, TARS_READ)
    try:
        counts = [sum(1 for _ in read_samples(s, fmt, options)) for s in picked]
    except ShardFault as fault:
        return None, f"{fault.detail[:100]}"
    how = ("counted" if len(picked) == len(shards)
           else f"counted in {len(picked)} of {len(shards)} shards, scaled by size")
    return _scaled(picked, counts, shards), how


def _img2dataset_successes(shard: Shard) -> int | None:
    base = shard.uri.rsplit(".", 1)[0]
    fs, path = filesystem_for(f"{base}_stats.json")
    try:
        with fs.open_input_stream(path) as f:
            return int(json.loads(f.read())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
