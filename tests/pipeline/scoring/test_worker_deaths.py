"""A scoring process that dies (killed for memory, a crash) in the middle of a call, whatever the phase: what it had
in flight counts in the run's fault journal, the call is narrowed down to the sample that kills its worker (its own
error record) and the rest of the call is scored; a worker that dies whatever it is given ends the run. Without
Ray first (a fresh scorer on the same journal stands in for Ray's restart), then with Ray's own restarts."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import model
from jobs import sample_corpus as corpus
from pipeline.errors import BrokenWorker
from pipeline.scoring import ScoreConfig, read_scores
from pipeline.scoring.device_faults import CANARY_FAILURES_BEFORE_GIVING_UP, DEATHS_PER_CULPRIT, FaultJournal
from pipeline.scoring.reading import sample_rows
from pipeline.scoring.scorer import BatchScorer
from tests.support import hostile
from tests.support.jobs import job_env
from tests.support.scoring import score_with


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return model.load(tiny_checkpoint)


def call_rows(items: list[dict]):
    """Caption samples as one call to a scoring actor receives them."""
    return sample_rows([{"id": s["key"], "source": "x.tar", "kind": "caption", "ordinal": i,
                         "texts": [None, s["caption"]], "images": [s["image"], None]} for i, s in enumerate(items)])


def restarted_until_done(loaded, table, journal, phase, always=False, limit=12):
    """Score `table` as Ray would: a scorer whose process dies (`hostile.WorkerDeath`) is replaced by a fresh one
    on the same journal, which gets the same rows. Returns (the output, how many processes died)."""
    net, processor = loaded
    for deaths in range(limit):
        scorer = BatchScorer(net, processor, token_budget=10**6, max_batch=3, journal=journal)
        hostile.dies_on_poison(scorer, phase, always=always)
        try:
            return scorer.score_table(table), deaths
        except hostile.WorkerDeath:
            continue
    return None, limit


@pytest.mark.parametrize("phase, words", [("plan", "being tokenised"), ("decode", "its images were being decoded"),
                                          ("forward", "on the device")])
def test_a_sample_that_kills_its_worker_becomes_its_error_record_and_the_call_completes(loaded, phase, words):
    table = call_rows(hostile.poisoned_captions(8, poisoned=5))
    journal = FaultJournal()
    out, deaths = restarted_until_done(loaded, table, journal, phase)
    assert deaths == DEATHS_PER_CULPRIT  # twice in its batch, then twice alone after the canary
    records = out.to_pylist()
    assert records[5]["error"] == (f"killed: the sample kills its worker on its own (while {words}; the process "
                                   "ended without a word (killed: out of memory, a crash, SIGKILL))")
    assert records[5]["error_category"] == "killed"
    assert all(r["score"] is not None and r["error"] is None for k, r in enumerate(records) if k != 5)
    stats = journal.stats()
    assert stats["deaths"] == DEATHS_PER_CULPRIT and stats["blamed_by_category"] == {"killed": 1}


def test_a_worker_that_dies_whatever_it_is_given_blames_no_sample_and_ends_the_run(loaded):
    table = call_rows(hostile.poisoned_captions(6, poisoned=2))
    journal = FaultJournal()
    with pytest.raises(BrokenWorker, match=r"fail on a synthetic sample .*died on the canary"):
        restarted_until_done(loaded, table, journal, "forward", always=True)
    stats = journal.stats()
    assert stats["samples_blamed"] == 0 and stats["canary_faults"] == CANARY_FAILURES_BEFORE_GIVING_UP


# -- with Ray's own restarts ------------------------------------------------------------------------------------
def killing_setup(tmp_path, tiny_checkpoint, phase: str) -> Path:
    """The tiny model copied under tmp_path/model, with `kill-phase` beside it (read by `hostile.KillsItsWorker`)."""
    model_dir = tmp_path / "model" / "tiny"
    shutil.copytree(tiny_checkpoint, model_dir)
    (tmp_path / "model" / "kill-phase").write_text(phase)
    return model_dir


def test_with_ray_the_sample_that_kills_its_worker_is_its_error_record_and_both_shards_commit(tmp_path, tiny_checkpoint,
                                                                                           ray_cluster):
    """The sample is killed while tokenised (the 8 MB caption of the probe, scaled down to a SIGKILL): Ray restarts
    the actor, the journal counts what each dead process had in flight, and narrows the call down to that sample."""
    model_dir = killing_setup(tmp_path, tiny_checkpoint, "plan")
    items = [hostile.poisoned_captions(6, poisoned=2, seed=0, prefix="k0-"), corpus.caption_samples(6, 1, "k1-")]
    for k, shard in enumerate(items):
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), shard)
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=str(model_dir), max_batch=4, batch_size=64, no_progress_timeout_s=120)
    _, summary = score_with(hostile.KillsItsWorker, config)
    assert summary["shards"]["incomplete"] == [] and summary["shards"]["committed_this_run"] == 2, summary
    by_id = {r["id"]: r for r in read_scores(str(tmp_path / "out")).to_pylist()}
    poisoned = items[0][2]["key"]
    assert by_id.keys() == {i["key"] for shard in items for i in shard}
    assert by_id[poisoned]["error"].startswith("killed: the sample kills its worker on its own (while being "
                                               "tokenised; Ray: SYSTEM_ERROR, the process vanished")
    assert all(r["score"] is not None for key, r in by_id.items() if key != poisoned)
    assert summary["errors"]["by_category"] == {"killed": 1}
    faults = summary["score"]["device_faults"]
    assert faults["deaths"] == DEATHS_PER_CULPRIT and faults["blamed_by_category"] == {"killed": 1}
    assert len(list((tmp_path / "model" / "actors").iterdir())) - 1 == DEATHS_PER_CULPRIT  # restarts


def killing_job(tmp_path, ray_cluster, model_dir, shards: int = 4) -> tuple[list[str], Path]:
    for k in range(shards):
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), hostile.poisoned_captions(4, 1, k, f"c{k}-"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tests.support.hostile", "--input", str(tmp_path / "in"), "--format", "webdataset",
           "--output", str(out), "--model", str(model_dir), "--gpus-per-actor", "0", "--batch-size", "4"]
    return cmd, out


def test_with_ray_a_worker_that_dies_whatever_it_is_given_ends_the_run_in_one_line(tmp_path, tiny_checkpoint,
                                                                                 ray_cluster):
    model_dir = killing_setup(tmp_path, tiny_checkpoint, "always:forward")
    cmd, out = killing_job(tmp_path, ray_cluster, model_dir)
    res = subprocess.run(cmd, env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aborted"].startswith("BrokenWorker: the scoring workers fail on a synthetic sample (3 times")
    assert summary["shards"]["committed_this_run"] == 0 and summary["records"]["errors"] == 0  # nothing as bad data


def test_with_ray_ctrl_c_is_acted_on_while_the_actor_is_being_restarted(tmp_path, tiny_checkpoint, ray_cluster):
    model_dir = killing_setup(tmp_path, tiny_checkpoint, "always:forward")
    cmd, out = killing_job(tmp_path, ray_cluster, model_dir)
    job = subprocess.Popen(cmd, env=job_env(RAY_ADDRESS=ray_cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    actors = tmp_path / "model" / "actors"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not any(
            not Path(f"/proc/{p.name}").exists() for p in (actors.iterdir() if actors.is_dir() else [])):
        time.sleep(0.05)  # until an actor's process has died: Ray is restarting it
    assert job.poll() is None, "the job ended before an actor died"
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=60)  # a hang guard: the interrupt is acted on in seconds
    assert job.returncode == 130, stdout + stderr[-3000:]
    assert "interrupted (Ctrl-C)" in stdout and "Traceback" not in stderr, stdout + stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["interrupted"]
    assert not (out / "_lease.json").exists()
