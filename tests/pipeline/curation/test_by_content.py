"""Curation matches rows by id and checks what it reads: a Parquet shard rewritten in another order is
materialized, resharded and joined by id; a score file that is not what was committed is named with what to do;
metadata of another type, a sidecar column named like an internal one and NaN values are handled, never a
traceback nor a silent wrong answer. Run without Ray: the functions the passes and the stages call."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sample_corpus as corpus
from pipeline.curation import CurateConfig
from pipeline.curation.filters import Filters, check_filters, filter_shard
from pipeline.curation.job import score_shards
from pipeline.curation.materialize import materialize
from pipeline.curation.reshard import write_shard
from pipeline.errors import CorruptState, InputError
from pipeline.io.samples import SourceOptions, read_samples
from tests.support.curation import fake_scores
from tests.support.hostile import cut_in_half, replace_with_first_rows, reversed_parquet, sidecar


def _parquet_corpus(tmp_path, n: int = 8) -> tuple[str, list[dict]]:
    """One caption Parquet shard with a `similarity` column, scored (score = 1 + row), then rewritten in place
    with its rows reversed. Returns its URI and the records as scored."""
    items = corpus.caption_samples(n, seed=2, prefix="rev")
    shard = tmp_path / "in" / "00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [it["key"] for it in items], "image": [it["image"] for it in items],
                             "caption": [it["caption"] for it in items],
                             "similarity": [0.1 * i for i in range(n)]}), shard)
    scored = [{"id": row["id"], "kind": "caption", "score": 1.0 + row["ordinal"], "label": 1, "error": None}
              for row in read_samples(str(shard), "parquet")]
    fake_scores(str(tmp_path / "scores"), {"00000.parquet": scored}, {"00000.parquet": str(shard)}, "parquet")
    reversed_parquet(shard)
    return str(shard), scored


def _shards(tmp_path, **kw):
    config = CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"), min_score=0.0, **kw)
    listing, _ = score_shards(config)
    return config, listing.shards


def test_a_parquet_shard_rewritten_in_another_order_is_materialized_by_id(tmp_path):
    """Issue 27 finding 7: by position, 10 of 40 rows written were not selected and 10 carried another's score."""
    shard, scored = _parquet_corpus(tmp_path)
    kept = [r for r in scored if r["score"] >= 5.0]
    done = materialize("parquet", shard, pa.table({"id": [r["id"] for r in kept]}), str(tmp_path / "out.parquet"),
                       SourceOptions())
    assert done.written == len(kept) and done.missing == []
    written = pq.read_table(tmp_path / "out.parquet")
    by_id = {it["key"]: it["caption"] for it in corpus.caption_samples(8, seed=2, prefix="rev")}
    assert sorted(written.column("id").to_pylist()) == sorted(r["id"] for r in kept)
    assert all(by_id[i] == c for i, c in zip(written.column("id").to_pylist(), written.column("caption").to_pylist()))


def test_a_parquet_shard_rewritten_in_another_order_is_resharded_by_id(tmp_path):
    shard, scored = _parquet_corpus(tmp_path)
    samples = [["00000.parquet", shard, i, r["id"], r["score"], r["label"]] for i, r in enumerate(scored) if i % 2]
    stats = write_shard("parquet", samples, str(tmp_path / "re" / "00000.parquet"), SourceOptions().model_dump())
    assert stats["successes"] == len(samples) and "not_materializable" not in stats["status_dict"]
    written = pq.read_table(tmp_path / "re" / "00000.parquet").to_pylist()
    score_of = {r["id"]: r["score"] for r in scored}
    assert {row["id"]: row["score"] for row in written} == {s[3]: score_of[s[3]] for s in samples}


def test_where_over_a_parquet_shards_own_columns_joins_by_id(tmp_path):
    _, scored = _parquet_corpus(tmp_path)
    config, shards = _shards(tmp_path, where="similarity >= 0.45", input=str(tmp_path / "in"), format="parquet")
    filters = check_filters(Filters.of(config), shards)
    filtered = filter_shard(shards[0], filters)
    passed = {i for i, p in zip(filtered.table.column("id").to_pylist(), filtered.passes) if p}
    assert passed == {r["id"] for i, r in enumerate(scored) if 0.1 * i >= 0.45}
    assert filtered.no_metadata == 0


def _tar_corpus(tmp_path, sidecars: list[dict]) -> list[list[dict]]:
    """Tar shards (one per sidecar, 4 samples each) with img2dataset sidecars holding the given columns (keys
    added), scored. Returns each shard's score records."""
    out = {}
    for k, columns in enumerate(sidecars):
        items = corpus.caption_samples(4, seed=k, prefix=f"t{k}-")
        corpus.write_webdataset(str(tmp_path / "in" / f"{k:05d}.tar"), items)
        sidecar(tmp_path / "in" / f"{k:05d}.parquet", {"key": [it["key"] for it in items], **columns})
        out[f"{k:05d}.tar"] = [{"id": it["key"], "kind": "caption", "score": 2.0, "label": 2, "error": None}
                               for it in items]
    inputs = {key: str(tmp_path / "in" / key) for key in out}
    fake_scores(str(tmp_path / "scores"), out, inputs, "webdataset")
    return list(out.values())


