"""The training driver: check the pairs and the base model, fit the workers and their data feed into the cluster,
run Ray Train under a no-progress watchdog, export the best checkpoint, write the summary."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import ray

from model.checkpoint import load_processor
from model.create import create
from model.weights import export_checkpoint
from pipeline.errors import CheckpointError, InputError, TrainingStalled
from pipeline.io.publish import write_json
from pipeline.io.uris import filesystem_for, join, storage_env
from pipeline.runner.resources import current_view, use_gpu
from pipeline.training.config import TrainConfig
from pipeline.training.data import ENCODE_TASK_CPUS, encoded, read_pairs
from pipeline.training.preflight import SUMMARY_NAME
from pipeline.training.state import STATE_NAME
from pipeline.training.worker import train_loop


def _base_checkpoint(config: TrainConfig) -> str:
    """The checkpoint every worker and encoder starts from: `--init`, or a new model written once to
    OUTPUT/_base (deterministic for a seed, so a rerun reuses it)."""
    if config.init:
        return config.init
    base = join(config.output, "_base")
    fs, path = filesystem_for(base)
    if fs.get_file_info(f"{path}/config.json").type.name != "File":
        create(config.architecture, base, num_labels=config.num_labels or 1, seed=config.seed)
    return base


def fit_workers(config: TrainConfig, cluster_cpus: float, local: bool) -> float:
    """CPUs per worker such that the workers and their data feed fit the cluster. On the local embedded cluster
    the default shrinks to leave `feed_cpus` for the feed (two workers on two CPUs would otherwise hold both and
    the feed, never scheduled, would hang the run); an explicit setting that cannot fit fails here."""
    need_feed = max(config.feed_cpus, ENCODE_TASK_CPUS)
    if config.cpus_per_worker is not None:
        if local and config.workers * config.cpus_per_worker + need_feed > cluster_cpus + 1e-9:
            raise InputError("cpus_per_worker", f"{config.workers} workers x {config.cpus_per_worker} CPUs plus "
                                                f"{need_feed} for the data feed exceed this machine's "
                                                f"{cluster_cpus:g} CPUs; lower workers or cpus_per_worker")
        return config.cpus_per_worker
    if not local:
        return 1.0  # a cluster scales its CPU nodes: the feed gets its own
    per_worker = min(1.0, (cluster_cpus - need_feed) / config.workers)
    if per_worker < 0.1:
        raise InputError("workers", f"{config.workers} workers do not fit in this machine's {cluster_cpus:g} CPUs "
                                    f"with {need_feed} kept for the data feed; lower workers")
    return math.floor(per_worker * 100) / 100


@ray.remote(num_cpus=0)
class ProgressBeacon:
    """Where training workers report progress (steps for the watchdog, epoch lines for the terminal); the driver
    reads it, so the terminal shows the workers' own lines without Ray's log forwarding."""

    def __init__(self):
        self.at = time.time()
        self.step = None
        self.lines = []

    def beat(self, step: int) -> None:
        self.at, self.step = time.time(), step

    def say(self, line: str) -> None:
        self.lines.append(line)

    def last(self) -> tuple[float, int | None, list[str]]:
        lines, self.lines = self.lines, []
        return self.at, self.step, lines


class Watchdog:
    """Ends a run that makes no progress: `check()` raises TrainingStalled once the last beat is too old."""

    def __init__(self, last_beat, timeout_s: float, clock=time.time):
        self.last_beat = last_beat
        self.timeout_s = timeout_s
        self.clock = clock
        self.started = clock()

    def check(self) -> None:
        at, step = self.last_beat()[:2]
        at = max(at, self.started)
        idle = self.clock() - at
        if idle > self.timeout_s:
            where = "before the first training step" if step is None else f"after step {step}"
            raise TrainingStalled(
                f"no training progress for {idle:.0f} s ({where}); stopped it. Common causes: workers waiting for "
                "resources the cluster cannot give (GPU nodes, CPUs for the data feed: see workers, "
                "cpus_per_worker, feed_cpus), or a stalled data source. Raise no_progress_timeout_s if the "
                "cluster only needs longer to start")


def _fit_with_watchdog(trainer, beacon, timeout_s: float):
    """`trainer.fit()` with a watchdog thread beside it. On a stall the watchdog interrupts the run the way Ctrl-C
    does (Ray Train's own SIGINT handler aborts the controller gracefully) and the driver raises TrainingStalled."""
    done, stalled = threading.Event(), []

    def last_beat():
        at, step, lines = ray.get(beacon.last.remote())
        for line in lines:  # the workers' epoch lines, printed here on the driver
            print(line, flush=True)
        return at, step

    def watch() -> None:
        watchdog = Watchdog(last_beat, timeout_s)
        while not done.wait(2.0):
            try:
                watchdog.check()
            except TrainingStalled as err:
                stalled.append(err)
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=watch, name="train-watchdog", daemon=True)
    thread.start()
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit, Exception):
        if stalled:
            raise stalled[0] from None
        raise
    finally:
        done.set()
    if stalled:
        raise stalled[0]
    last_beat()  # the lines of the last epoch
    return result


