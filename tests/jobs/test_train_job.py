"""`python -m jobs.train` as users run it: configuration errors, and a run killed after its first checkpoint that
resumes from it when rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import model
from jobs import sample_corpus as corpus
from pipeline.synth import SynthConfig, synthesize
from tests.conftest import job_env


def test_unknown_model_config_fails_fast_naming_the_field(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--train", "a", "--val", "b", "--output", "c",
                          "--model-config", "qwen-7b"], env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "field 'model_config'" in res.stderr


def _checkpoint_states(bucket: str, prefix: str) -> list[dict]:
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys
            if k.endswith("train_state.json") and "/checkpoint_" in k]


def test_a_killed_run_resumes_from_its_checkpoints_on_s3(tmp_path, s3_bucket, ray_cluster):
    """Checkpoints go to object storage; a run killed after one (mid-epoch) is rerun and carries on from the
    furthest one."""
    import boto3

    corpus.write_webdataset(str(tmp_path / "in" / "caps.tar"), corpus.caption_samples(20, seed=21))
    synthesize(SynthConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "pairs"),
                           val_fraction=0.2), progress=False)
    out = f"s3://{s3_bucket}/run"
    cmd = [sys.executable, "-m", "jobs.train", "--train", str(tmp_path / "pairs" / "train"),
           "--val", str(tmp_path / "pairs" / "val"), "--output", out, "--epochs", "1", "--batch-size", "8",
           "--cpus-per-worker", "0.5", "--checkpoint-every-steps", "4", "--name", "killed", "--no-use-gpu"]
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(cmd, env=job_env(RAY_ADDRESS=ray_cluster), stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if _checkpoint_states(s3_bucket, "run/ray_train/killed/"):
            time.sleep(0.5)  # let the checkpoint's registration finish
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it could be killed:\n" + \
        log.read_text(errors="replace")[-4000:]
    latest_step = max(s["step"] for s in _checkpoint_states(s3_bucket, "run/ray_train/killed/"))
    assert latest_step >= 4
    time.sleep(2)

    second = subprocess.run(cmd, env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # a quiet terminal: each epoch's line once, no progress bars of Ray's, no warnings of our own loop
    assert second.stdout.count("[train] epoch 1/1 ") == 1
    assert "[train] resumed from the checkpoint at step" in second.stdout
    assert not [line for line in (second.stdout + second.stderr).splitlines()
                if "it/s]" in line or "%|" in line or "UserWarning" in line or "core_worker.cc" in line]
    summary = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="run/train_summary.json")["Body"].read())
    resumed = summary["last_metrics"]["resumed_from_step"]
    assert resumed is not None and resumed >= latest_step  # it continued from a checkpoint, not from step 0
    assert summary["last_metrics"]["step"] == summary["total_steps"]  # and the step counter carried on
    assert [h["epoch"] for h in summary["history"]] == [1]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="run/best/")["Contents"]]
    assert {"run/best/model.safetensors", "run/best/config.json"} <= set(keys)
    assert not any("optimizer" in k for k in keys)  # the exported model, not the training state
    assert model.load(f"{out}/best")[0].config.num_labels == 1
