"""Counting samples before a job runs (`pipeline.io.counting.count_samples`): from Parquet footers or img2dataset
stats files where the shards have them, else by reading a few shards; scaled by size when only some are read, by
shard count when sizes are unknown; unknown (None, why) rather than a guess when a shard cannot tell."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.io import counting
from pipeline.io.counting import count_samples
from pipeline.io.listing import Shard, list_shards
from pipeline.io.samples import SourceOptions
from tests.support.shards import write_shards


def copies(tmp_path, fmt: str, n: int, per_shard: int) -> list[Shard]:
    """`n` byte-identical shards of `per_shard` samples (so a count scaled from some of them is exact)."""
    write_shards(tmp_path / "one", 1, per_shard, fmt)
    (first,) = (tmp_path / "one").iterdir()
    (tmp_path / "in").mkdir()
    for k in range(n):
        shutil.copy(first, tmp_path / "in" / f"{k:03d}{first.suffix}")
    return list_shards(str(tmp_path / "in"), fmt).shards


def test_no_shards_hold_no_samples():
    assert count_samples([], "webdataset") == (0, "no shards")


@pytest.mark.parametrize("fmt", ["parquet", "obelics"])
def test_parquet_shards_are_counted_from_their_footers(fmt, tmp_path):
    write_shards(tmp_path / "in", 3, 4, fmt)
    write_shards(tmp_path / "in", 1, 7, fmt, first=3)
    assert count_samples(list_shards(str(tmp_path / "in"), fmt).shards, fmt) == (19, "Parquet footers")


def test_more_parquet_shards_than_footers_read_are_counted_from_a_spread_scaled_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(counting, "FOOTERS_READ", 2)
    shards = copies(tmp_path, "parquet", 5, 6)
    assert count_samples(shards, "parquet") == (30, "Parquet footers of 2 of 5 shards, scaled by size")


def test_a_parquet_footer_that_cannot_be_read_leaves_the_count_unknown_naming_the_shard(tmp_path):
    write_shards(tmp_path / "in", 1, 3, "parquet")
    (tmp_path / "in" / "bad.parquet").write_bytes(b"not parquet at all")
    shards = list_shards(str(tmp_path / "in"), "parquet").shards
    assert count_samples(shards, "parquet") == (None, "the footer of bad.parquet could not be read")


def test_tar_shards_with_img2dataset_stats_are_counted_from_the_stats_not_the_tars(tmp_path):
    write_shards(tmp_path / "in", 2, 3, "webdataset")
    for stem, successes in (("000", 10), ("001", 20)):  # the stats, not the 3 samples each tar holds
        (tmp_path / "in" / f"{stem}_stats.json").write_text(json.dumps({"successes": successes, "failed": 1}))
    shards = list_shards(str(tmp_path / "in"), "webdataset").shards
    assert count_samples(shards, "webdataset") == (30, "img2dataset _stats.json files")


def test_tar_shards_without_stats_are_counted_by_reading_them(tmp_path):
    write_shards(tmp_path / "in", 2, 3, "interleaved-wds")
    shards = list_shards(str(tmp_path / "in"), "interleaved-wds").shards
    assert count_samples(shards, "interleaved-wds") == (6, "counted")


def test_one_tar_without_its_stats_file_makes_the_count_come_from_reading(tmp_path):
    write_shards(tmp_path / "in", 2, 3, "webdataset")
    (tmp_path / "in" / "000_stats.json").write_text(json.dumps({"successes": 50}))
    (tmp_path / "in" / "001_stats.json").write_text("{truncated")
    shards = list_shards(str(tmp_path / "in"), "webdataset").shards
    assert count_samples(shards, "webdataset") == (6, "counted")


def test_more_tar_shards_than_are_read_are_counted_in_a_few_scaled_by_size(tmp_path):
    n = counting.TARS_READ * 2
    shards = copies(tmp_path, "webdataset", n, 4)
    how = f"counted in {counting.TARS_READ} of {n} shards, scaled by size"
    assert count_samples(shards, "webdataset") == (n * 4, how)


def test_shards_of_unknown_size_are_scaled_by_their_number(tmp_path):
    listed = copies(tmp_path, "webdataset", counting.TARS_READ * 2, 4)
    unsized = [Shard(s.uri, s.key) for s in listed]  # named by a list file: no size known
    assert count_samples(unsized, "webdataset")[0] == counting.TARS_READ * 2 * 4


def test_a_tar_that_cannot_be_read_leaves_the_count_unknown_saying_why(tmp_path):
    shards = [Shard(str(tmp_path / "gone.tar"), "gone.tar")]
    count, how = count_samples(shards, "webdataset", SourceOptions(read_attempts=1))
    assert count is None and how.startswith(f"cannot read {tmp_path}")  # the fault's reason, cut at 100 characters
