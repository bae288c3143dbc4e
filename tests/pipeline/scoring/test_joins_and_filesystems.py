"""Scores that join back to the corpus (img2dataset's key and url), a corpus that moves (declared) without being
scored again, brace ranges, and filesystems pyarrow has none of its own for (an in-memory one, and any fsspec
package's)."""

from __future__ import annotations

import json
import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sample_corpus as corpus
from pipeline.errors import InputError
from pipeline.scoring import ScoreConfig, read_scores, score_dataset
from tests.support.shards import assert_exactly_once, write_shards


def img2dataset_shards(root, n_shards: int, per_shard: int) -> list[dict]:
    """Shards as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json (key, url, ...) in a tar, and the
    shard's metadata beside it as `<stem>.parquet`."""
    rows = []
    for k in range(n_shards):
        samples = corpus.caption_samples(per_shard, seed=k, prefix=f"{k:05d}")
        for s in samples:
            s["meta"] = {"key": s["key"], "url": f"https://example.com/img/{s['key']}.jpg", "caption": s["caption"],
                         "status": "success", "width": 128}
        corpus.write_webdataset(str(root / f"{k:05d}.tar"), samples)
        meta = [s["meta"] for s in samples]
        pq.write_table(pa.Table.from_pylist(meta), root / f"{k:05d}.parquet")
        rows += meta
    return rows


def score(input_uri, output, model, executor="local", **kw):
    config = ScoreConfig(input=str(input_uri), format="webdataset", output=str(output), model=model,
                         executor=executor, **kw)
    return score_dataset(config, progress=False)


def test_scores_join_back_to_img2dataset_shards_and_a_moved_corpus_is_not_scored_again(tmp_path, tiny_checkpoint):
    meta = img2dataset_shards(tmp_path / "laion", 2, 5)
    out = tmp_path / "scores"
    score(tmp_path / "laion", out, tiny_checkpoint)
    scores = read_scores(str(out)).drop_columns(["probs"])  # (pyarrow joins no list columns)
    metadata = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "laion").glob("*.parquet"))])
    joined = scores.join(metadata, keys="key", right_keys="key", join_type="inner", right_suffix="_meta")
    assert joined.num_rows == len(meta) == scores.num_rows  # every score row finds its metadata row
    for row in joined.to_pylist():
        assert row["url"] == row["url_meta"] == f"https://example.com/img/{row['key']}.jpg"
        assert row["source"] == f"{row['key'][:5]}.tar"  # the shard, relative to the input root
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["00000.tar.parquet", "00001.tar.parquet"]

    shutil.copytree(tmp_path / "laion", tmp_path / "moved" / "laion")  # the corpus, copied elsewhere
    with pytest.raises(InputError, match="set moved_from: .*laion"):  # unless declared, another corpus' shards
        score(tmp_path / "moved" / "laion", out, tiny_checkpoint)
    again = score(tmp_path / "moved" / "laion", out, tiny_checkpoint, moved_from=str(tmp_path / "laion"))
    assert again["shards"]["already_committed"] == 2 and again["shards"]["new"] == 0
    assert again["records"]["this_run"] == 0


def test_brace_ranges_and_an_in_memory_output_end_to_end(tmp_path, tiny_checkpoint):
    expected = write_shards(tmp_path / "in", 4, 3, prefix="b", name="{k:05d}")[:9]  # shards 0-2 of 0-3
    out = "memory://unifilter-test/scores"  # the driver writes every output file; an fsspec in-memory store
    summary = score(f"{tmp_path}/in/{{00000..00002}}.tar", out, tiny_checkpoint)
    assert summary["shards"]["total"] == 3 and summary["shards"]["incomplete"] == []
    assert_exactly_once(read_scores(out), expected)
    memory = fsspec.filesystem("memory")
    assert memory.exists("/unifilter-test/scores/_output.json")
    assert not memory.exists("/unifilter-test/scores/_lease.json")  # released at the end
    assert json.loads(memory.cat("/unifilter-test/scores/summary.json"))["records"]["this_run"] == 9


def test_inputs_on_any_fsspec_filesystem(tmp_path, tiny_checkpoint, ray_cluster, monkeypatch):
    """On Ray: the job's workers import the module that registers the filesystem too."""
    monkeypatch.setenv("UNIFILTER_FSSPEC_IMPORTS", "tests.support.testfs")
    items = corpus.caption_samples(4, seed=7, prefix="fs-")
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), items)
    summary = score(f"testdir://{tmp_path}/in", tmp_path / "out", tiny_checkpoint, executor="ray")
    assert summary["shards"]["committed_this_run"] == 1
    assert_exactly_once(read_scores(str(tmp_path / "out")), [i["key"] for i in items])
