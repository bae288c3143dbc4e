"""The Ray Train worker function: a `TrainLoop` wired to Ray Train (device, DDP, dataset shards, checkpoint reports,
metrics gathered across workers) and to the driver's progress watchdog (heartbeats)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.io.uris import filesystem_for
from pipeline.training.config import TrainConfig
from pipeline.training.loop import TrainLoop, save_to_temp
from pipeline.training.metrics import format_epoch, validation_metrics
from pipeline.training.state import latest_checkpoint

HEARTBEAT_EVERY_S = 5.0


class _Heartbeat:
    """Fire-and-forget progress beats to the driver's watchdog actor, at most one every few seconds."""

    def __init__(self, name: str | None):
        import ray

        self.actor = ray.get_actor(name) if name else None
        self.last = 0.0

    def __call__(self, step: int, force: bool = False) -> None:
        now = time.time()
        if self.actor is not None and (force or now - self.last >= HEARTBEAT_EVERY_S):
            self.actor.beat.remote(step)
            self.last = now

    def say(self, line: str) -> None:
        """A line for the terminal, printed by the driver (or here, when there is no driver to read it)."""
        if self.actor is not None:
            self.actor.say.remote(line)
        else:
            print(line, flush=True)


def _resume_point(cfg: TrainConfig):
    """The furthest checkpoint in storage (recorded by Ray Train or not), else Ray Train's own."""
    from ray.train import Checkpoint, get_checkpoint

    found = latest_checkpoint(cfg.storage_uri, cfg.name)
    if found:
        fs, path = filesystem_for(found[0])
        return Checkpoint(path, filesystem=fs)
    return get_checkpoint()


def _gather(local: dict, world: int) -> list[dict]:
    if world == 1:
        return [local]
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered


def train_loop(loop_config: dict) -> None:
    from ray.train import Checkpoint, get_context, get_dataset_shard, report
    from ray.train.torch import get_device, prepare_model

    cfg = TrainConfig.model_validate(loop_config["config"])
    torch.manual_seed(cfg.seed)
    ctx = get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    beat = _Heartbeat(loop_config.get("heartbeat"))
    # Every trainable parameter takes part in every step (no unused-parameter search); the buffers (rotary
    # frequencies, position ids) are constants, and broadcasting them in each forward would add a collective that
    # workers with different micro-batch counts would not match.
    wrap = (lambda net: prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": False,
                                                                     "broadcast_buffers": False})) \
        if world > 1 else None
    loop = TrainLoop(cfg, loop_config["base"], loop_config["total_steps"], device=get_device(), wrap=wrap)
    checkpoint = _resume_point(cfg)
    if checkpoint:
        with checkpoint.as_directory() as d:
            loop.setup(Path(d))
        if rank == 0:
            beat.say(f"[train] resumed from the checkpoint at step {loop.step} (epoch {loop.epoch + 1}, "
                     f"{loop.skip_batches} batches in)")
    else:
        loop.setup(None)
    beat(loop.step, force=True)

    def report_with_checkpoint(metrics: dict, batches_into_epoch: int) -> None:
        with save_to_temp(loop, batches_into_epoch, rank) as tmp:
            report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)

    last_val = loop.history[-1]["val_accuracy"] if loop.history else -1.0

    def on_step(current: TrainLoop) -> None:
        beat(current.step)
        if cfg.checkpoint_every_steps and current.step % cfg.checkpoint_every_steps == 0:
            report_with_checkpoint({"epoch": current.epoch, "step": current.step, "val_accuracy": last_val,
                                    "train_loss": None}, current.batches_into_epoch)

    train_shard, val_shard = get_dataset_shard("train"), get_dataset_shard("val")
    for epoch in range(loop.epoch, cfg.epochs):
        loop.epoch = epoch
        stats = loop.train_epoch(
            train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                     local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                     local_shuffle_seed=cfg.seed + epoch),
            on_step=on_step)
        beat(loop.step, force=True)
        local = loop.validate(val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"))
        local["train"] = (stats["seen"], stats["loss_sum"], stats["correct"])
        gathered = _gather(local, world)
        merged = {k: sum((g[k] for g in gathered), []) for k in ("scores", "predicted", "labels", "kinds")}
        n_train = sum(g["train"][0] for g in gathered)
        metrics = validation_metrics(merged["scores"], merged["predicted"], merged["labels"], merged["kinds"])
        metrics.update(
            epoch=epoch + 1, epochs=cfg.epochs, step=loop.step, resumed_from_step=loop.resumed_from,
            train_loss=sum(g["train"][1] for g in gathered) / max(n_train, 1),
            train_accuracy=sum(g["train"][2] for g in gathered) / max(n_train, 1) if n_train else None,
            val_loss=sum(g["val_loss"] for g in gathered) / max(sum(g["n_val"] for g in gathered), 1),
            samples_per_s=n_train / max(stats["elapsed"], 1e-9), lr=loop.scheduler.get_last_lr()[0],
        )
        last_val = metrics["val_accuracy"]
        loop.history.append({k: v for k, v in metrics.items() if k != "val_confusion"})
        loop.epoch = epoch + 1
        if rank == 0:
            beat.say(format_epoch(metrics))
        report_with_checkpoint(metrics, 0)
        beat(loop.step, force=True)
        if loop.done:
            break
