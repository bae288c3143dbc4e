"""`python -m jobs.score` as users run it: configuration errors, resume after SIGKILL, and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from jobs import sample_corpus as corpus
from pipeline.scoring import read_scores
from tests.conftest import REPO_ROOT, job_env
from tests.support.shards import assert_exactly_once, big_caption_shards, write_shards


def score_cmd(input_uri, output, model, *extra):
    """The job as a cluster user runs it here: the test cluster has no GPU, so say so (a cluster job otherwise
    wants one GPU per scoring actor and fails fast)."""
    return [sys.executable, "-m", "jobs.score", "--input", input_uri, "--format", "webdataset",
            "--output", output, "--model", model, "--gpus-per-actor", "0", *extra]


def test_unknown_format_fails_fast_naming_the_field(tmp_path):
    res = subprocess.run(score_cmd(str(tmp_path), str(tmp_path / "o"), "m", "--format", "tarball"),
                         env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "field 'format'" in res.stderr and "tarball" in res.stderr


def test_unknown_yaml_field_fails_fast_naming_it(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {tmp_path}\nformat: webdataset\noutput: {tmp_path}/o\nmodel: m\nconcurency: 4\n")
    res = subprocess.run([sys.executable, "-m", "jobs.score", "--config", str(cfg)], env=job_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "field 'concurency': unknown field" in res.stderr


def test_invalid_values_fail_fast_naming_the_field(tmp_path):
    res = subprocess.run(score_cmd(str(tmp_path), str(tmp_path / "o"), "m", "--concurrency", "0",
                                   "--source-image-column", "jpg"),
                         env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "field 'concurrency'" in res.stderr


def test_an_input_or_model_that_is_not_there_fails_naming_the_field(tmp_path, tiny_checkpoint, ray_cluster):
    corpus.write_webdataset(str(tmp_path / "in" / "a.tar"), corpus.caption_samples(2))
    for input_uri, model_uri, message in (
        (str(tmp_path / "missing"), tiny_checkpoint, "error: field 'input': "),
        (str(tmp_path / "in" / "*.parquet"), tiny_checkpoint, "error: field 'input': no webdataset shards"),
        (str(tmp_path / "in"), str(tmp_path / "no-model"), "error: field 'model': no checkpoint at"),
    ):
        res = subprocess.run(score_cmd(input_uri, str(tmp_path / "o"), model_uri),
                             env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr


def test_a_rerun_after_sigkill_scores_only_the_uncommitted_shards(tmp_path, tiny_checkpoint, ray_cluster):
    expected = big_caption_shards(str(tmp_path / "in"), n_shards=10, per_shard=10)
    out = tmp_path / "out"
    cmd = score_cmd(str(tmp_path / "in"), str(out), tiny_checkpoint, "--batch-size", "4")
    env = job_env(RAY_ADDRESS=ray_cluster)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "_manifest"
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None:
        if manifest.is_dir() and len(list(manifest.glob("*.json"))) >= 1:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it could be killed"
    committed_before = len(list(manifest.glob("*.json")))
    assert 1 <= committed_before < 10

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["already_committed"] == committed_before
    assert summary["shards"]["committed_this_run"] == 10 - committed_before
    assert summary["records"]["this_run"] == 10 * (10 - committed_before)
    assert summary["records"]["committed_total"] == 100
    assert f"{committed_before} already committed" in second.stdout
    assert_exactly_once(read_scores(str(out)), expected)


def test_ray_job_submit_runs_the_scoring_job(tmp_path, tiny_checkpoint, ray_head):
    expected = write_shards(tmp_path / "in", n_shards=2, per_shard=5, prefix="job", name="{k}")
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"  # the job's config with its resource wiring, as a cluster run would have it
    config.write_text(f"input: {tmp_path / 'in'}\nformat: webdataset\noutput: {out}\nmodel: {tiny_checkpoint}\n"
                      "min_actors: 1\nconcurrency: 1\ngpus_per_actor: 0\ncpus_per_actor: 0.5\n"
                      "read_workers: 1\nread_cpus: 0.5\nno_progress_timeout_s: 900\n")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    res = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "jobs.score", "--config", str(config)],
        cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout.lower()
    assert_exactly_once(read_scores(str(out)), expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["committed_this_run"] == 2
    placement = {"accelerator_type": None, "custom": None}
    assert summary["resources"] == {
        "read": {"num_cpus": 0.5, "num_gpus": 0.0, "min_actors": 1, "max_actors": 1, "batch_size": None,
                 "concurrent_calls": 1, **placement},
        "score": {"num_cpus": 0.5, "num_gpus": 0.0, "min_actors": 1, "max_actors": 1, "batch_size": 4 * 256,
                  "concurrent_calls": 2, **placement}}


def test_a_cluster_job_without_a_gpu_anywhere_fails_naming_gpus_per_actor(tmp_path, tiny_checkpoint, ray_head):
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(2))
    config = tmp_path / "job.yaml"  # the README's few-flag submission: no resource fields
    config.write_text(f"input: {tmp_path / 'in'}\nformat: webdataset\noutput: {tmp_path / 'out'}\n"
                      f"model: {tiny_checkpoint}\n")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    res = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "jobs.score", "--config", str(config)],
        cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert "error: field 'gpus_per_actor': the cluster at RAY_ADDRESS has no GPU now" in res.stdout + res.stderr
    assert not (tmp_path / "out" / "scores").exists()  # nothing scored at CPU speed behind the user's back


NOISE = ("core_worker.cc", "constructor arguments in the object store", "Token authentication", " INFO ",
         "WARNING", "Running Dataset", "Execution plan", "it/s]", "%|", "(raylet)", "None samples/s", "Traceback")


def test_without_ray_address_the_job_starts_its_own_local_instance_and_keeps_the_terminal_quiet(tmp_path,
                                                                                                 tiny_checkpoint):
    """Its own instance (another one of this session's runs on this host), and a terminal that holds the progress
    bar and the summary and none of the noise Ray prints by default."""
    items = corpus.caption_samples(4, seed=3, prefix="local-")
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), items)
    env = job_env()
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # as a user runs it: the job itself keeps its instance on loopback
    res = subprocess.run(score_cmd(str(tmp_path / "in"), str(tmp_path / "out"), tiny_checkpoint), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[score] started a local Ray instance on 127.0.0.1 (" in res.stderr
    assert "[score] [####################] 1/1 shards · 4 samples" in res.stderr  # the progress bar
    assert res.stdout.startswith("UniFilter score:") and "samples/s over the whole job" in res.stdout
    assert [line for line in (res.stderr + res.stdout).splitlines() if any(n in line for n in NOISE)] == []
    assert len(res.stderr.splitlines()) <= 5
    assert_exactly_once(read_scores(str(tmp_path / "out")), [i["key"] for i in items])