def train_classifier(config: TrainConfig, sources: dict[str, str] | None = None) -> dict:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.time()
    # The pairs first: a missing or empty train/val fails before anything is written.
    train_raw, val_raw = read_pairs(config.train, "train"), read_pairs(config.val, "val")
    n_train = train_raw.count()
    if n_train == 0:
        raise InputError("train", f"no training pairs at {config.train}")
    if val_raw.count() == 0:  # checkpoints are ranked by validation accuracy: without pairs there is no ranking
        raise InputError("val", f"no validation pairs at {config.val} (jobs.synth's --val-fraction sets how many "
                                "origins it holds out)")
    view = current_view()
    gpu = use_gpu(config.use_gpu, (sources or {}).get("use_gpu", "default"), view)
    cpus_per_worker = fit_workers(config, view.cpus or 1, not view.remote)
    base = _base_checkpoint(config)
    try:
        base_labels = load_processor(base)[0].config.num_labels  # config and tokenizer only: fails fast
    except CheckpointError as err:
        raise InputError("init", str(err)) from None
    if config.num_labels and base_labels != config.num_labels:
        raise InputError("num_labels", f"{config.num_labels} does not match the --init checkpoint's head "
                                       f"({base_labels} outputs)")
    per_step = config.batch_size * config.workers * config.grad_accum
    total_steps = config.epochs * math.ceil(n_train / per_step)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    datasets = {"train": encoded(train_raw.randomize_block_order(seed=config.seed), base),
                "val": encoded(val_raw, base)}

    storage_fs, storage_path = filesystem_for(config.storage_uri)
    run_config = RunConfig(
        name=config.name, storage_path=storage_path, storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep, checkpoint_score_attribute="val_accuracy",
                                           checkpoint_score_order="max"),
    )
    env = storage_env()
    if env:
        run_config.worker_runtime_env = {"env_vars": env}
    beacon_name = f"unifilter-train-progress-{uuid.uuid4().hex[:8]}"
    beacon = ProgressBeacon.options(name=beacon_name).remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(by_alias=True), "base": base, "total_steps": total_steps,
                           "heartbeat": beacon_name},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=gpu.value,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        datasets=datasets, run_config=run_config,
        # One worker reads the pairs itself: a streaming split would start a coordinator actor per dataset (seconds
        # of start-up each) to hand everything to that one worker.
        dataset_config=DataConfig(datasets_to_split="all" if config.workers > 1 else []),
    )
    result = _fit_with_watchdog(trainer, beacon, config.no_progress_timeout_s)
    if result.error:
        raise result.error

    best, best_metrics = max(((c, m) for c, m in result.best_checkpoints if m.get("val_accuracy", -1) >= 0),
                             key=lambda cm: cm[1]["val_accuracy"], default=(result.checkpoint, result.metrics))
    best_uri = join(config.output, "best")
    with best.as_directory() as d:
        export_checkpoint(d, best_uri)  # the model's files, config.json last; not the optimizer state
    with result.checkpoint.as_directory() as d:  # the latest checkpoint holds the whole history
        history = json.loads((Path(d) / STATE_NAME).read_text())["history"]
    summary = {
        "train": config.train, "val": config.val, "output": config.output, "best": best_uri,
        "base": base, "name": config.name, "storage": config.storage_uri,
        "train_pairs": n_train, "epochs": config.epochs, "total_steps": total_steps,
        "resources": {"workers": config.workers, "cpus_per_worker": cpus_per_worker, "use_gpu": gpu.value},
        "resources_why": {"use_gpu": gpu.why},
        "best_metrics": {k: v for k, v in best_metrics.items() if not k.startswith("_")},
        "last_metrics": {k: v for k, v in result.metrics.items() if not k.startswith("_")},
        "history": history, "elapsed_s": round(time.time() - start, 2),
    }
    write_json(join(config.output, SUMMARY_NAME), summary)
    return summary
