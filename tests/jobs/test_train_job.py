"""`python -m jobs.train` as users run it: configuration errors, and a run killed after its first checkpoint that
resumes from it when rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import model
from pipeline import corpus
from pipeline.synth import SynthConfig, synthesize
from tests.conftest import job_env


def test_unknown_model_config_fails_fast_naming_the_field(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--train", "a", "--val", "b", "--output", "c",
                          "--model-config", "qwen-7b"], env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "field 'model_config'" in res.stderr


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, ray_cluster):
    corpus.write_webdataset(str(tmp_path / "in" / "caps.tar"), corpus.caption_samples(20, seed=21))
    synthesize(SynthConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "pairs"),
                           val_fraction=0.2), progress=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.train", "--train", str(tmp_path / "pairs" / "train"),
           "--val", str(tmp_path / "pairs" / "val"), "--output", str(out), "--epochs", "2", "--batch-size", "8",
           "--cpus-per-worker", "0.5", "--checkpoint-every-steps", "4", "--name", "killed"]
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(cmd, env=job_env(RAY_ADDRESS=ray_cluster), stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if list((out / "ray_train" / "killed").glob("checkpoint_*/train_state.json")):
            time.sleep(0.5)  # let the checkpoint's registration finish
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it could be killed:\n" + \
        log.read_text(errors="replace")[-4000:]
    states = [json.loads(p.read_text()) for p in (out / "ray_train" / "killed").glob("checkpoint_*/train_state.json")]
    latest_step = max(s["step"] for s in states)
    assert latest_step >= 4
    time.sleep(2)

    second = subprocess.run(cmd, env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    resumed = summary["last_metrics"]["resumed_from_step"]
    assert resumed is not None and resumed >= latest_step  # it continued from a checkpoint, not from step 0
    assert summary["last_metrics"]["step"] == summary["total_steps"]  # and the step counter carried on
    assert [h["epoch"] for h in summary["history"]][-1] == 2
    assert model.load(str(out / "best"))[0].config.num_labels == 1
