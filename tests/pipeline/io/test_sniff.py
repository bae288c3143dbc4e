"""The look at a job's first shard before anything starts (`pipeline.io.sniff`): a wrong `--format` is a mistake
refused naming the `format` field (with the format to set where the other one reads), never a shard of error
records; anything else (bad data, an unreadable or empty shard, Parquet) is left to the run."""

from __future__ import annotations

import tarfile

import pytest

from jobs import sample_corpus as corpus
from pipeline.errors import InputError
from pipeline.io import sniff
from pipeline.io.listing import Shard, ShardListing
from pipeline.io.samples import SourceOptions
from pipeline.io.sniff import check_first_shard, format_problem


def shard(tmp_path, write, items, name: str = "00000.tar") -> Shard:
    uri = str(tmp_path / name)
    write(uri, items)
    return Shard(uri, name)


def captions(tmp_path, n: int = 4) -> Shard:
    return shard(tmp_path, corpus.write_webdataset, corpus.caption_samples(n))


def documents(tmp_path, n: int = 4) -> Shard:
    return shard(tmp_path, corpus.write_interleaved_wds, corpus.documents(n))


def test_a_webdataset_tar_read_as_interleaved_wds_names_the_format_to_set(tmp_path):
    problem = format_problem(captions(tmp_path), "interleaved-wds")
    assert problem.startswith("the first 4 samples of 00000.tar read as interleaved-wds are all errors")
    assert problem.endswith("it reads as webdataset: set format: webdataset")


def test_an_interleaved_tar_read_as_webdataset_names_the_format_to_set(tmp_path):
    problem = format_problem(documents(tmp_path), "webdataset")
    assert "(empty: sample has no image file" in problem
    assert problem.endswith("it reads as interleaved-wds: set format: interleaved-wds")


@pytest.mark.parametrize("fmt", ["webdataset", "interleaved-wds"])
def test_a_tar_that_reads_as_its_format_has_no_problem(fmt, tmp_path):
    assert format_problem(captions(tmp_path) if fmt == "webdataset" else documents(tmp_path), fmt) is None


def test_a_tar_that_reads_as_neither_format_says_to_check_the_format(tmp_path):
    texts_alone = shard(tmp_path, corpus.write_webdataset, [{"key": f"t{i}", "caption": "no image"} for i in range(3)])
    problem = format_problem(texts_alone, "webdataset")
    assert problem.endswith("(empty: sample has no image file (found ['json', 'txt'])): check the format")


def test_one_sample_that_reads_among_broken_ones_is_bad_data_not_a_wrong_format(tmp_path):
    samples = corpus.caption_samples(4)
    for s in samples[1:]:
        s["image"] = None  # three samples without an image: error records, for the run to write
    assert format_problem(shard(tmp_path, corpus.write_webdataset, samples), "webdataset") is None


def test_only_the_first_samples_of_a_shard_are_looked_at(tmp_path):
    problem = format_problem(captions(tmp_path, sniff.SNIFF_SAMPLES + 8), "interleaved-wds")
    assert problem.startswith(f"the first {sniff.SNIFF_SAMPLES} samples of 00000.tar")


def members(tmp_path, write, items) -> list[tuple[str, bytes]]:
    write(str(tmp_path / "members.tar"), items)
    with tarfile.open(tmp_path / "members.tar") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_only_the_head_of_a_shard_is_read(tmp_path, monkeypatch):
    head = members(tmp_path, corpus.write_interleaved_wds, corpus.documents(3))  # wrong for webdataset
    rest = members(tmp_path, corpus.write_webdataset, corpus.caption_samples(40))  # right for it
    (tmp_path / "00000.tar").write_bytes(corpus._tar(head + rest))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        monkeypatch.setattr(sniff, "SNIFF_BYTES", tar.getmembers()[len(head)].offset)
    problem = format_problem(Shard(str(tmp_path / "00000.tar"), "00000.tar"), "webdataset")
    assert problem.startswith("the first 3 samples of 00000.tar read as webdataset are all errors")


@pytest.mark.parametrize("content", [b"", b"\x89PNG this is no tar at all" * 100], ids=["empty", "not-a-tar"])
def test_an_empty_shard_or_one_that_is_no_tar_is_left_to_the_run(content, tmp_path):
    (tmp_path / "00000.tar").write_bytes(content)
    assert format_problem(Shard(str(tmp_path / "00000.tar"), "00000.tar"), "webdataset") is None


def test_a_shard_that_cannot_be_read_now_is_left_to_the_run(tmp_path):
    assert format_problem(Shard(str(tmp_path / "gone.tar"), "gone.tar"), "webdataset") is None


@pytest.mark.parametrize("fmt", ["parquet", "obelics", "a-format-nobody-knows"])
def test_formats_other_than_the_two_tar_layouts_are_not_sniffed(fmt, tmp_path):
    assert format_problem(captions(tmp_path), fmt) is None


def test_a_first_shard_in_the_wrong_format_is_refused_naming_the_format_field(tmp_path):
    listing = ShardListing(str(tmp_path), [captions(tmp_path)])
    with pytest.raises(InputError) as err:
        check_first_shard(listing, "interleaved-wds", SourceOptions())
    assert err.value.field == "format" and "set format: webdataset" in str(err.value)


def test_a_column_the_settings_name_but_the_first_parquet_shard_lacks_is_refused_naming_its_field(tmp_path):
    first = shard(tmp_path, corpus.write_caption_parquet, corpus.caption_samples(2), "00000.parquet")
    listing = ShardListing(str(tmp_path), [first])
    with pytest.raises(InputError) as err:
        check_first_shard(listing, "parquet", SourceOptions(text_column="alt_text"))
    assert err.value.field == "source_text_column" and "alt_text" in str(err.value)


def test_an_input_without_shards_has_no_first_shard_to_check(tmp_path):
    check_first_shard(ShardListing(str(tmp_path), []), "webdataset", SourceOptions())
