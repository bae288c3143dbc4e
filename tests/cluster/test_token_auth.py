"""A cluster with token authentication on, set up as cluster/aws.yaml sets up its nodes, reached the ways the README
and the nightly CronJob (cluster/kuberay/cronjob-score.yaml) say: their commands and script run as printed, with only
the cluster's address pointed at a local `ray start --head` (the session's `token_cluster`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from jobs import sample_corpus as corpus
from pipeline.scoring import read_scores
from tests.support.cluster import ray_env
from tests.support.jobs import REPO_ROOT
from tests.support.shards import assert_exactly_once

README = Path(REPO_ROOT) / "README.md"
CRONJOB = Path(REPO_ROOT) / "cluster" / "kuberay" / "cronjob-score.yaml"
README_ADDRESS = "http://127.0.0.1:8265"  # where `ray dashboard cluster/aws.yaml` tunnels the job server


def readme_submission_script() -> tuple[list[str], str]:
    """From README "Running on a cluster": the fenced block that submits to the launcher's cluster, as printed:
    the lines before `ray job submit`, and the submission command (continuation lines joined)."""
    section = README.read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```\n(.*?)```", section, flags=re.S):
        if f"ray job submit --address {README_ADDRESS}" in block:
            lines = [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            at = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
            return lines[:at], lines[at]
    raise AssertionError("README has no `ray job submit` block for the launcher's cluster")


def test_the_readmes_submission_gets_through_token_auth(token_cluster, tmp_path):
    preamble, command = readme_submission_script()
    # As printed, up to its entrypoint: the job itself (scoring s3://bucket/...) is another test's business.
    submission = command.split(" -- ", 1)[0].replace(README_ADDRESS, token_cluster["dashboard"])
    script = "\n".join([*preamble, submission + " -- python -c \"print('the job ran')\""])
    user = ray_env(token_cluster["user_home"])  # the user's shell: the token file in ~/.ray, nothing exported

    refused = subprocess.run(["bash", "-c", submission + " -- python -c pass"], cwd=REPO_ROOT, env=user,
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr

    res = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=user, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, f"{script}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    assert "the job ran" in res.stdout


# -- the nightly CronJob's pod, run as Kubernetes would run it -------------------------------------------------------
def mount_config_map(data: dict[str, str], mount: Path) -> None:
    """A ConfigMap volume as the kubelet lays it out: the files in a timestamped folder, `..data` linking to it, and
    each key a link through `..data`."""
    stamped = mount / "..2026_03_15_02_00_00.000000001"
    stamped.mkdir(parents=True)
    for name, text in data.items():
        (stamped / name).write_text(text)
        (mount / name).symlink_to(f"..data/{name}")
    (mount / "..data").symlink_to(stamped.name)


def readme_secret(token: str) -> dict[str, dict[str, str]]:
    """The Secret as the README's `kubectl create secret generic NAME --from-literal=KEY=...` makes it, holding the
    cluster's token."""
    made = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", README.read_text())
    assert made, "the README does not say how to create the token's Secret"
    return {made[1]: {made[2]: token}}


def cronjob_attempt(cluster: dict, config_dir: Path, pod_home: Path) -> subprocess.CompletedProcess:
    """One attempt of the CronJob's Job: its container's command and args, its env with the Secret's value and the
    in-cluster head service pointed at the local head, its ConfigMap mounted at a local folder."""
    (cron,) = [d for d in yaml.safe_load_all(CRONJOB.read_text()) if d]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    secrets = readme_secret(cluster["token"])
    env = ray_env(pod_home)
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets.get(ref["name"], {}), f"{var['name']} reads {ref}; README's: {secrets}"
        env[var["name"]] = secrets[ref["name"]][ref["key"]] if ref else str(var["value"])
    if "RAY_ADDRESS" in env:
        env["RAY_ADDRESS"] = cluster["dashboard"]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config"]
    script = container["args"][0].replace(mount, str(config_dir))
    if "--address" in script:  # an address written into the script instead of RAY_ADDRESS
        script = re.sub(r"--address[= ]\S+", f"--address {cluster['dashboard']}", script)
    return subprocess.run([*container["command"], script], env=env, capture_output=True, text=True, timeout=600)


def submission_ids(output: str) -> list[str]:
    return re.findall(r"Job '([^']+)' submitted successfully", output)


def test_the_nightly_cronjob_submits_with_the_secrets_token_and_its_retry_is_accepted(token_cluster, tmp_path,
                                                                                     tiny_checkpoint):
    shards = [(tmp_path / "in" / f"{k:05d}.tar", corpus.caption_samples(3, seed=k, prefix=f"night{k}-"))
              for k in range(2)]
    corpus.write_webdataset(str(shards[0][0]), shards[0][1])  # the second shard is not readable yet: a fault
    (tmp_path / "in" / "shards.txt").write_text("00000.tar\n00001.tar\n")
    out, curated = tmp_path / "scores", tmp_path / "curated"
    mount_config_map({
        "score.yaml": f"input: {tmp_path / 'in' / 'shards.txt'}\nformat: webdataset\noutput: {out}\n"
                      f"model: {tiny_checkpoint}\nmin_actors: 1\nconcurrency: 1\ngpus_per_actor: 0\n"
                      "cpus_per_actor: 0.5\nread_workers: 1\nread_cpus: 0.5\n"
                      "source: {read_attempts: 1}\nno_progress_timeout_s: 900\n",
        "curate.yaml": f"scores: {out}\noutput: {curated}\nmin_score: 0.0\nworkers: 1\n",
    }, tmp_path / "config")
    pod_home = tmp_path / "pod"
    pod_home.mkdir()

    first = cronjob_attempt(token_cluster, tmp_path / "config", pod_home)
    log = first.stdout + first.stderr
    assert "Missing authentication token" not in log, log[-3000:]
    # Scoring left the unreadable shard uncommitted (its job failed), curation succeeded: the pod fails, so the
    # Kubernetes Job runs it again (backoffLimit).
    assert first.returncode == 1, log[-3000:]
    assert re.search(r"Job 'nightly-score-\S+' failed", log) and re.search(r"Job 'nightly-curate-\S+' succeeded", log)
    assert len(submission_ids(log)) == 2, log[-3000:]

    corpus.write_webdataset(str(shards[1][0]), shards[1][1])  # the fault has passed
    retry = cronjob_attempt(token_cluster, tmp_path / "config", pod_home)
    retry_log = retry.stdout + retry.stderr
    assert not re.search(r"submission_id \S+ already exists", retry_log), retry_log[-3000:]
    assert retry.returncode == 0, retry_log[-3000:]
    ids = submission_ids(log) + submission_ids(retry_log)
    assert len(set(ids)) == 4 and all(re.fullmatch(r"nightly-(score|curate)-\d{8}-\d{6}", i) for i in ids), ids
    # the retry finished the night's work
    assert_exactly_once(read_scores(str(out)), [s["key"] for _, samples in shards for s in samples])
