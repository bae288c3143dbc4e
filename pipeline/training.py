"""Classifier training on Ray Train (V2): `train_classifier(TrainConfig)` is what `python -m jobs.train` calls.

Pairs arrive as Ray Datasets, encoded on CPU actors by the same processor the scorer uses. The default is the
released recipe: vision tower frozen; projector, LLM and score head trained; one regression output with MSE
(4-way cross-entropy as an option); AdamW with a cosine schedule and warmup; gradient accumulation; bf16 autocast
and optional gradient checkpointing on GPU. `stage: projector` trains the projector alone (LLaVA's stage 1).
Each epoch validates (accuracy per kind and level, MAE, Spearman, confusion matrix) and reports a checkpoint; the
best by validation accuracy is exported to `OUTPUT/best/`, a checkpoint `jobs.score --model` loads directly.
Rerunning with the same `name` and storage resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from model.config import NUM_LEVELS
from pipeline.preprocess import ENCODED_SCHEMA, decode_encoded, encode_row
from pipeline.manifest import write_json
from pipeline.storage import (
    InputError,
    filesystem_for,
    is_remote,
    join,
    list_shards,
    storage_env,
    to_uri,
    upload_file,
)

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_TRAIN_COLUMNS = ["id", "kind", "texts", "images", "label"]
_ENCODED_PAIR_SCHEMA = pa.schema([f for f in ENCODED_SCHEMA if f.name not in ("source", "ordinal")]).append(
    pa.field("label", pa.int8()))


class TrainConfig(BaseModel):
    """`python -m jobs.train`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    train: str = Field(description="training pairs: a directory or s3:// prefix of Parquet (jobs.synth's train/)")
    val: str = Field(description="validation pairs (jobs.synth's val/)")
    output: str = Field(description="where best/ and the summary go (a directory or s3:// prefix)")
    architecture: Literal["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"] = Field(
        "tiny", alias="model_config", description="named config for a new model (ignored with --init)")
    init: str | None = Field(None, description="start from this checkpoint (dir, s3:// or hub id; LLaVA-style too)")
    num_labels: Literal[1, 4] | None = Field(None, description="1: regression + MSE (default); 4: cross-entropy")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1, description="samples per worker per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default 1e-3 for tiny, 2e-5 otherwise)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    stage: Literal["full", "projector"] = Field("full", description="full: projector + LLM + head; projector: stage 1")
    train_vision: bool = Field(False, description="also train the vision tower (for a tower that is not pretrained, "
                                                  "e.g. a tiny model from scratch; the released recipe freezes it)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory in the LLM (GPU)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU")
    seed: int = Field(0)
    name: str = Field("unifilter", description="run name: rerun with the same name and storage to resume")
    storage: str | None = Field(None, description="Ray Train storage for checkpoints (default OUTPUT/ray_train)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept (the best by validation accuracy)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    shuffle_buffer: int = Field(256, ge=0, description="local shuffle buffer of training samples")

    @model_validator(mode="after")
    def _stage_needs(self) -> TrainConfig:
        if self.gradient_checkpointing and self.stage == "projector":
            raise ValueError("field 'gradient_checkpointing' has no effect with stage 'projector' (the LLM is frozen)")
        return self

    @property
    def storage_uri(self) -> str:
        return self.storage or join(self.output, "ray_train")

    @property
    def peak_lr(self) -> float:
        return self.lr or (1e-3 if self.architecture == "tiny" and not self.init else 2e-5)


# -- data --------------------------------------------------------------------------------------------------------
_PROCESSORS: dict = {}  # per worker process: the processor loads once, not once per batch


def encode_pairs(batch: pa.Table, model_uri: str) -> pa.Table:
    """Ray Data task, fused with the Parquet read: pairs -> encoded rows (the scorer's processor), keeping the
    label; a pair the processor rejects keeps its reason in `error` and is skipped by the training loop. (Tasks
    rather than an actor pool: a pool would hold CPUs the training workers' data feed needs.)"""
    from model.checkpoint import load_processor

    if model_uri not in _PROCESSORS:
        _PROCESSORS[model_uri] = load_processor(model_uri)[0]
    processor = _PROCESSORS[model_uri]
    rows = []
    for row in batch.to_pylist():
        encoded = encode_row({**row, "source": None, "ordinal": 0, "error": None}, processor)
        encoded["label"] = row["label"]
        rows.append(encoded)
    return pa.Table.from_pylist(rows, schema=_ENCODED_PAIR_SCHEMA)


def _read_pairs(uri: str, field: str) -> ray.data.Dataset:
    """The pairs under `uri` (jobs.synth's train/ or val/); `InputError` naming `field` when there are none."""
    files = [s.uri for s in list_shards(uri, "parquet", field=field).shards]
    fs, _ = filesystem_for(uri)  # one filesystem for all files; their paths without the scheme
    return ray.data.read_parquet([filesystem_for(f)[1] for f in files], filesystem=fs).select_columns(_TRAIN_COLUMNS)


def _encoded(ds: ray.data.Dataset, base_uri: str) -> ray.data.Dataset:
    return ds.map_batches(encode_pairs, fn_kwargs={"model_uri": base_uri}, batch_size=32, batch_format="pyarrow")


# -- metrics -----------------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0  # ties share their average rank
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def validation_metrics(scores, predicted, labels, kinds) -> dict:
    """Accuracy overall, per kind and per level; MAE of the score; Spearman of score vs level; confusion matrix
    (rows: true level, columns: predicted level)."""
    scores, predicted, labels = np.asarray(scores, float), np.asarray(predicted, int), np.asarray(labels, int)
    kinds = np.asarray(kinds)
    metrics = {"val_samples": int(len(labels))}
    if not len(labels):
        return {**metrics, "val_accuracy": -1.0}
    correct = predicted == labels
    metrics["val_accuracy"] = float(correct.mean())
    for kind in ("caption", "interleaved"):
        mask = kinds == kind
        metrics[f"val_accuracy_{kind}"] = float(correct[mask].mean()) if mask.any() else None
        metrics[f"val_spearman_{kind}"] = spearman(scores[mask], labels[mask]) if mask.sum() > 1 else None
    for level in range(NUM_LEVELS):
        mask = labels == level
        metrics[f"val_accuracy_level_{level}"] = float(correct[mask].mean()) if mask.any() else None
    metrics["val_mae"] = float(np.abs(scores - labels).mean())
    metrics["val_spearman"] = spearman(scores, labels)
    confusion = np.zeros((NUM_LEVELS, NUM_LEVELS), dtype=int)
    np.add.at(confusion, (labels.clip(0, NUM_LEVELS - 1), predicted.clip(0, NUM_LEVELS - 1)), 1)
    metrics["val_confusion"] = confusion.tolist()
    return metrics


def format_epoch(m: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return (f"[train] epoch {m['epoch']}/{m['epochs']} · step {m['step']} · train loss {m['train_loss']:.4f} · "
            f"train acc {pct(m['train_accuracy'])} · val acc {pct(m['val_accuracy'])} (caption "
            f"{pct(m.get('val_accuracy_caption'))}, interleaved {pct(m.get('val_accuracy_interleaved'))}) · "
            f"MAE {m.get('val_mae', float('nan')):.3f} · Spearman {m.get('val_spearman', float('nan')):.3f} · "
            f"{m['samples_per_s']:.1f} samples/s")


# -- checkpoints of the training state (safetensors + JSON: nothing is pickled) ----------------------------------
def _save_train_state(directory: Path, optimizer, scheduler, state: dict) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "train_state.json").write_text(json.dumps({
        **state, "param_groups": sd["param_groups"], "optimizer_scalars": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }, default=float))


def _load_train_state(directory: Path, optimizer, scheduler) -> dict:
    meta = json.loads((directory / "train_state.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return meta


def latest_checkpoint(storage_uri: str, name: str) -> tuple[str, dict] | None:
    """The furthest-trained complete checkpoint of a run in its storage: (URI, train state). Complete means its
    model, optimizer state and train_state.json (written last) are all there. This finds a checkpoint whose
    upload finished even if the run was killed before Ray Train recorded it."""
    import pyarrow.fs as pafs

    fs, root = filesystem_for(join(storage_uri, name))
    best = None
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(info.path))}
        if not {"config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"} <= names:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/train_state.json") as f:
                state = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if best is None or state["step"] > best[1]["step"]:
            best = (to_uri(storage_uri, info.path), state)
    return best


# -- the per-worker loop -----------------------------------------------------------------------------------------
def train_loop(loop: dict) -> None:
    import torch.distributed as dist
    from ray.train import Checkpoint, get_checkpoint, get_context, get_dataset_shard, report
    from ray.train.torch import get_device, prepare_model

    import model as unifilter
    from model.checkpoint import load_state, read_weights

    cfg = TrainConfig.model_validate(loop["config"])
    torch.manual_seed(cfg.seed)
    ctx = get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    net, processor = unifilter.load(loop["base"], device="cpu")
    net.model_id = loop["base"]

    # What trains: the released recipe freezes the vision tower; stage 1 trains the projector alone.
    for p in net.vision_tower.parameters():
        p.requires_grad = cfg.train_vision and cfg.stage == "full"
    if cfg.stage == "projector":
        for p in [*net.llm.parameters(), *net.score_head.parameters()]:
            p.requires_grad = False
    if cfg.gradient_checkpointing:
        net.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    total, warmup = loop["total_steps"], max(1, int(loop["total_steps"] * cfg.warmup_ratio))

    def schedule(step: int) -> float:  # linear warmup, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start_epoch, step, skip_batches, history, resumed_from = 0, 0, 0, [], None
    found = latest_checkpoint(cfg.storage_uri, cfg.name)
    checkpoint = get_checkpoint()
    if found:  # the furthest one in storage, recorded by Ray Train or not
        found_fs, found_path = filesystem_for(found[0])
        checkpoint = Checkpoint(found_path, filesystem=found_fs)
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_state(net, read_weights(Path(d)), source=str(d))
            meta = _load_train_state(Path(d), optimizer, scheduler)
        start_epoch, step, skip_batches, history = meta["epoch"], meta["step"], meta["batches_into_epoch"], meta["history"]
        resumed_from = step
        if rank == 0:
            print(f"[train] resumed from the checkpoint at step {step} (epoch {start_epoch + 1}, "
                  f"{skip_batches} batches in)", flush=True)

    model = prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else net.to(device)
    inner = model.module if hasattr(model, "module") else model
    autocast = (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"))
    size = processor.config.image_size

    def forward(batch: pa.Table):
        rows = batch.to_pylist()
        encoded = [decode_encoded(r, size) for r in rows]
        inputs = processor.collate(encoded)
        labels = torch.tensor([r["label"] for r in rows], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                           inputs["pixel_values"].to(device))
        logits = logits.float()
        if inner.config.num_labels == 1:
            loss = torch.nn.functional.mse_loss(logits[:, 0], labels.float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels.long())
        return loss, logits, labels, [r["kind"] for r in rows]

    def predictions(logits):
        from model.modeling import scores_from_logits

        out = scores_from_logits(logits.detach())
        return out["score"].cpu().numpy(), out["label"].cpu().numpy().astype(int)

    def save_checkpoint(directory: Path, epoch: int, batches_into_epoch: int) -> None:
        unifilter.save(inner, processor.tokenizer, str(directory))
        _save_train_state(directory, optimizer, scheduler, {"epoch": epoch, "step": step,
                                                            "batches_into_epoch": batches_into_epoch,
                                                            "history": history})

    def report_with_checkpoint(metrics: dict, epoch: int, batches_into_epoch: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(tmp), epoch, batches_into_epoch)
                ckpt = Checkpoint.from_directory(tmp)
            report(metrics, checkpoint=ckpt)

    train_shard, val_shard = get_dataset_shard("train"), get_dataset_shard("val")
    done = False
    last_val = history[-1]["val_accuracy"] if history else -1.0
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, seen, loss_sum, correct, batches = time.time(), 0, 0.0, 0, 0
        optimizer.zero_grad(set_to_none=True)
        for batch in train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                              local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed + epoch):
            batch = batch.filter(pa.compute.is_null(batch.column("error")))
            batches += 1
            if batches <= skip_batches:
                continue  # resumed mid-epoch: these batches were trained before the checkpoint
            if batch.num_rows == 0:
                continue
            loss, logits, labels, _ = forward(batch)
            (loss / cfg.grad_accum).backward()
            _, predicted = predictions(logits)
            correct += int((predicted == labels.cpu().numpy()).sum())
            seen += batch.num_rows
            loss_sum += float(loss) * batch.num_rows
            if batches % cfg.grad_accum == 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                    report_with_checkpoint({"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen, 1),
                                            "val_accuracy": last_val}, epoch, batches)
                if cfg.max_steps and step >= cfg.max_steps:
                    done = True
                    break
        skip_batches = 0
        elapsed = time.time() - started

        # Validation on every worker's shard, gathered so rank 0 sees all of it.
        model.eval()
        scores, predicted_all, labels_all, kinds_all, val_loss, n_val = [], [], [], [], 0.0, 0
        with torch.no_grad():
            for batch in val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"):
                batch = batch.filter(pa.compute.is_null(batch.column("error")))
                if batch.num_rows == 0:
                    continue
                loss, logits, labels, kinds = forward(batch)
                s, p = predictions(logits)
                scores += s.tolist()
                predicted_all += p.tolist()
                labels_all += labels.cpu().tolist()
                kinds_all += kinds
                val_loss += float(loss) * batch.num_rows
                n_val += batch.num_rows
        local = {"scores": scores, "predicted": predicted_all, "labels": labels_all, "kinds": kinds_all,
                 "val_loss": val_loss, "n_val": n_val, "train": (seen, loss_sum, correct)}
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        merged = {k: sum((g[k] for g in gathered), []) for k in ("scores", "predicted", "labels", "kinds")}
        n_train = sum(g["train"][0] for g in gathered)
        metrics = validation_metrics(merged["scores"], merged["predicted"], merged["labels"], merged["kinds"])
        metrics.update(
            epoch=epoch + 1, epochs=cfg.epochs, step=step, resumed_from_step=resumed_from,
            train_loss=sum(g["train"][1] for g in gathered) / max(n_train, 1),
            train_accuracy=sum(g["train"][2] for g in gathered) / max(n_train, 1) if n_train else None,
            val_loss=sum(g["val_loss"] for g in gathered) / max(sum(g["n_val"] for g in gathered), 1),
            samples_per_s=n_train / max(elapsed, 1e-9), lr=scheduler.get_last_lr()[0],
        )
        last_val = metrics["val_accuracy"]
        history.append({k: v for k, v in metrics.items() if k != "val_confusion"})
        if rank == 0:
            print(format_epoch(metrics), flush=True)
        report_with_checkpoint(metrics, epoch + 1, 0)
        if done:
            break


# -- the driver --------------------------------------------------------------------------------------------------
def _base_checkpoint(config: TrainConfig) -> str:
    """The checkpoint every worker and encoder starts from: `--init`, or a new model written once to
    OUTPUT/_base (deterministic for a seed, so a rerun reuses it)."""
    if config.init:
        return config.init
    from model.create import create

    base = join(config.output, "_base")
    fs, path = filesystem_for(base)
    if fs.get_file_info(f"{path}/config.json").type.name != "File":
        create(config.architecture, base, num_labels=config.num_labels or 1, seed=config.seed)
    return base


def train_classifier(config: TrainConfig) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from model.checkpoint import CheckpointError, load_processor

    start = time.time()
    # The pairs first: a missing or empty train/val fails before anything is written.
    train_raw, val_raw = _read_pairs(config.train, "train"), _read_pairs(config.val, "val")
    n_train = train_raw.count()
    if n_train == 0:
        raise InputError("train", f"no training pairs at {config.train}")
    if val_raw.count() == 0:  # checkpoints are ranked by validation accuracy: without pairs there is no ranking
        raise InputError("val", f"no validation pairs at {config.val} (jobs.synth's --val-fraction sets how many "
                                "origins it holds out)")
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
    datasets = {"train": _encoded(train_raw.randomize_block_order(seed=config.seed), base),
                "val": _encoded(val_raw, base)}

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
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(by_alias=True), "base": base, "total_steps": total_steps},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        datasets=datasets, run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error

    best, best_metrics = max(((c, m) for c, m in result.best_checkpoints if m.get("val_accuracy", -1) >= 0),
                             key=lambda cm: cm[1]["val_accuracy"], default=(result.checkpoint, result.metrics))
    best_uri = join(config.output, "best")
    with best.as_directory() as d:
        _export_model(Path(d), best_uri)
    with result.checkpoint.as_directory() as d:  # the latest checkpoint holds the whole history
        history = json.loads((Path(d) / "train_state.json").read_text())["history"]
    summary = {
        "train": config.train, "val": config.val, "output": config.output, "best": best_uri,
        "base": base, "name": config.name, "storage": config.storage_uri,
        "train_pairs": n_train, "epochs": config.epochs, "total_steps": total_steps,
        "best_metrics": {k: v for k, v in best_metrics.items() if not k.startswith("_")},
        "last_metrics": {k: v for k, v in result.metrics.items() if not k.startswith("_")},
        "history": history, "elapsed_s": round(time.time() - start, 2),
    }
    write_json(join(config.output, "train_summary.json"), summary)
    return summary


