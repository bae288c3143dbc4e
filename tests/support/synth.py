"""Synthetic-pairs outputs and inputs for tests: reading a job's pairs, a small caption corpus."""

from __future__ import annotations

import pyarrow.dataset as pads

from jobs import sample_corpus as corpus


def read_dir(path) -> list[dict]:
    try:
        return pads.dataset(str(path), format="parquet").to_table().to_pylist()
    except FileNotFoundError:
        return []


def pairs_of(out) -> tuple[list[dict], list[dict]]:
    """(the pairs in train/ and val/, the error rows in errors/)."""
    return read_dir(out / "train") + read_dir(out / "val"), read_dir(out / "errors")


def fake_caption_corpus(root, n_shards=2, per_shard=3, malformed=()) -> list[str]:
    """Caption shards `<k>.tar` (keys `o<k>-...`), the samples named in `malformed` captioned "MALFORMED ..."
    (a scripted LLM server answers those with replies that do not parse); returns every key."""
    expected = []
    for k in range(n_shards):
        samples = corpus.caption_samples(per_shard, seed=k, prefix=f"o{k}-")
        for s in samples:
            if s["key"] in malformed:
                s["caption"] = "MALFORMED " + s["caption"]
        corpus.write_webdataset(str(root / f"{k}.tar"), samples)
        expected += [s["key"] for s in samples]
    return expected
