"""Mistakes users make, typed as users type them: each ends with a clear refusal (exit 2, naming the field) or a
clear failure (exit 1, saying why), never with exit 0 and missing or wrong data. The command lines run in this
process (`jobs.score.main`), their stages too (the local executor) unless what is checked is Ray's; what needs a
process of its own (Ctrl-C, a fresh interpreter's imports, Ray's terminal noise) runs as one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from jobs import sample_corpus as corpus
from pipeline.commit.manifest import read_manifest
from pipeline.scoring import read_scores
from tests.support.images import huge_png_header, jpeg_bytes
from tests.support.jobs import job_env, paused_job, run_main, wait_for
from tests.support.shards import assert_exactly_once, write_shards


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def score(capsys):
    """`python -m jobs.score ...` in this process, its stages too unless `executor` says otherwise."""
    from jobs.score import main

    def run(input_uri, output, model, *extra, fmt="webdataset", executor="local") -> Ran:
        argv = ["--input", input_uri, "--format", fmt, "--output", output, "--model", model, *extra]
        if executor:
            argv += ["--executor", executor]
        return Ran(*run_main(main, argv, capsys))

    return run


def caption_shard(path, n, prefix, seed=0):
    corpus.write_webdataset(str(path), corpus.caption_samples(n, seed=seed, prefix=prefix))


def test_another_corpus_with_the_same_shard_names_is_refused_not_skipped(tmp_path, tiny_checkpoint, score):
    caption_shard(tmp_path / "laion" / "00000.tar", 3, "laion")
    caption_shard(tmp_path / "cc12m" / "00000.tar", 4, "cc12m", seed=1)
    out = tmp_path / "out"
    first = score(tmp_path / "laion", out, tiny_checkpoint)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = read_manifest(str(out))
    for extra in ([], ["--dry-run"]):  # the dry run refuses it as the run does
        other = score(tmp_path / "cc12m", out, tiny_checkpoint, *extra)
        assert other.returncode == 2, other.stdout + other.stderr
        assert "field 'input'" in other.stderr and "00000.tar" in other.stderr and "moved_from" in other.stderr
        assert "Traceback" not in other.stderr
    assert read_manifest(str(out)) == manifest  # nothing written
    # The same corpus, moved and declared so: nothing is scored again.
    shutil.copytree(tmp_path / "laion", tmp_path / "moved")
    moved = score(tmp_path / "moved", out, tiny_checkpoint, "--moved-from", tmp_path / "laion")
    assert moved.returncode == 0 and "1 already committed" in moved.stdout, moved.stdout + moved.stderr

def test_a_wrong_format_stops_before_anything_is_written(tmp_path, tiny_checkpoint, score):
    corpus.write_interleaved_wds(str(tmp_path / "docs" / "00000.tar"), corpus.documents(5))
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        res = score(tmp_path / "docs", out, tiny_checkpoint, *extra)  # webdataset, the default here
        assert res.returncode == 2, res.stdout + res.stderr
        assert "field 'format'" in res.stderr and "set format: interleaved-wds" in res.stderr
        assert not out.exists()

def test_a_shard_committed_in_one_format_is_refused_in_another(tmp_path):
    """An output whose shard was committed as webdataset records (by a wrong run of an earlier version, say): a
    rerun with another format is refused naming the field, never skipped as committed."""
    from pipeline.commit.manifest import write_entry
    from pipeline.errors import InputError
    from pipeline.io.listing import list_shards
    from pipeline.runner import JobSpec
    from pipeline.runner.prepare import survey
    from pipeline.scoring.records import SCORE_SCHEMA, scores_folder

    corpus.write_interleaved_wds(str(tmp_path / "docs" / "00000.tar"), corpus.documents(2))
    listing = list_shards(str(tmp_path / "docs"), "interleaved-wds")
    out = str(tmp_path / "out")
    write_entry(out, {"shard": "00000.tar", "files": [], "records": 2, "errors": 2, "identity": "x",
                      "input": listing.shards[0].uri, "format": "webdataset"})
    spec = JobSpec(job="score", output=out, listing=listing, identity={"a": 1}, schema=SCORE_SCHEMA,
                   partition=scores_folder, format="interleaved-wds")
    with pytest.raises(InputError, match="field 'format'.*committed as webdataset"):
        survey(spec)


def test_a_run_whose_every_sample_fails_exits_non_zero(tmp_path, tiny_checkpoint, score):
    broken = [{"key": f"b{i}", "image": jpeg_bytes()[:200], "caption": "a red square"} for i in range(3)]
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), broken)
    res = score(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "every sample of this run is an error record" in res.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["every_sample_failed"] and summary["records"]["errors"] == 3

def test_a_failed_preflight_writes_nothing_and_an_empty_output_may_be_reclaimed(tmp_path, tiny_checkpoint, score,
                                                                                  ray_cluster, monkeypatch):
    caption_shard(tmp_path / "in" / "0.tar", 2, "p")
    out = tmp_path / "out"
    # A cluster job wants GPUs; this cluster (the session's, through RAY_ADDRESS) has none and cannot start any:
    # refused, and nothing written.
    with monkeypatch.context() as env:
        env.setenv("RAY_ADDRESS", ray_cluster)
        res = score(tmp_path / "in", out, tiny_checkpoint, executor=None)
    assert res.returncode == 2 and "field 'gpus_per_actor'" in res.stderr, res.stderr[-2000:]
    assert not out.exists()
    # An output claimed (an identity of another precision) but holding no committed shard is re-claimed.
    from pipeline.commit.identity import Claim, record_identity

    record_identity(str(out), "score", Claim({"model": {"id": "x"}, "dtype": "bfloat16"}, write=True))
    res = score(tmp_path / "in", out, tiny_checkpoint)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "held no committed shard" in res.stderr and "re-claimed" in res.stderr
    assert json.loads((out / "_output.json").read_text())["identity"]["dtype"] == "float32"

def test_actors_that_all_fail_at_start_up_are_one_line_and_never_nothing_new(tmp_path, tiny_checkpoint,
                                                                              ray_cluster):
    """On Ray (what Ray says when every actor of a pool fails in its constructor, and its terminal noise)."""
    model_dir = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not safetensors" * 64)  # config and tokenizer still load
    caption_shard(tmp_path / "in" / "0.tar", 2, "a")
    res = subprocess.run([sys.executable, "-m", "jobs.score", "--input", tmp_path / "in", "--format", "webdataset",
                          "--output", tmp_path / "out", "--model", model_dir, "--gpus-per-actor", "0"],
                         env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) < 15, res.stderr[-3000:]
    assert "ScoreStage's actors failed at start-up: CheckpointError" in res.stdout
    assert "not a safetensors file" in res.stdout
    assert "nothing new" not in res.stdout and "nothing scored: the run stopped" in res.stdout

def test_errors_are_counted_by_reason_with_an_example(tmp_path, tiny_checkpoint, score):
    bad = [{"key": "id-cut", "image": jpeg_bytes()[:300], "caption": "x"},
           {"key": "id-zero", "image": b"", "caption": "x"},
           {"key": "id-pdf", "image": b"%PDF-1.4 no image", "caption": "x"},
           {"key": "id-huge", "image": huge_png_header(), "caption": "x", "ext": "png"},
           {"key": "id-latin1", "image": jpeg_bytes(), "caption": b"caf\xe9"},
           *corpus.caption_samples(2, prefix="good")]
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), bad)
    res = score(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"]["by_category"] == {"decode": 5}
    assert len(summary["errors"]["by_reason"]) == 5  # five different reasons, not one "decode"
    examples = {e["id"] for e in summary["errors"]["examples"].values()}
    assert examples == {"id-cut", "id-zero", "id-pdf", "id-huge", "id-latin1"}
    for reason in summary["errors"]["by_reason"]:  # reasons name no sample and no shard
        assert "id-" not in reason and "0.tar" not in reason, reason
    assert res.stdout.count("  error ") == 5 and "(e.g. id-zero in 0.tar)" in res.stdout

def test_a_model_path_typo_is_a_missing_path_reported_before_torch_loads(tmp_path):
    caption_shard(tmp_path / "in" / "0.tar", 1, "t")
    (tmp_path / "models").mkdir()
    for model, said in (("models/tiny", f"no such directory (relative to {tmp_path})"),
                        (str(tmp_path / "nowhere"), "no such directory")):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs.score", "--input", "in", "--format",
                              "webdataset", "--output", "out", "--model", model], cwd=tmp_path, env=job_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and f"error: field 'model': no checkpoint at '{model}': {said}" in res.stderr
        imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import")]
        assert "torch" not in imported and "transformers" not in imported  # a typo costs no model-library import
        assert "internet" not in res.stderr and not (tmp_path / "out").exists()


def test_weights_replaced_in_place_are_another_model(tmp_path, tiny_checkpoint, score):
    from model.create import create

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    caption_shard(tmp_path / "in" / "0.tar", 2, "w")
    assert score(tmp_path / "in", tmp_path / "out", model_dir).returncode == 0
    create("tiny", str(tmp_path / "other"), num_labels=1, seed=5)  # same config, other weights
    shutil.copy(tmp_path / "other" / "model.safetensors", model_dir / "model.safetensors")
    caption_shard(tmp_path / "in" / "1.tar", 2, "w1", seed=1)
    res = score(tmp_path / "in", tmp_path / "out", model_dir)
    assert res.returncode == 2 and "field 'model'" in res.stderr and "weights sha256:" in res.stderr, res.stderr
    assert sorted(read_manifest(str(tmp_path / "out"))) == ["0.tar"]

def test_a_committed_file_deleted_by_hand_is_noticed_and_scored_again(tmp_path, tiny_checkpoint):
    from pipeline.errors import OutputMismatch
    from pipeline.scoring import ScoreConfig, score_dataset

    write_shards(tmp_path / "in", n_shards=2, per_shard=2, prefix="d", name="{k}")
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=tiny_checkpoint, executor="local")
    score_dataset(config, progress=False)
    os.unlink(tmp_path / "out" / "scores" / "1.tar.parquet")
    with pytest.raises(OutputMismatch, match="files are gone.*scores/1.tar.parquet"):
        read_scores(str(tmp_path / "out"))
    again = score_dataset(config, progress=False)
    assert again["shards"]["new"] == 1 and again["records"]["this_run"] == 2
    assert len(read_scores(str(tmp_path / "out"))) == 4

def test_curation_mistakes_are_refused_before_anything_starts(tmp_path, capsys):
    from jobs.curate import main

    for extra in (["--min-score", "nan"], ["--output", "{scores}", "--keep-fraction", "0.5"]):
        scores = tmp_path / "scores"
        argv = [a.format(scores=scores) for a in extra]
        if "--output" not in argv:
            argv += ["--output", str(tmp_path / "cur")]
        for dry in ([], ["--dry-run"]):
            code, _, err = run_main(main, ["--scores", scores, *argv, *dry], capsys)
            assert code == 2, err
            assert ("field 'min_score'" in err) or ("field 'output'" in err and "scores' own output" in err), err

def test_ctrl_c_ends_with_the_summary_of_what_was_committed(tmp_path, tiny_checkpoint, ray_cluster):
    """On Ray, interrupted right after its first commit (the driver paused there): exit 130, the summary of what
    was committed, the lease released; a rerun finishes the rest."""
    from pipeline.scoring import ScoreConfig, score_dataset

    expected = write_shards(tmp_path / "in", n_shards=3, per_shard=4, prefix="i")
    out = tmp_path / "out"
    argv = ["--input", tmp_path / "in", "--format", "webdataset", "--output", out, "--model", tiny_checkpoint,
            "--gpus-per-actor", "0", "--batch-size", "4"]
    marker = tmp_path / "paused"
    job = paused_job("jobs.score", argv, marker, job_env(RAY_ADDRESS=ray_cluster),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, job)
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "interrupted (Ctrl-C)" in stdout, stdout + stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["shards"]["committed_this_run"] == 1
    assert not (out / "_lease.json").exists()
    again = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(out), model=tiny_checkpoint,
                        batch_size=4, executor="local")  # the rest, as the same command (resumes alike anywhere)
    assert score_dataset(again, progress=False)["shards"]["already_committed"] == 1
    assert_exactly_once(read_scores(str(out)), expected)

