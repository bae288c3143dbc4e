"""The scoring data path: what crosses to the scoring actors is the samples as the shards hold them (encoded
images and text), measured by the job itself; the Ray-free path (`pipeline.scoring.local`) is the code the job's
actors run, so it scores the bundled shards exactly as the job does; the summary says how busy the device was."""

from __future__ import annotations

import pytest

from jobs import sample_corpus as corpus
from pipeline.scoring import ScoreConfig, ScoringSettings, read_scores, score_dataset
from pipeline.scoring.local import score_shards

BUNDLED = {  # the bundled sample corpus (what the demo draws), as the two kinds of shards the job reads
    "caption": ("webdataset", lambda k: corpus.caption_samples(24, seed=k, prefix=f"c{k}-"), corpus.write_webdataset,
                "tar"),
    "interleaved": ("obelics", lambda k: corpus.documents(8, seed=k, prefix=f"d{k}-"), corpus.write_obelics,
                    "parquet"),
}


@pytest.fixture(scope="module")
def scored_by_the_job(tmp_path_factory, tiny_checkpoint):
    """Two shards of each kind of the bundled corpus, scored once by the job (its stages in this process, as on
    Ray: tests/pipeline/runner/test_executors.py): {kind: (input, summary, records)}."""
    out = {}
    for kind, (fmt, draw, write, suffix) in BUNDLED.items():
        root = tmp_path_factory.mktemp(kind)
        for k in range(2):
            write(str(root / "in" / f"{k:05d}.{suffix}"), draw(k))
        summary = score_dataset(ScoreConfig(input=str(root / "in"), format=fmt, output=str(root / "out"),
                                            model=tiny_checkpoint, executor="local"), progress=False)
        out[kind] = (str(root / "in"), summary, read_scores(str(root / "out")))
    return out


@pytest.mark.parametrize("kind", list(BUNDLED))
def test_the_ray_free_path_scores_the_bundled_shards_as_the_job_does(kind, scored_by_the_job, tiny_checkpoint):
    input_uri, _, by_job = scored_by_the_job[kind]
    local = [r for table in score_shards(input_uri, BUNDLED[kind][0], ScoringSettings(model=tiny_checkpoint))
             for r in table.to_pylist()]
    job = {(r["source"], r["id"]): r for r in by_job.to_pylist()}
    assert len(local) == len(job) == len({(r["source"], r["id"]) for r in local}) > 0
    for record in local:
        expected = job[(record["source"], record["id"])]
        assert record["score"] == pytest.approx(expected["score"], abs=1e-5)
        same = ("kind", "label", "n_images", "n_tokens", "truncated", "error", "model", "key", "url")
        assert {k: record[k] for k in same} == {k: expected[k] for k in same}


@pytest.mark.parametrize("kind", list(BUNDLED))
def test_what_crosses_to_the_scoring_actors_is_the_encoded_samples(kind, scored_by_the_job):
    """Decoded pixels are 443 KB per caption (27x its shard bytes): the job measures what its scoring actors
    received, and it stays under twice the input's own bytes per sample."""
    _, summary, _ = scored_by_the_job[kind]
    own = summary["score"]
    assert own["transfer_bytes_per_sample"] > 0 and own["input_bytes_per_sample"] > 0
    assert own["transfer_bytes_per_sample"] < 2 * own["input_bytes_per_sample"]
    assert own["transfer_bytes_per_sample"] < 3 * 384 * 384 / 10  # far below one decoded image


@pytest.mark.parametrize("kind", list(BUNDLED))
def test_the_summary_says_how_busy_the_device_was_and_what_starved_it(kind, scored_by_the_job):
    """On CPUs the device is the forward's wall clock; eager, the tower runs exactly the real images."""
    _, summary, _ = scored_by_the_job[kind]
    own = summary["score"]
    busy = own["device_busy"]
    assert 0 < busy["pct"] <= 100 and busy["actors"] >= 1
    assert set(busy["waiting_pct"]) == {"decode", "input", "host"}
    assert (busy["starved_by"] is None) == (busy["pct"] >= 90)
    assert own["vision_padding"] == 1.0 and own["compile_s"] is None and own["recompiles"] is None
