"""Writing input shards for tests (every format, drawn by `jobs.sample_corpus`), and the exactly-once check."""

from __future__ import annotations

import io
import os

from jobs import sample_corpus as corpus

# format -> (writer, sample maker, shard suffix)
WRITERS = {
    "webdataset": (corpus.write_webdataset, corpus.caption_samples, ".tar"),
    "parquet": (corpus.write_caption_parquet, corpus.caption_samples, ".parquet"),
    "interleaved-wds": (corpus.write_interleaved_wds, corpus.documents, ".tar"),
    "obelics": (corpus.write_obelics, corpus.documents, ".parquet"),
}


def write_shards(root, n_shards: int, per_shard: int, fmt: str = "webdataset", prefix: str = "s",
                 name: str = "{k:03d}", first: int = 0) -> list[str]:
    """`n_shards` shards of `per_shard` drawn samples under `root` (a local path or URI), named `name.format(k=k)`
    plus the format's suffix, with sample keys `<prefix><k>-<i>` (seeded by k); returns every sample key."""
    write, make, suffix = WRITERS[fmt]
    keys = []
    for k in range(first, first + n_shards):
        items = make(per_shard, seed=k, prefix=f"{prefix}{k}-")
        write(f"{root}/{name.format(k=k)}{suffix}", items)
        keys += [i["key"] for i in items]
    return keys


def big_caption_shards(root, n_shards: int, per_shard: int, size: int = 3000) -> list[str]:
    """Shards of large (but well-compressed) JPEGs: decoding and resizing them makes a job slow enough to interrupt
    it part-way."""
    from PIL import Image

    buf = io.BytesIO()
    Image.radial_gradient("L").resize((size, size)).convert("RGB").save(buf, "JPEG", quality=90)
    image = buf.getvalue()
    expected = []
    for k in range(n_shards):
        samples = [{"key": f"big{k}-{i}", "image": image, "caption": f"a grey gradient number {i}"}
                   for i in range(per_shard)]
        corpus.write_webdataset(os.path.join(str(root), f"{k:03d}.tar"), samples)
        expected += [s["key"] for s in samples]
    return expected


def assert_exactly_once(table, expected_ids) -> None:
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected_ids)
    assert len(ids) == len(set(ids))
