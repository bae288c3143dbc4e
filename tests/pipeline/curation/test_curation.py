"""Curation: the exact threshold against sorting, the tie rule, per kind, min-score, error records never kept,
materialized shards byte-identical to the input in every format (also on S3), and exactly once after a kill."""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.curation
from jobs import sample_corpus as corpus
from pipeline.commit.manifest import read_manifest
from pipeline.commit.records import read_committed
from pipeline.curation import CurateConfig
from pipeline.curation import thresholds as selection
from tests.support.curation import SELECTED, curate, fake_scores, materialized, random_records, selected
from tests.support.jobs import job_env, paused_job, wait_for
from tests.support.shards import WRITERS, write_shards


# -- the threshold, without Ray -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_histogram_threshold_equals_the_sort_based_one(seed):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(1.5, 0.8, 5000), np.round(rng.uniform(0, 3, 3000), 1),  # many ties
                             [-2.5, 7.0, 0.0, -0.0]]).astype(np.float32)
    blocks = np.array_split(scores, 7)  # as Ray Data's blocks would split it
    tables = [pa.table({"kind": ["caption"] * len(b), "score": b, "error": pa.nulls(len(b), pa.string()),
                        "label": np.zeros(len(b), dtype=np.int8)}) for b in blocks]
    counts, _ = selection.merge_pass_one([selection.pass_one(t).to_pylist()[0] for t in tables])
    for fraction in (0.001, 0.1, 0.3, 0.5, 0.77, 1.0):
        k = selection.keep_count(fraction, len(scores))
        b, needed = selection.cut_bin(counts[selection.ALL], k)
        low = np.zeros(selection.BINS, dtype=np.int64)
        for t in tables:
            entry = json.loads(selection.pass_two(t, {selection.ALL: [b]}, {}).column("counts")[0].as_py())
            low += selection.dense(entry[selection.ALL]["low_bins"].get(str(b), []))
        assert selection.threshold_in_bin(b, needed, low) == selection.sort_threshold(scores, fraction)


def test_keep_count_rounds_in_decimals():
    assert selection.keep_count(0.7, 100) == 70 and selection.keep_count(0.3, 1000) == 300
    assert selection.keep_count(0.3, 15) == 5 and selection.keep_count(0.001, 10) == 0
    keys = selection.sortable_key(np.array([-1.0, -0.0, 0.0, 1e-30, 2.5], dtype=np.float32))
    assert list(keys) == sorted(keys)


# -- the job ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def known_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    shards = {"a.tar": random_records(40, "caption", 0, "a"), "b.tar": random_records(30, "caption", 1, "b"),
              "c.parquet": random_records(30, "interleaved", 2, "c")}
    shards["a.tar"] += [{"id": "bad1", "kind": "caption", "score": None, "label": None, "error": "decode: corrupt"},
                        {"id": "bad2", "kind": "caption", "score": None, "label": None, "error": "empty: no text"}]
    fake_scores(str(root / "scores"), shards)
    records = [r for rs in shards.values() for r in rs]
    return root / "scores", records


def test_keep_fraction_keeps_the_best_and_every_tie(tmp_path, known_scores, ray_cluster):
    """On Ray (the threshold passes on Ray Data, the selection stage on its actors)."""
    scores, records = known_scores
    good = [r for r in records if r["error"] is None]
    summary = curate(tmp_path, scores, keep_fraction=0.3, executor="ray")["curate"]
    cut = selection.sort_threshold(np.array([r["score"] for r in good]), 0.3)
    assert summary["thresholds"] == {"all": cut}
    expected = sorted(r["id"] for r in good if r["score"] >= cut)
    kept = selected(tmp_path / "cur")
    assert sorted(kept.column("id").to_pylist()) == expected
    assert len(expected) >= 30 and len(expected) == summary["kept"]  # round(0.3 x 100) plus the ties at the cut
    assert summary["score_errors"]["by_category"] == {"decode": 1, "empty": 1} and "bad1" not in expected
    assert summary["scored"] == 100


