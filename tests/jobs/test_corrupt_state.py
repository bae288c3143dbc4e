"""A state file of an output that cannot be read (cut short, overwritten) is named with what to do: exit status 2,
one line, no traceback unless `--verbose`; the jobs never guess past it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import curate, score, synth
from jobs import sample_corpus as corpus
from pipeline.commit.committer import RecordLayout, ShardCommitter
from pipeline.commit.lease import Lease
from pipeline.commit.markers import end_marker
from pipeline.scoring.records import SCORE_SCHEMA, scores_folder


def _commit_one_shard(output: Path, consolidate: bool) -> None:
    """A real commit of shard `00000.tar` (a record, or a consolidated manifest part)."""
    committer = ShardCommitter(str(output), RecordLayout(SCORE_SCHEMA, scores_folder), "id")
    rows = [{"id": f"k{i}", "source": "00000.tar", "kind": "caption", "ordinal": i, "score": 1.0, "label": 1,
             "model": "tiny"} for i in range(2)]
    committer.add(pa.Table.from_pylist([*rows, end_marker("00000.tar", 2)]))
    if consolidate:
        committer.consolidate()


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(output: Path, which: str) -> Path:
    """Leave the output with one state file cut in half; returns that file."""
    output.mkdir(parents=True, exist_ok=True)
    if which == "identity":
        path = output / "_output.json"
        path.write_text(json.dumps({"job": "score", "identity": {"model": {"id": "tiny"}}, "identity_hash": "x"}))
    elif which == "lease":
        with Lease(str(output), "score") as lease:
            data = lease._store.read()[0]
        path = output / "_lease.json"
        path.write_bytes(data)
    elif which == "record":
        _commit_one_shard(output, consolidate=False)
        path = output / "_manifest" / "00000.tar.json"
    else:
        _commit_one_shard(output, consolidate=True)
        (path,) = (output / "_manifest" / "_parts").glob("*.parquet")
    _cut_short(path)
    return path


REMEDIES = {
    "identity": "is not a valid JSON object (truncated?): restore it from a backup, or delete it and rerun with "
                "the same model and settings",
    "lease": "is not a valid lease (truncated?): if no job is running on this output, delete it",
    "record": "(the commit record of one shard) is not valid (truncated?): restore it from a backup, or delete it "
              "and rerun: that shard is done again",
    "part": "(a part of the commit manifest) cannot be read (",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    corpus.write_webdataset(str(root / "00000.tar"), corpus.caption_samples(2, seed=0, prefix="c-"))
    return root


@pytest.mark.parametrize("which", list(REMEDIES))
def test_score_names_a_corrupt_state_file_and_what_to_do(which, tmp_path, corpus_dir, tiny_checkpoint, capsys):
    # the stages in this process: the lease is read only when the run claims the output, and a job on Ray would
    # connect first (and print its own instance's start-up line before the error)
    out = tmp_path / "out"
    path = corrupt(out, which)
    status = score.main(["--input", str(corpus_dir), "--format", "webdataset", "--output", str(out),
                         "--model", tiny_checkpoint, "--executor", "local"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"error: field 'output': {path} {REMEDIES[which]}"), err
    assert len(err.strip().splitlines()) == 1
    if which != "lease":
        assert not (out / "_lease.json").exists()  # and the output is not left held


def test_curate_names_a_corrupt_manifest_part_of_its_scores(tmp_path, capsys):
    scores = tmp_path / "scores"
    path = corrupt(scores, "part")
    status = curate.main(["--scores", str(scores), "--output", str(tmp_path / "curated"), "--min-score", "0"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"error: field 'scores': {path} {REMEDIES['part']}"), err


def test_synth_names_a_corrupt_identity_file(tmp_path, corpus_dir, capsys):
    out = tmp_path / "pairs"
    path = corrupt(out, "identity")
    status = synth.main(["--input", str(corpus_dir), "--format", "webdataset", "--output", str(out),
                         "--generator", "offline"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"error: field 'output': {path} is not a valid JSON object (truncated?)"), err


def test_verbose_shows_the_traceback_above_the_same_line(tmp_path, corpus_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    path = corrupt(out, "record")
    args = ["--input", str(corpus_dir), "--format", "webdataset", "--output", str(out), "--model", tiny_checkpoint]
    assert score.main(args) == 2
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and f"{path} (the commit record of one shard)" in quiet
    assert score.main([*args, "--verbose"]) == 2
    verbose = capsys.readouterr().err
    assert "Traceback (most recent call last)" in verbose and "CorruptState" in verbose
    assert verbose.rstrip().splitlines()[-1] == quiet.rstrip()
