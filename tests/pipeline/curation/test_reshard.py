"""`--samples-per-shard N`: the kept samples as balanced shards of N per format in OUTPUT/shards/<format>/, with
img2dataset sidecars beside the tars and the score and label in each sample's JSON; exactly once under a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import webdataset as wds

from tests.support.curation import curate, fake_scores, materialized
from tests.support.jobs import job_env, paused_job, wait_for
from tests.support.shards import write_shards


def _scored(tmp_path, fmt: str, n_shards: int, per_shard: int) -> dict[str, list[dict]]:
    """Input shards and score records: every third sample scores under 1 (dropped by min_score 1)."""
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    kind = "caption" if fmt == "webdataset" else "interleaved"
    keys = write_shards(tmp_path / "in", n_shards, per_shard, fmt, prefix="r", name="{k:05d}")
    shards = {f"{k:05d}{suffix}": [{"id": key, "kind": kind, "score": float((i % 3) + 0.5), "label": i % 3,
                                    "error": None} for i, key in enumerate(keys[per_shard * k: per_shard * (k + 1)])]
              for k in range(n_shards)}
    fake_scores(str(tmp_path / "scores"), shards)
    return shards


def _kept(shards: dict[str, list[dict]]) -> dict[str, dict]:
    return {r["id"]: r for rs in shards.values() for r in rs if r["score"] >= 1}


def test_tar_shards_hold_n_samples_with_sidecars_and_scores(tmp_path):
    shards = _scored(tmp_path, "webdataset", 3, 8)
    kept = _kept(shards)  # 15 samples: shards of 4, 4, 4, 3
    summary = curate(tmp_path, tmp_path / "scores", min_score=1.0, input=str(tmp_path / "in"), format="webdataset",
                     samples_per_shard=4)
    assert summary["shards"]["incomplete"] == [] and summary["curate"]["resharded"]["shards"] == {"webdataset": 4}
    folder = tmp_path / "cur" / "shards" / "webdataset"
    tars = sorted(folder.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    seen = []
    for tar in tars:
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        keys = [s["__key__"] for s in samples]
        assert len(keys) == (4 if tar != tars[-1] else 3)
        for sample in samples:
            meta = json.loads(sample["json"])
            expected = kept[sample["__key__"]]
            assert (meta["score"], meta["label"]) == (expected["score"], expected["label"])
            assert meta["width"] == 128  # the sample's own metadata kept beside them
        sidecar = pq.read_table(tar.with_suffix(".parquet"))
        assert sidecar.column("key").to_pylist() == keys
        assert sidecar.column("score").to_pylist() == [kept[k]["score"] for k in keys]
        assert json.loads((folder / f"{tar.stem}_stats.json").read_text())["successes"] == len(keys)
        seen += keys
    assert sorted(seen) == sorted(kept)
    original = {}
    for name in shards:
        original.update(materialized(tmp_path / "in" / name, "webdataset"))
    for tar in tars:  # every member but the JSON as it was
        for key, data in materialized(tar, "webdataset").items():
            assert data.split(b".json")[0] == original[key].split(b".json")[0]


def test_obelics_shards_hold_n_rows_with_score_and_label(tmp_path):
    shards = _scored(tmp_path, "obelics", 2, 6)
    kept = _kept(shards)  # 8 rows: shards of 3, 3, 2
    curate(tmp_path, tmp_path / "scores", min_score=1.0, input=str(tmp_path / "in"), format="obelics",
           samples_per_shard=3)
    files = sorted((tmp_path / "cur" / "shards" / "obelics").glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    assert [t.num_rows for t in tables] == [3, 3, 2]
    rows = [r for t in tables for r in t.select(["id", "score", "label"]).to_pylist()]
    assert {r["id"]: (r["score"], r["label"]) for r in rows} == {k: (v["score"], v["label"]) for k, v in kept.items()}
    assert len(rows) == len(kept)
    assert {"texts", "images"} <= set(tables[0].column_names)


def test_a_killed_reshard_finishes_exactly_once(tmp_path):
    """Killed (SIGKILL) right after its first output shard was written; the rerun writes the others, each sample
    once, into the shards the plan gave it."""
    shards = _scored(tmp_path, "webdataset", 30, 3)
    kept = _kept(shards)
    out = tmp_path / "cur"
    argv = ["--scores", tmp_path / "scores", "--output", out, "--min-score", "1", "--input", tmp_path / "in",
            "--format", "webdataset", "--samples-per-shard", "1", "--executor", "local"]
    marker = tmp_path / "paused"
    first = paused_job("jobs.curate", argv, marker, job_env(), after="1:pipeline.curation.reshard.write_shard",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    folder = out / "shards" / "webdataset"
    assert len(list(folder.glob("*_stats.json"))) == 1
    second = subprocess.run([sys.executable, "-m", "jobs.curate", *map(str, argv)], env=job_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        got = [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
        assert len(got) == 1 and pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist() == got
        keys += got
    assert sorted(keys) == sorted(kept)