def test_per_kind_and_min_score(tmp_path, known_scores):
    scores, records = known_scores
    good = [r for r in records if r["error"] is None]
    summary = curate(tmp_path, scores, "perkind", keep_fraction=0.5, per_kind=True)["curate"]
    kept = set(selected(tmp_path / "perkind").column("id").to_pylist())
    for kind in ("caption", "interleaved"):
        of_kind = [r for r in good if r["kind"] == kind]
        cut = selection.sort_threshold(np.array([r["score"] for r in of_kind]), 0.5)
        assert summary["thresholds"][kind] == cut
        assert {r["id"] for r in of_kind if r["score"] >= cut} == {r["id"] for r in of_kind if r["id"] in kept}
    summary = curate(tmp_path, scores, "min", min_score=2.0)["curate"]
    assert set(selected(tmp_path / "min").column("id").to_pylist()) == {r["id"] for r in good if r["score"] >= 2.0}
    assert summary["by_kind"]["caption"]["kept"] + summary["by_kind"]["interleaved"]["kept"] == summary["kept"]


def test_curate_writes_the_report_its_config_names_and_returns_the_summary(tmp_path, known_scores):
    scores, _ = known_scores
    summary = curate(tmp_path, scores, keep_fraction=0.3, per_kind=True, report=str(tmp_path / "report"))
    assert summary["job"] == "curate" and summary["curate"]["rule"] == "keep-fraction 0.3 per kind"
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<title>UniFilter curation: keep-fraction 0.3 per kind</title>" in page
    assert f"threshold {summary['curate']['thresholds']['caption']:.3f}" in page


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_materialized_shards_hold_exactly_the_kept_samples_byte_for_byte(fmt, tmp_path):
    suffix = WRITERS[fmt][2]
    kind = "caption" if fmt in ("webdataset", "parquet") else "interleaved"
    keys = write_shards(tmp_path / "in", 2, 6, fmt, prefix="m", name="{k}")
    shards = {f"{k}{suffix}": [{"id": key, "kind": kind, "score": float(i % 4), "label": i % 4, "error": None}
                               for i, key in enumerate(keys[6 * k: 6 * k + 6])] for k in range(2)}
    fake_scores(str(tmp_path / "scores"), shards)
    summary = curate(tmp_path, tmp_path / "scores", min_score=2.0, input=str(tmp_path / "in"), format=fmt,
                     materialize=True)
    assert summary["shards"]["incomplete"] == []
    for key, records in shards.items():
        kept = {r["id"] for r in records if r["score"] >= 2.0}
        original = materialized(tmp_path / "in" / key, fmt)
        written = materialized(tmp_path / "cur" / "shards" / key, fmt)
        assert set(written) == kept
        assert all(written[i] == original[i] for i in kept)
    if fmt in ("parquet", "obelics"):
        written = pq.read_schema(tmp_path / "cur" / "shards" / f"0{suffix}")
        assert written == pq.read_schema(tmp_path / "in" / f"0{suffix}")


def test_parquet_rows_are_matched_by_id_and_nothing_partial_is_published(tmp_path):
    """Rows are matched by the scorer's ids, never by position: an id on two rows (a duplicate, never a kept
    record) matches neither. A shard that lacks most of its kept samples (not the corpus that was scored) raises a
    ShardFault and publishes no file."""
    from pipeline.curation.materialize import materialize
    from pipeline.errors import ShardFault
    from pipeline.io.samples import SourceOptions

    items = corpus.caption_samples(4, seed=5)
    rows = [{"id": "same" if i < 2 else f"r{i}", "image": it["image"], "caption": it["caption"]}
            for i, it in enumerate(items)]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    kept = pa.table({"id": ["r3", "r2", "same"]})
    done = materialize("parquet", str(src), kept, str(tmp_path / "out.parquet"), SourceOptions())
    assert done.written == 2 and done.missing == ["same"]
    assert pq.read_table(tmp_path / "out.parquet").column("caption").to_pylist() == [items[2]["caption"],
                                                                                    items[3]["caption"]]
    beyond = pa.table({"id": ["r3", "r8", "r9"]})
    with pytest.raises(ShardFault, match="holds 1 of the 3 kept samples"):
        materialize("parquet", str(src), beyond, str(tmp_path / "partial.parquet"), SourceOptions())
    tar = tmp_path / "in.tar"
    corpus.write_webdataset(str(tar), items)
    missing = pa.table({"id": [items[0]["key"], "not-there", "nor-this"]})
    with pytest.raises(ShardFault, match="holds 1 of the 3 kept samples"):
        materialize("webdataset", str(tar), missing, str(tmp_path / "partial.tar"), SourceOptions())
    assert not (tmp_path / "partial.parquet").exists() and not (tmp_path / "partial.tar").exists()


