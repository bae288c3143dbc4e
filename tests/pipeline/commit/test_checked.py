"""What the commit records trust is checked by content: each names its files with their bytes, records and sha256
and the input file it was read from with its size and modification time. A rerun notices a committed file cut,
replaced or gone (from one listing, nothing read) and does that shard again, saying so; readers name a damaged
file and what to do; a listed shard that is not the file its record was read from is refused or done again. No
job, no Ray: the committer and the survey, called directly."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from jobs import sample_corpus as corpus
from pipeline.commit.committer import RecordLayout, ShardCommitter, WritePolicy
from pipeline.commit.manifest import read_manifest, write_entry
from pipeline.commit.markers import end_marker
from pipeline.commit.records import read_committed
from pipeline.errors import CorruptState, InputError
from pipeline.io.listing import ShardListing, list_shards
from pipeline.runner import JobSpec
from pipeline.runner.execute import describe_input
from pipeline.runner.prepare import survey
from tests.support.hostile import cut_in_half, replace_with_first_rows
from tests.support.score_like import RECORDS, scores_folder, shard_rows, shard_table


def _committed(out, keys=("a.tar", "b.tar"), n=40) -> None:
    committer = ShardCommitter(str(out), RecordLayout(RECORDS, scores_folder), "id")
    for key in keys:
        committer.add(shard_table(key, n))
    committer.consolidate()


def _spec(out, listing: ShardListing, moved_from: str | None = None) -> JobSpec:
    return JobSpec(job="score", output=str(out), listing=listing, identity={"a": 1}, schema=RECORDS,
                   partition=scores_folder, format="webdataset", moved_from=moved_from)


def _keys_listing(keys=("a.tar", "b.tar")) -> ShardListing:
    from pipeline.io.listing import Shard

    return ShardListing("/in", [Shard(f"/in/{k}", k) for k in keys])


def test_a_rerun_does_again_a_shard_whose_score_file_was_cut_and_says_so(tmp_path):
    """Issue 27 finding 10: a score file cut in half; the rerun said "nothing new", exit 0."""
    out = tmp_path / "out"
    _committed(out)
    cut_in_half(out / "scores" / "a.tar.parquet")
    prepared = survey(_spec(out, _keys_listing()))
    assert [s.key for s in prepared.todo] == ["a.tar"]
    assert any("1 committed shards' files were cut or replaced since (e.g. scores/a.tar.parquet:" in n
               for n in prepared.notes), prepared.notes


def test_a_shard_done_again_reads_as_its_newer_commit(tmp_path):
    """The record of the first commit stays in a consolidated part: the newer one counts, before consolidation
    (a per-shard record) and after it (a later part), so records and files agree."""
    out = tmp_path / "out"
    _committed(out)
    cut_in_half(out / "scores" / "a.tar.parquet")
    prepared = survey(_spec(out, _keys_listing()))
    committer = ShardCommitter(str(out), RecordLayout(RECORDS, scores_folder), "id", committed=prepared.entries,
                               writes=WritePolicy(consolidate_every=10**6))
    committer.add(pa.Table.from_pylist([*shard_rows("a.tar", 40, score=2.0), end_marker("a.tar", 40)],
                                       schema=RECORDS))  # other records: other bytes than the first commit's
    assert read_committed(str(out), RECORDS).num_rows == 80  # the new per-shard record, beside the old part
    committer.consolidate()
    assert len(list((out / "_manifest" / "_parts").glob("*.parquet"))) == 2
    assert read_committed(str(out), RECORDS).num_rows == 80 and survey(_spec(out, _keys_listing())).todo == []


def test_reading_a_cut_score_file_names_it_and_what_to_do(tmp_path):
    out = tmp_path / "out"
    _committed(out)
    cut_in_half(out / "scores" / "a.tar.parquet")
    with pytest.raises(CorruptState, match=r"scores/a.tar.parquet, the committed file of shard a.tar, is damaged: "
                                           r"\d+ bytes where \d+ were committed; rerun the job"):
        read_committed(str(out), RECORDS)


def test_a_score_file_replaced_by_a_valid_smaller_one_is_never_read_as_committed(tmp_path):
    """Issue 27 finding 10: a valid 10-row file where 40 were committed was read, 90 rows for 80."""
    out = tmp_path / "out"
    _committed(out)
    replace_with_first_rows(out / "scores" / "b.tar.parquet", 10)
    with pytest.raises(CorruptState, match="scores/b.tar.parquet.*is damaged"):
        read_committed(str(out), RECORDS)
    assert [s.key for s in survey(_spec(out, _keys_listing())).todo] == ["b.tar"]


def test_a_score_file_of_the_committed_size_and_other_bytes_is_named_by_its_sha256(tmp_path):
    out = tmp_path / "out"
    _committed(out)
    path = out / "scores" / "a.tar.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptState, match="another sha256.*delete it and rerun"):
        read_committed(str(out), RECORDS)


def test_an_intact_output_reads_every_committed_record(tmp_path):
    out = tmp_path / "out"
    _committed(out)
    assert read_committed(str(out), RECORDS).num_rows == 80
    check = read_manifest(str(out))["a.tar"]["file_checks"]["scores/a.tar.parquet"]
    assert check["records"] == 40 and check["bytes"] == (out / "scores" / "a.tar.parquet").stat().st_size


def _scored_corpus(tmp_path, root: str, n: int, seed: int = 0):
    """A real input listing (sizes and mtimes) whose shards are committed as a scoring run commits them."""
    for k in range(2):
        corpus.write_webdataset(str(tmp_path / root / f"{k:05d}.tar"), corpus.caption_samples(n, seed=seed + k))
    listing = list_shards(str(tmp_path / root), "webdataset")
    out = str(tmp_path / "out")
    for shard in listing.shards:
        write_entry(out, {"shard": shard.key, "files": [], "records": n, "samples": n, "identity": "x",
                          **describe_input(shard, "webdataset")})
    return listing, out


def test_moved_from_refuses_another_corpus_with_the_same_shard_names(tmp_path):
    """Issue 27 finding 9: another corpus with the same shard names was skipped as committed (exit 0)."""
    _, out = _scored_corpus(tmp_path, "laion", 3)
    for k in range(2):
        corpus.write_webdataset(str(tmp_path / "other" / f"{k:05d}.tar"), corpus.caption_samples(5, seed=9 + k))
    other = list_shards(str(tmp_path / "other"), "webdataset")
    with pytest.raises(InputError, match=r"field 'moved_from'.*00000.tar.*bytes.*is not that file moved"):
        survey(_spec(out, other, moved_from=str(tmp_path / "laion")))


def test_moved_from_accepts_the_same_corpus_copied_elsewhere(tmp_path):
    _, out = _scored_corpus(tmp_path, "laion", 3)
    shutil.copytree(tmp_path / "laion", tmp_path / "moved")  # a plain copy: new modification times
    moved = list_shards(str(tmp_path / "moved"), "webdataset")
    prepared = survey(_spec(out, moved, moved_from=str(tmp_path / "laion")))
    assert prepared.todo == [] and len(prepared.committed) == 2


def test_a_committed_shard_rewritten_in_place_is_done_again_and_said(tmp_path):
    listing, out = _scored_corpus(tmp_path, "in", 3)
    corpus.write_webdataset(str(tmp_path / "in" / "00001.tar"), corpus.caption_samples(4, seed=7))
    prepared = survey(_spec(out, list_shards(str(tmp_path / "in"), "webdataset")))
    assert [s.key for s in prepared.todo] == ["00001.tar"]
    assert any("1 committed shards' input files changed since they were read (e.g. 00001.tar:" in n
               for n in prepared.notes), prepared.notes