def _export_model(directory: Path, uri: str) -> None:
    """Copy the model files of a training checkpoint (not the optimizer state) to a loadable checkpoint."""
    files = [directory / f for f in MODEL_FILES if (directory / f).is_file()]
    if is_remote(uri):
        for f in sorted(files, key=lambda p: p.name == "config.json"):  # config.json last
            upload_file(f, join(uri, f.name))
    else:
        target = Path(uri)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)


def format_summary(summary: dict) -> str:
    m = summary["best_metrics"]
    lines = [
        f"UniFilter training: {summary['train']} -> {summary['best']}",
        f"  pairs      {summary['train_pairs']} training · {summary['epochs']} epochs · {summary['total_steps']} steps"
        f" · {summary['elapsed_s']} s",
        f"  best       epoch {m.get('epoch')} · val acc {m.get('val_accuracy'):.3f} · MAE {m.get('val_mae', float('nan')):.3f}"
        f" · Spearman {m.get('val_spearman', float('nan')):.3f}",
    ]
    for kind in ("caption", "interleaved"):
        if m.get(f"val_accuracy_{kind}") is not None:
            lines.append(f"  {kind:10s} val acc {m[f'val_accuracy_{kind}']:.3f} · Spearman "
                         f"{m.get(f'val_spearman_{kind}') or float('nan'):.3f}")
    levels = [m.get(f"val_accuracy_level_{lv}") for lv in range(NUM_LEVELS)]
    lines.append("  per level  " + " · ".join(f"L{lv} {'n/a' if a is None else f'{a:.3f}'}" for lv, a in enumerate(levels)))
    if m.get("val_confusion"):
        lines.append("  confusion  (rows: true level, columns: predicted) " + json.dumps(m["val_confusion"]))
    lines.append(f"  score it:  python -m jobs.score --model {summary['best']} ...")
    return "\n".join(lines)