def test_materialize_through_s3(s3_bucket, tmp_path, ray_cluster):
    import boto3

    items = corpus.caption_samples(5, seed=3, prefix="s3m-")
    corpus.write_webdataset(f"s3://{s3_bucket}/in/0.tar", items)
    fake_scores(f"s3://{s3_bucket}/scores", {"0.tar": [{"id": it["key"], "kind": "caption", "score": float(i),
                                                        "label": min(i, 3), "error": None}
                                                       for i, it in enumerate(items)]})
    config = CurateConfig(scores=f"s3://{s3_bucket}/scores", output=f"s3://{s3_bucket}/cur", keep_fraction=0.4,
                          input=f"s3://{s3_bucket}/in", format="webdataset", materialize=True)  # on Ray
    summary = pipeline.curation.curate(config, progress=False)
    assert summary["curate"]["kept"] == 2 and summary["curate"]["thresholds"] == {"all": 3.0}
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="cur/shards/0.tar")["Body"].read()
    local = tmp_path / "got.tar"
    local.write_bytes(body)
    assert set(materialized(local, "webdataset")) == {"s3m-000003", "s3m-000004"}
    assert sorted(read_committed(f"s3://{s3_bucket}/cur", SELECTED).column("id").to_pylist()) == \
        ["s3m-000003", "s3m-000004"]


def test_a_killed_curation_finishes_exactly_once(tmp_path, ray_cluster):
    """On Ray, killed (SIGKILL) right after its first commit; the rerun finishes the rest exactly once."""
    keys = write_shards(tmp_path / "in", 4, 2, prefix="k")
    by_shard = {f"{k:03d}.tar": [{"id": key, "kind": "caption", "score": float(k % 3 + i), "label": 1, "error": None}
                                 for i, key in enumerate(keys[2 * k: 2 * k + 2])] for k in range(4)}
    fake_scores(str(tmp_path / "scores"), by_shard)
    out = tmp_path / "cur"
    argv = ["--scores", tmp_path / "scores", "--output", out, "--min-score", "1", "--input", tmp_path / "in",
            "--format", "webdataset", "--materialize", "--workers", "1"]
    marker = tmp_path / "paused"
    first = paused_job("jobs.curate", argv, marker, job_env(RAY_ADDRESS=ray_cluster), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    wait_for(marker, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert len(read_manifest(str(out))) == 1
    summary = curate(tmp_path, tmp_path / "scores", min_score=1, input=str(tmp_path / "in"), format="webdataset",
                     materialize=True)  # the same, resumed
    assert summary["shards"]["already_committed"] == 1 and summary["shards"]["committed_this_run"] == 3
    ids = selected(out).column("id").to_pylist()
    kept = [r["id"] for rs in by_shard.values() for r in rs if r["score"] >= 1]
    assert sorted(ids) == sorted(kept) and len(ids) == len(set(ids))
    assert summary["curate"]["kept"] == len(kept)
    for shard, records in by_shard.items():
        assert set(materialized(out / "shards" / shard, "webdataset")) == {r["id"] for r in records
                                                                          if r["score"] >= 1}
