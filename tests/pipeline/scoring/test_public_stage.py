"""`UniFilterScorer`, UniFilter as a stage of a user's own Ray Data pipeline: on a dataset read with Ray's own
`read_webdataset` (raw bytes), every input row comes back once with its columns kept and the score columns added,
a sample that cannot be scored keeps its row with its error, and the scores are the scoring job's."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs import sample_corpus as corpus
from pipeline.scoring import ScoreConfig, ScoringSettings, UniFilterScorer, read_scores, score_dataset
from pipeline.scoring.public import ADDED
from tests.support.images import jpeg_bytes
from tests.support.shards import write_shards

CORRUPT = "corrupt-jpeg"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, dict[str, dict]]:
    """Three webdataset shards (folder, samples by key): two drawn ones, and one whose second sample's JPEG is cut
    short."""
    root = tmp_path_factory.mktemp("public") / "in"
    write_shards(root, 2, 8)
    odd = corpus.caption_samples(3, seed=9, prefix="odd")
    odd.insert(1, {"key": CORRUPT, "image": jpeg_bytes()[:300], "caption": "a red square"})
    corpus.write_webdataset(str(root / "002.tar"), odd)
    samples = {s["key"]: s for k in range(2) for s in corpus.caption_samples(8, seed=k, prefix=f"s{k}-")}
    samples.update((s["key"], s) for s in odd)
    return str(root), samples


@pytest.fixture(scope="module")
def scored(shards, tiny_checkpoint, ray_cluster) -> list[dict]:
    """The shards through `ray.data.read_webdataset(decoder=None)` and `map_batches(UniFilterScorer)`, as rows."""
    import ray

    ds = ray.data.read_webdataset(shards[0], decoder=None)
    ds = ds.map_batches(UniFilterScorer, fn_constructor_kwargs={"model": tiny_checkpoint}, concurrency=1,
                        batch_size=64, batch_format="pyarrow")
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).to_pylist()


def test_every_row_comes_back_once_with_its_columns_and_the_score_columns(shards, scored, tiny_checkpoint):
    _, samples = shards
    keys = [row["__key__"] for row in scored]
    assert sorted(keys) == sorted(samples) and len(keys) == len(set(keys))
    for row in scored:
        sample = samples[row["__key__"]]
        assert row["jpg"] == sample["image"] and row["txt"] == sample["caption"].encode()  # the input, as it was
        assert row["__url__"].endswith(".tar") and row["json"] is not None
        assert set(ADDED) <= set(row)
    good = [row for row in scored if row["__key__"] != CORRUPT]
    assert all(row["error"] is None and row["score"] is not None and row["label"] in (0, 1, 2, 3) for row in good)
    assert all(row["model"].startswith(tiny_checkpoint + "@") and row["n_images"] == 1 for row in good)


def test_a_corrupt_image_is_its_rows_error_and_it_has_no_score(scored):
    [row] = [row for row in scored if row["__key__"] == CORRUPT]
    assert row["error"].startswith("decode: ") and row["score"] is None and row["label"] is None
    assert row["jpg"] == jpeg_bytes()[:300]  # its row kept, with its bytes


def test_the_scores_are_the_scoring_jobs(shards, scored, tiny_checkpoint, tmp_path):
    summary = score_dataset(ScoreConfig(input=shards[0], format="webdataset", output=str(tmp_path / "out"),
                                        model=tiny_checkpoint), progress=False)
    assert summary["shards"]["committed_this_run"] == 3
    job = {r["id"]: r for r in read_scores(str(tmp_path / "out")).to_pylist()}
    ours = {row["__key__"]: row for row in scored}
    assert ours.keys() == job.keys()
    for key, row in ours.items():
        assert row["error"] == job[key]["error"], key
        assert (row["score"] is None) == (job[key]["score"] is None), key
        if row["score"] is not None:
            assert row["score"] == pytest.approx(job[key]["score"], abs=1e-6), key


def test_a_caption_that_does_not_decode_or_a_row_without_an_image_keeps_its_row_with_its_error(tiny_checkpoint):
    """Called in this process, as Ray's actor would call it."""
    stage = UniFilterScorer(tiny_checkpoint)
    batch = pa.table({"__key__": ["good", "latin1", "no-image"], "jpg": [jpeg_bytes(), jpeg_bytes(), None],
                      "txt": [b"a red square", "caf\xe9".encode("latin-1"), b"a red square"]})
    rows = {row["__key__"]: row for row in stage(batch).to_pylist()}
    assert rows["good"]["error"] is None and rows["good"]["score"] is not None
    assert rows["latin1"]["error"] == "decode: caption is not valid UTF-8 (unexpected end of data at byte 3)"
    assert rows["no-image"]["error"] == "empty: sample has no image"
    assert rows["latin1"]["score"] is None and rows["no-image"]["score"] is None


def test_the_stage_takes_the_scoring_settings_whole(tiny_checkpoint):
    stage = UniFilterScorer(ScoringSettings(model=tiny_checkpoint, jpeg_draft=True, max_batch=3, token_budget=512))
    scorer = stage.scorer
    assert (scorer.processor.jpeg_draft, scorer.max_batch, scorer.token_budget) == (True, 3, 512)
