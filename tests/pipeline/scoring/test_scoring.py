"""Batch scoring end to end: every format and the S3 path on a real local Ray instance, an actor crash there; bad
input and incremental reruns with the stages in this process (the local executor: the records are the stages')."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from jobs import sample_corpus as corpus
from pipeline.commit.manifest import read_manifest
from pipeline.scoring import ScoreConfig, read_scores, score_dataset
from pipeline.scoring.stage import ScoreStage
from tests.support.images import huge_png_header, jpeg_bytes
from tests.support.scoring import score_with
from tests.support.shards import WRITERS, assert_exactly_once, write_shards


def run(tmp_path, fmt, input_uri, model, output=None, **kw):
    config = ScoreConfig(input=input_uri, format=fmt, output=output or str(tmp_path / "out"), model=model, **kw)
    return score_dataset(config, progress=False), config.output


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_scores_each_sample_exactly_once(fmt, tmp_path, tiny_checkpoint, ray_cluster):
    expected = write_shards(tmp_path / "in", 3, 7, fmt)
    summary, out = run(tmp_path, fmt, str(tmp_path / "in"), tiny_checkpoint)
    table = read_scores(out)
    assert_exactly_once(table, expected)
    assert table.column("error").null_count == len(expected)
    scores = table.column("score").to_pylist()
    assert all(s == s and abs(s) < 100 for s in scores)  # finite
    assert set(table.column("label").to_pylist()) <= {0, 1, 2, 3}
    assert set(table.column("kind").to_pylist()) == {"caption" if fmt in ("webdataset", "parquet") else "interleaved"}
    assert all(m.startswith(tiny_checkpoint + "@") for m in table.column("model").to_pylist())
    assert summary["records"]["this_run"] == len(expected) and summary["shards"]["committed_this_run"] == 3


def test_bad_input_becomes_error_records_and_nothing_is_dropped(tmp_path, tiny_checkpoint):
    good = corpus.caption_samples(2, prefix="good")
    bad = [
        {"key": "corrupt-jpeg", "image": jpeg_bytes()[:300], "caption": "a red square"},
        {"key": "zero-bytes", "image": b"", "caption": "a red square"},
        {"key": "not-an-image", "image": b"%PDF-1.4 this is no image", "caption": "a red square"},
        {"key": "huge-png", "image": huge_png_header(), "caption": "a red square", "ext": "png"},
        {"key": "no-caption", "image": jpeg_bytes(), "caption": None},
        {"key": "bad-utf8", "image": jpeg_bytes(), "caption": b"\xff\xfe broken"},
    ]
    corpus.write_webdataset(str(tmp_path / "in" / "caps.tar"), good + bad)
    cut = tmp_path / "in" / "cut.tar"
    corpus.write_webdataset(str(cut), corpus.caption_samples(5, prefix="cut"))
    cut.write_bytes(cut.read_bytes()[:9000])
    summary, out = run(tmp_path, "webdataset", str(tmp_path / "in"), tiny_checkpoint, executor="local")
    table = read_scores(out).to_pylist()
    by_id = {r["id"]: r for r in table}
    assert len(by_id) == len(table)
    expected_errors = {"corrupt-jpeg": "decode: corrupt image", "zero-bytes": "decode: empty image payload",
                       "not-an-image": "decode: not a recognised image format", "huge-png": "decode: image too large",
                       "no-caption": "empty: sample has no caption", "bad-utf8": "decode: caption is not valid UTF-8"}
    for key, reason in expected_errors.items():
        assert by_id[key]["error"].startswith(reason), by_id[key]
        assert by_id[key]["score"] is None and by_id[key]["label"] is None
    for s in good:
        assert by_id[s["key"]]["error"] is None and by_id[s["key"]]["score"] is not None
    cut_rows = [r for r in table if r["source"] == "cut.tar"]
    assert sum(1 for r in cut_rows if r["error"]) == 1
    assert any(r["error"] and "truncated or corrupt tar" in r["error"] for r in cut_rows)
    assert summary["errors"]["by_category"]["decode"] >= 5 and summary["errors"]["by_category"]["empty"] == 1


def test_bad_documents_are_errors_or_truncated(tmp_path, tiny_checkpoint):
    many = {"key": "hundred-images", "texts": [], "images": []}
    for i in range(100):
        many["texts"] += [f"section {i}", None]
        many["images"] += [None, jpeg_bytes("blue", (16, 16))]
    docs = [
        {"key": "no-images", "texts": ["just text", "more text"], "images": [None, None]},
        many,
        *corpus.documents(2, prefix="fine"),
    ]
    corpus.write_obelics(str(tmp_path / "in" / "docs.parquet"), docs)
    summary, out = run(tmp_path, "obelics", str(tmp_path / "in"), tiny_checkpoint, executor="local")
    by_id = {r["id"]: r for r in read_scores(out).to_pylist()}
    assert set(by_id) == {d["key"] for d in docs}
    assert by_id["no-images"]["error"] == "empty: interleaved document has no images"
    hundred = by_id["hundred-images"]
    assert hundred["error"] is None and hundred["truncated"] and hundred["score"] is not None
    assert hundred["n_images"] == 16 and hundred["n_tokens"] <= 1024
    assert summary["score"]["truncated_this_run"] == 1


def test_s3_inputs_and_outputs(s3_bucket, tiny_checkpoint, ray_cluster, tmp_path):
    expected = write_shards(f"s3://{s3_bucket}/in", 2, 4, prefix="s3-")
    output = f"s3://{s3_bucket}/out"
    summary, _ = run(tmp_path, "webdataset", f"s3://{s3_bucket}/in", tiny_checkpoint, output=output)
    assert_exactly_once(read_scores(output), expected)
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    assert "out/summary.json" in keys
    assert sorted(read_manifest(output)) == ["000.tar", "001.tar"]  # commit records, consolidated at the end
    assert any(k.startswith("out/_manifest/_parts/") and k.endswith(".parquet") for k in keys)
    assert sum(k.startswith("out/scores/") and k.endswith(".parquet") for k in keys) == 2


class WaitsInItsFirstCall(ScoreStage):
    """A scoring stage whose first call, on whichever actor, waits (its batch in flight) until the test opens the
    gate beside the model; it leaves its pid there first."""

    def process_table(self, table):
        root = Path(self.settings.model).parent
        if not (root / "gate").exists():
            (root / "in-flight").write_text(str(os.getpid()))
            while not (root / "gate").exists():
                time.sleep(0.05)
        return super().process_table(table)


def test_a_killed_scoring_actor_is_replaced_and_no_record_is_lost(tmp_path, tiny_checkpoint, ray_cluster):
    """A scoring actor is killed with a batch in flight (as ray.kill kills one: its process dies at once); Ray
    replaces it and retries the batch, and every record is committed once."""
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "model" / "tiny")
    expected = write_shards(tmp_path / "in", 3, 4, prefix="k")
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=str(tmp_path / "model" / "tiny"), batch_size=4)
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=score_with(WaitsInItsFirstCall, config)[1]))
    thread.start()
    in_flight, deadline = tmp_path / "model" / "in-flight", time.time() + 300
    try:
        while not in_flight.exists() and thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert in_flight.exists(), "no batch reached a scoring actor"
        os.kill(int(in_flight.read_text()), signal.SIGKILL)
    finally:
        (tmp_path / "model" / "gate").touch()
        thread.join(timeout=300)
    assert len(read_manifest(str(tmp_path / "out"))) == 3
    assert result["summary"]["shards"]["incomplete"] == []
    table = read_scores(str(tmp_path / "out"))
    assert_exactly_once(table, expected)
    assert table.column("error").null_count == len(expected)
    assert pc.min(table.column("score")).as_py() is not None


def test_incremental_rerun_scores_only_new_shards(tmp_path, tiny_checkpoint, s3_bucket):
    """On S3 (the same runner serves a local output: tests/jobs/test_cli.py's dry run grows a local input)."""
    root, output = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    expected = write_shards(root, 2, 5, prefix="inc")
    first, _ = run(tmp_path, "webdataset", root, tiny_checkpoint, output=output, executor="local")
    assert first["shards"]["new"] == 2 and first["shards"]["committed_this_run"] == 2
    expected += write_shards(root, 3, 5, prefix="inc", first=2)  # the prefix keeps growing
    second, _ = run(tmp_path, "webdataset", root, tiny_checkpoint, output=output, executor="local")
    assert second["shards"] == {"total": 5, "already_committed": 2, "new": 3, "committed_this_run": 3, "incomplete": [],
                                "duplicates_in_input": 0, "duplicate_spellings": {}}
    assert second["records"]["this_run"] == 15 and second["records"]["committed_total"] == 25
    assert_exactly_once(read_scores(output), expected)