def _passing(tmp_path, where: str) -> list[tuple[set[str], dict]]:
    """Per shard, the ids passing `where`, and the metadata columns found of another type."""
    config, shards = _shards(tmp_path, where=where)
    filters = check_filters(Filters.of(config), shards)
    out = []
    for shard in shards:
        filtered = filter_shard(shard, filters)
        out.append(({i for i, p in zip(filtered.table.column("id").to_pylist(), filtered.passes) if p},
                    filtered.mistyped))
    return out


def test_metadata_of_another_type_than_the_first_shards_is_absent_and_counted(tmp_path):
    """Issue 27 finding 11: a sidecar holding `width` as strings ended curation with a traceback."""
    records = _tar_corpus(tmp_path, [{"width": [100, 300, 500, 700]}, {"width": ["100", "300", "500", "700"]}])
    first, second = _passing(tmp_path, "width >= 200")
    assert first == ({r["id"] for r in records[0][1:]}, {})
    assert second == (set(), {"width": 4})  # fails the term, as a record without metadata does, and is counted


def test_a_sidecar_column_named_like_the_records_row_is_a_column_like_any(tmp_path):
    """Issue 27 finding 11: a sidecar column `ordinal` clashed with the record's own."""
    records = _tar_corpus(tmp_path, [{"ordinal": [7, 1, 9, 3]}])
    assert _passing(tmp_path, "ordinal >= 5") == [({records[0][0]["id"], records[0][2]["id"]}, {})]


def test_nan_metadata_fails_every_comparison_as_null_does(tmp_path):
    """Issue 27 finding 12: NaN passed `not (width < 200)` and `width != 5`, where null failed both."""
    records = _tar_corpus(tmp_path, [{"width": pa.array([np.nan, 100.0, 300.0, None], pa.float64())}])
    ids = [r["id"] for r in records[0]]
    assert _passing(tmp_path, "not (width < 200)")[0][0] == {ids[2]}
    assert _passing(tmp_path, "width != 5")[0][0] == {ids[1], ids[2]}


def test_a_score_file_cut_in_half_is_refused_before_curation_starts(tmp_path):
    """Issue 27 finding 10: a raw ArrowInvalid traceback; now the file, and what to do (exit 2)."""
    _tar_corpus(tmp_path, [{"width": [1, 2, 3, 4]}])
    cut_in_half(tmp_path / "scores" / "scores" / "00000.tar.parquet")
    with pytest.raises(CorruptState, match=r"field 'scores'.*scores/00000.tar.parquet, the committed file of shard "
                                           r"00000.tar, is damaged: \d+ bytes where \d+ were committed.*rerun"):
        _shards(tmp_path)


def test_a_score_file_replaced_by_fewer_rows_is_refused_before_curation_starts(tmp_path):
    records = _tar_corpus(tmp_path, [{"width": [1, 2, 3, 4]}])
    replace_with_first_rows(tmp_path / "scores" / "scores" / "00000.tar.parquet", len(records[0]) // 2)
    with pytest.raises(CorruptState, match="scores/00000.tar.parquet.*is damaged"):
        _shards(tmp_path)


def test_a_score_file_changed_in_content_alone_is_named_where_it_is_read(tmp_path):
    """The same size, other bytes: the listing cannot tell, the reader's sha256 does (and says to delete it)."""
    _tar_corpus(tmp_path, [{"width": [1, 2, 3, 4]}])
    config, shards = _shards(tmp_path, where="width >= 2")
    path = tmp_path / "scores" / "scores" / "00000.tar.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptState, match="another sha256.*delete it and rerun"):
        filter_shard(shards[0], check_filters(Filters.of(config), shards))


def _curate(tmp_path, executor="local", **kw) -> None:
    import pipeline.curation

    pipeline.curation.curate(CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"),
                                          keep_fraction=0.5, executor=executor, **kw), progress=False)


def test_a_threshold_pass_that_cannot_read_a_shards_metadata_names_it(tmp_path, ray_cluster):
    """Issue 27 finding 11: a failing evaluation was a raw traceback (and Ray's retries); now a refusal naming the
    file and what to do (one line, exit 2: `jobs.curate` prints such an error alone), and nothing is selected. On
    Ray: the pass's task hands the failure back to the driver."""
    _tar_corpus(tmp_path, [{"width": [1, 2, 3, 4]}, {"width": [5, 6, 7, 8]}])
    (tmp_path / "in" / "00001.parquet").write_bytes(b"not a sidecar")  # the first shard's is checked, not this one
    with pytest.raises(InputError, match=r"field 'input': the metadata .*00001.parquet does not read as Parquet.*"
                                         "repair or remove it"):
        _curate(tmp_path, executor="ray", where="width >= 2")
    assert not (tmp_path / "cur" / "selected").exists()


def test_a_score_file_damaged_in_content_alone_stops_the_passes_naming_it(tmp_path):
    """The same size, other bytes: named by the pass that reads it (exit 2 for the job), with what to do."""
    _tar_corpus(tmp_path, [{"width": [1, 2, 3, 4]}, {"width": [5, 6, 7, 8]}])
    path = tmp_path / "scores" / "scores" / "00001.tar.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptState, match="field 'scores'.*scores/00001.tar.parquet, the committed file of shard "
                                           "00001.tar, is damaged.*delete it and rerun"):
        _curate(tmp_path)
