"""`python -m jobs.score` as users run it: configuration errors (its command line in this process), resume after
SIGKILL, a job that starts its own Ray from a folder of the user's, and `ray job submit`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

from jobs import sample_corpus as corpus
from jobs.score import main
from pipeline.scoring import read_scores
from tests.support.cluster import ray_env, submit
from tests.support.jobs import REPO_ROOT, job_env, paused_job, run_main, wait_for
from tests.support.shards import assert_exactly_once, write_shards


def score_argv(input_uri, output, model, *extra) -> list:
    """The job's arguments as a cluster user gives them here: the test cluster has no GPU, so say so (a cluster job
    otherwise wants one GPU per scoring actor and fails fast)."""
    return ["--input", input_uri, "--format", "webdataset", "--output", output, "--model", model,
            "--gpus-per-actor", "0", *extra]


def test_unknown_format_fails_fast_naming_the_field(tmp_path, capsys):
    code, _, err = run_main(main, score_argv(tmp_path, tmp_path / "o", "m", "--format", "tarball"), capsys)
    assert code == 2
    assert "field 'format'" in err and "tarball" in err


def test_unknown_yaml_field_fails_fast_naming_it(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {tmp_path}\nformat: webdataset\noutput: {tmp_path}/o\nmodel: m\nconcurency: 4\n")
    code, _, err = run_main(main, ["--config", cfg], capsys)
    assert code == 2
    assert "field 'concurency': unknown field" in err


def test_invalid_values_fail_fast_naming_the_field(tmp_path, capsys):
    code, _, err = run_main(main, score_argv(tmp_path, tmp_path / "o", "m", "--concurrency", "0",
                                             "--source-image-column", "jpg"), capsys)
    assert code == 2 and "field 'concurrency'" in err


def test_an_input_or_model_that_is_not_there_fails_naming_the_field(tmp_path, tiny_checkpoint, capsys):
    corpus.write_webdataset(str(tmp_path / "in" / "a.tar"), corpus.caption_samples(2))
    for input_uri, model_uri, message in (
        (str(tmp_path / "missing"), tiny_checkpoint, "error: field 'input': "),
        (str(tmp_path / "in" / "*.parquet"), tiny_checkpoint, "error: field 'input': no webdataset shards"),
        (str(tmp_path / "in"), str(tmp_path / "no-model"), "error: field 'model': no checkpoint at"),
    ):
        code, _, err = run_main(main, score_argv(input_uri, tmp_path / "o", model_uri), capsys)
        assert code == 2 and message in err, err[-2000:]
        assert "Traceback" not in err


def test_a_rerun_after_sigkill_scores_only_the_uncommitted_shards(tmp_path, tiny_checkpoint, ray_cluster, capsys):
    """On Ray, killed (SIGKILL: no handler runs) right after its first commit: the rerun scores only the others."""
    expected = write_shards(tmp_path / "in", n_shards=3, per_shard=4, prefix="k")
    out = tmp_path / "out"
    argv = score_argv(tmp_path / "in", out, tiny_checkpoint, "--batch-size", "4")
    marker = tmp_path / "paused"
    first = paused_job("jobs.score", argv, marker, job_env(RAY_ADDRESS=ray_cluster), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    wait_for(marker, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    manifest = out / "_manifest"
    assert len(list(manifest.glob("*.json"))) == 1

    code, stdout, stderr = run_main(main, [*argv, "--executor", "local"], capsys)  # the same command, resumed
    assert code == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["already_committed"] == 1 and summary["shards"]["committed_this_run"] == 2
    assert summary["records"]["this_run"] == 8 and summary["records"]["committed_total"] == 12
    assert "1 already committed" in stdout
    assert_exactly_once(read_scores(str(out)), expected)


def test_ray_job_submit_runs_the_scoring_job(tmp_path, tiny_checkpoint, token_cluster):
    """Submitted from the checkout as the README says, to the session's job server (token authentication on)."""
    expected = write_shards(tmp_path / "in", n_shards=2, per_shard=5, prefix="job", name="{k}")
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"  # the job's config with its resource wiring, as a cluster run would have it
    config.write_text(f"input: {tmp_path / 'in'}\nformat: webdataset\noutput: {out}\nmodel: {tiny_checkpoint}\n"
                      "min_actors: 1\nconcurrency: 1\ngpus_per_actor: 0\ncpus_per_actor: 0.5\n"
                      "read_workers: 1\nread_cpus: 0.5\nno_progress_timeout_s: 900\n")
    user = ray_env(token_cluster["user_home"], RAY_AUTH_MODE="token")
    res = submit(token_cluster["dashboard"], user, "python", "-m", "jobs.score", "--config", str(config),
                 cwd=REPO_ROOT, timeout=600)
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


def test_a_cluster_job_without_a_gpu_anywhere_fails_naming_gpus_per_actor(tmp_path, tiny_checkpoint, token_cluster):
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(2))
    config = tmp_path / "job.yaml"  # the README's few-flag submission: no resource fields
    config.write_text(f"input: {tmp_path / 'in'}\nformat: webdataset\noutput: {tmp_path / 'out'}\n"
                      f"model: {tiny_checkpoint}\n")
    user = ray_env(token_cluster["user_home"], RAY_AUTH_MODE="token")
    res = submit(token_cluster["dashboard"], user, "python", "-m", "jobs.score", "--config", str(config),
                 cwd=REPO_ROOT, timeout=300)
    assert res.returncode != 0
    assert "error: field 'gpus_per_actor': the cluster at RAY_ADDRESS has no GPU now" in res.stdout + res.stderr
    assert not (tmp_path / "out" / "scores").exists()  # nothing scored at CPU speed behind the user's back


NOISE = ("core_worker.cc", "constructor arguments in the object store", "Token authentication", " INFO ",
         "WARNING", "Running Dataset", "Execution plan", "it/s]", "%|", "(raylet)", "None samples/s", "Traceback")


def test_without_ray_address_the_job_starts_its_own_instance_imports_its_own_packages_and_keeps_the_terminal_quiet(
        tmp_path, tiny_checkpoint):
    """As a user runs it from a folder of their own: no RAY_ADDRESS, no PYTHONPATH, beside folders named like this
    project's packages (`python -m model.create --output model` makes a `model/` folder; its checkpoint is given as
    `--model model`). The job starts an instance of its own on loopback (another of this session's runs on this
    host), imports this project's packages in the driver and in every Ray worker, and the terminal holds the
    progress bar and the summary and none of the noise Ray prints by default."""
    work = tmp_path / "work"
    shutil.copytree(tiny_checkpoint, work / "model")
    (work / "pipeline").mkdir()
    (work / "jobs").mkdir()
    items = corpus.caption_samples(4, seed=3, prefix="local-")
    corpus.write_webdataset(str(work / "data" / "0.tar"), items)
    env = {k: v for k, v in job_env().items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}  # as a user's shell
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # as a user runs it: the job itself keeps its instance on loopback
    res = subprocess.run([sys.executable, "-m", "jobs.score", "--input", "data", "--format", "webdataset",
                          "--output", "out", "--model", "model"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[score] started a local Ray instance on 127.0.0.1 (" in res.stderr
    assert "[score] [####################] 1/1 shards · 4 samples" in res.stderr  # the progress bar
    assert res.stdout.startswith("UniFilter score:") and "samples/s over the whole job" in res.stdout
    assert [line for line in (res.stderr + res.stdout).splitlines() if any(n in line for n in NOISE)] == []
    assert len(res.stderr.splitlines()) <= 5
    assert_exactly_once(read_scores(str(work / "out")), [i["key"] for i in items])
