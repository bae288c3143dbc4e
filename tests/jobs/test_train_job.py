"""`python -m jobs.train` as users run it: configuration errors, and a two-worker run on Ray Train killed after its
first checkpoint that resumes from it when rerun and exports a model that loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import model
from jobs import sample_corpus as corpus
from pipeline.synth import SynthConfig, synthesize
from tests.support.jobs import job_env, run_main


def test_unknown_model_config_fails_fast_naming_the_field(tmp_path, capsys):
    from jobs.train import main

    code, _, err = run_main(main, ["--train", "a", "--val", "b", "--output", "c", "--model-config", "qwen-7b"],
                            capsys)
    assert code == 2 and "field 'model_config'" in err


def _checkpoint_states(bucket: str, prefix: str) -> list[dict]:
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys
            if k.endswith("train_state.json") and "/checkpoint_" in k]


def test_a_killed_two_worker_run_resumes_from_its_checkpoints_on_s3_and_exports_a_loadable_model(
        tmp_path, s3_bucket, ray_cluster):
    """Two CPU workers (gloo) on the 2-CPU local instance, checkpoints in object storage: a run killed after its
    first checkpoint (mid-epoch) is rerun and carries on from the furthest one, and exports a model that loads and
    scores, trained as the released recipe trains (vision tower frozen)."""
    import boto3
    import torch

    from tests.support.images import jpeg_bytes

    corpus.write_webdataset(str(tmp_path / "in" / "caps.tar"), corpus.caption_samples(20, seed=21))
    corpus.write_obelics(str(tmp_path / "docs" / "docs.parquet"), corpus.documents(12, seed=8))
    for name, fmt in (("in", "webdataset"), ("docs", "obelics")):
        synthesize(SynthConfig(input=str(tmp_path / name), format=fmt, output=str(tmp_path / "pairs"),
                               val_fraction=0.25, executor="local"), progress=False)
    out = f"s3://{s3_bucket}/run"
    # Two workers must leave the 2-CPU cluster's data feed a CPU: a cluster reached through RAY_ADDRESS is sized as
    # one that scales (a CPU per worker by default), so say so (the local instance's default: test_training_loop)
    cmd = [sys.executable, "-m", "jobs.train", "--train", str(tmp_path / "pairs" / "train"),
           "--val", str(tmp_path / "pairs" / "val"), "--output", out, "--epochs", "1", "--batch-size", "8",
           "--workers", "2", "--cpus-per-worker", "0.5", "--checkpoint-every-steps", "2", "--name", "killed",
           "--no-use-gpu"]
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(cmd, env=job_env(RAY_ADDRESS=ray_cluster), stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
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
    assert latest_step >= 2
    time.sleep(2)

    second = subprocess.run(cmd, env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # a quiet terminal: each epoch's line once, no progress bars of Ray's, no warnings of our own loop
    assert second.stdout.count("[train] epoch 1/1 ") == 1
    assert "[train] resumed from the checkpoint at step" in second.stdout
    assert not [line for line in (second.stdout + second.stderr).splitlines()
                if "it/s]" in line or "%|" in line or "UserWarning" in line or "core_worker.cc" in line]
    summary = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="run/train_summary.json")["Body"].read())
    assert summary["resources"]["cpus_per_worker"] == 0.5
    resumed = summary["last_metrics"]["resumed_from_step"]
    assert resumed is not None and resumed >= latest_step  # it continued from a checkpoint, not from step 0
    assert summary["last_metrics"]["step"] == summary["total_steps"]  # and the step counter carried on
    assert [h["epoch"] for h in summary["history"]] == [1]
    metrics = summary["best_metrics"]
    assert metrics["val_samples"] > 0 and 0 <= metrics["val_accuracy"] <= 1
    assert {"val_accuracy_caption", "val_accuracy_interleaved", "val_mae", "val_spearman"} <= set(metrics)
    assert metrics["val_accuracy_caption"] is not None and metrics["val_accuracy_interleaved"] is not None
    assert sum(map(sum, metrics["val_confusion"])) == metrics["val_samples"]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="run/best/")["Contents"]]
    assert {"run/best/model.safetensors", "run/best/config.json"} <= set(keys)
    assert not any("optimizer" in k for k in keys)  # the exported model, not the training state
    net, processor = model.load(f"{out}/best")
    assert net.config.num_labels == 1
    scored = net.score(**processor([{"texts": [None, "two red circles at the left"], "images": [jpeg_bytes(), None],
                                     "kind": "caption"}]))
    assert scored["score"].shape == (1,) and torch.isfinite(scored["score"]).all()
    base_weights = model.load(f"{out}/_base")[0].state_dict()
    trained = net.state_dict()
    assert not torch.equal(base_weights["llm.layers.0.mlp.up_proj.weight"], trained["llm.layers.0.mlp.up_proj.weight"])
    # the released recipe: the vision tower is frozen
    assert torch.equal(base_weights["vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       trained["vision_tower.encoder.layers.0.mlp.fc1.weight"])
