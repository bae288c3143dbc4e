"""What a sample and a shard are named by: ids unique within a shard by construction (two samples never share one,
whatever their keys), and a listing that keys a shard by its own path and names what it leaves out."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import sample_corpus as corpus
from pipeline.io.listing import list_shards
from pipeline.io.samples import SourceOptions, read_samples
from tests.support.hostile import colliding_keys_tar, names_the_listing_leaves_out


def _by_id(shard, fmt="webdataset") -> dict[str, dict]:
    rows = list(read_samples(str(shard), fmt, SourceOptions()))
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "every record's id is its own"
    return by_id


def test_a_key_that_is_not_utf8_and_one_written_like_it_are_both_duplicates(tmp_path):
    """Issue 27 finding 8: `b"\\xff"` (written as the text `\\udcff`) beside a key literally `\\udcff`: the
    dropped one was once materialized in place of the kept one. Now neither is a sample under the shared id."""
    shard = tmp_path / "keys.tar"
    colliding_keys_tar(shard, corpus.caption_samples(1)[0]["image"])
    by_id = _by_id(shard)
    assert sorted(by_id) == ["\\udcff", "\\udcff#2", "ok"]
    for sample_id in ("\\udcff", "\\udcff#2"):
        assert by_id[sample_id]["error_category"] == "duplicate"
        assert "read the same once bytes that are not UTF-8 are written" in by_id[sample_id]["error"]
    assert by_id["ok"]["error"] is None and by_id["ok"]["texts"] == [None, "an ordinary key"]  # ids unchanged


def test_a_duplicate_keys_own_ids_never_take_another_samples_key(tmp_path):
    """`dup` twice (its second occurrence would be `dup#2`) beside a sample keyed `dup#2`: that sample keeps its
    id and is scored; the duplicates take ids no key has."""
    items = corpus.caption_samples(3, prefix="x")
    items[0]["key"] = items[1]["key"] = "dup"
    items[2]["key"] = "dup#2"
    corpus.write_webdataset(str(tmp_path / "dup.tar"), items)
    by_id = _by_id(tmp_path / "dup.tar")
    assert by_id["dup#2"]["error"] is None
    assert {i for i, r in by_id.items() if r["error_category"] == "duplicate"} == {"dup", "dup#3"}


def test_a_parquet_id_on_two_rows_is_a_duplicate_and_generated_ids_skip_taken_ones(tmp_path):
    items = corpus.caption_samples(4, prefix="p")
    pq.write_table(pa.table({"id": ["same", "same", None, "rows:3"], "image": [i["image"] for i in items],
                             "caption": [i["caption"] for i in items]}), tmp_path / "rows.parquet")
    by_id = _by_id(tmp_path / "rows.parquet", "parquet")
    assert {i for i, r in by_id.items() if r["error_category"] == "duplicate"} == {"same", "same#2"}
    assert "id 'same' is on 2 rows of the shard" in by_id["same"]["error"]
    assert by_id["rows:2"]["error"] is None and by_id["rows:3"]["error"] is None  # a null id: <stem>:<row>


def test_the_listing_names_what_it_leaves_out(tmp_path):
    """Issue 27 finding 12: `_hidden.tar` and `UPPER.TAR` were not listed and nothing said so."""
    corpus.write_webdataset(str(tmp_path / "in" / "00000.tar"), corpus.caption_samples(2))
    names_the_listing_leaves_out(tmp_path / "in", (tmp_path / "in" / "00000.tar").read_bytes())
    (tmp_path / "in" / "00000.parquet").write_bytes(b"an img2dataset sidecar")
    listing = list_shards(str(tmp_path / "in"), "webdataset")
    assert [s.key for s in listing.shards] == ["00000.tar"]
    left_out = listing.left_out_summary()
    assert {why.split(" ")[0]: n["examples"] for why, n in left_out.items()} == {
        "names": ["_hidden.tar"], ".TAR": ["UPPER.TAR"], ".parquet": ["00000.parquet"]}
    assert "the case differs" in next(why for why in left_out if why.startswith(".TAR"))


def test_a_symlinked_shard_is_keyed_by_its_path_under_the_input_root(tmp_path):
    """Issue 27 finding 12: it was keyed by its target's absolute path."""
    corpus.write_webdataset(str(tmp_path / "elsewhere" / "real.tar"), corpus.caption_samples(2))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00001.tar").symlink_to(tmp_path / "elsewhere" / "real.tar")
    listing = list_shards(str(tmp_path / "in"), "webdataset")
    assert [s.key for s in listing.shards] == ["00001.tar"]
    rows = list(read_samples(listing.shards[0], "webdataset"))
    assert {r["source"] for r in rows} == {"00001.tar"} and len(rows) == 2


def test_what_the_listing_leaves_out_is_said_in_the_dry_run_and_the_summary(tmp_path):
    from pipeline.runner import JobSpec
    from pipeline.runner.job import Job, Plan, RunResult
    from pipeline.runner.prepare import survey
    from pipeline.runner.summary import build_summary, format_summary
    from pipeline.scoring.records import SCORE_SCHEMA, scores_folder

    corpus.write_webdataset(str(tmp_path / "in" / "00000.tar"), corpus.caption_samples(2))
    names_the_listing_leaves_out(tmp_path / "in", (tmp_path / "in" / "00000.tar").read_bytes())
    spec = JobSpec(job="score", output=str(tmp_path / "out"), listing=list_shards(str(tmp_path / "in"), "webdataset"),
                   identity={"a": 1}, schema=SCORE_SCHEMA, partition=scores_folder, format="webdataset")
    prepared = survey(spec)  # what a dry run says: its notes
    note = next(n for n in prepared.notes if n.startswith("not listed as shards:"))
    assert "_hidden.tar" in note and "UPPER.TAR" in note
    summary = build_summary(Job(None), prepared, RunResult(None), Plan())
    assert summary["shards"]["left_out"] == spec.listing.left_out_summary()
    assert note in format_summary(Job(None), summary)
