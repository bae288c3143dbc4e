"""One worker's training loop: `setup` (the model on its device and in its dtype, then the optimizer, then the
resumed state), `train_epoch`, `validate`, `save`. No Ray in the class: `train_loop` at the bottom wires it to Ray
Train (device, DDP, dataset shards, checkpoint reports) and tests drive it directly.

Order matters on a GPU: optimizer state is restored only after the model is on its device (and wrapped), so
`Optimizer.load_state_dict` casts it to each parameter's device and dtype; restored before the move, the first
`step()` after a resume would mix devices.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

import model as unifilter
from model.checkpoint import load_state, read_weights
from model.modeling import scores_from_logits
from pipeline.encoded import decode_encoded, token_budget_batches
from pipeline.training.config import TrainConfig
from pipeline.training.state import load_train_state, save_train_state


class TrainLoop:
    def __init__(self, cfg: TrainConfig, base_uri: str, total_steps: int, device: torch.device | str = "cpu",
                 param_dtype: torch.dtype | None = None, wrap: Callable | None = None):
        self.cfg = cfg
        self.base_uri = base_uri
        self.total_steps = total_steps
        self.device = torch.device(device)
        self.param_dtype = param_dtype  # None: float32 weights (bf16 autocast on GPU does the rest)
        self.wrap = wrap  # e.g. Ray Train's prepare_model (DDP) for more than one worker
        self.epoch = self.step = self.skip_batches = 0
        self.history: list[dict] = []
        self.resumed_from: int | None = None
        self.on_gpu = self.device.type == "cuda"
        self.autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and self.on_gpu)
        self.token_budget = cfg.micro_token_budget(self.on_gpu)
        self._spare = None  # the last micro-batch seen: a stand-in for a batch left empty

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, checkpoint_dir: Path | None = None) -> TrainLoop:
        cfg = self.cfg
        net, self.processor = unifilter.load(self.base_uri, device="cpu")
        net.model_id = self.base_uri
        if checkpoint_dir is not None:
            load_state(net, read_weights(Path(checkpoint_dir)), source=str(checkpoint_dir))
        # What trains: the released recipe freezes the vision tower; stage 1 trains the projector alone.
        for p in net.vision_tower.parameters():
            p.requires_grad = cfg.train_vision and cfg.stage == "full"
        if cfg.stage == "projector":
            for p in [*net.llm.parameters(), *net.score_head.parameters()]:
                p.requires_grad = False
        if cfg.checkpointing_on(self.on_gpu):
            net.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.to(device=self.device, dtype=self.param_dtype) if self.param_dtype else net.to(device=self.device)
        self.net = net
        self.model = self.wrap(net) if self.wrap else net
        trainable = [p for p in net.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        total, warmup = self.total_steps, max(1, int(self.total_steps * cfg.warmup_ratio))

        def schedule(step: int) -> float:  # linear warmup, then cosine decay to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        if checkpoint_dir is not None:  # after the move: the state follows the parameters' device and dtype
            meta = load_train_state(Path(checkpoint_dir), self.optimizer, self.scheduler)
            self.epoch = meta["epoch"]
            self.step = meta["step"]
            self.skip_batches = meta["batches_into_epoch"]
            self.history = meta["history"]
            self.resumed_from = meta["step"]
        return self

    # -- one forward over a batch, split into token-budget micro-batches ---------------------------------------
    def _micro_batches(self, batch: pa.Table):
        rows = batch.to_pylist()
        size = self.processor.config.image_size
        encoded = [decode_encoded(r, size) for r in rows]
        for micro in token_budget_batches([e.n_tokens for e in encoded], self.token_budget, len(encoded)):
            inputs = self.processor.collate([encoded[i] for i in micro])  # (check image slots on the host)
            labels = torch.tensor([rows[i]["label"] for i in micro], device=self.device)
            yield micro, inputs, labels, [rows[i]["kind"] for i in micro]

    def _sync_if(self, sync: bool):
        """DDP all-reduces gradients in the backward of this forward only when `sync`."""
        return contextlib.nullcontext() if sync or not hasattr(self.model, "no_sync") else self.model.no_sync()

    def _forward(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(inputs["input_ids"], inputs["attention_mask"],
                                inputs["pixel_values"].to(self.device, non_blocking=True))
        logits = logits.float()
        if self.net.config.num_labels == 1:
            loss = torch.nn.functional.mse_loss(logits[:, 0], labels.float())
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels.long())
        return loss, logits

    # -- training ----------------------------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[pa.Table], on_step: Callable[[TrainLoop], None] | None = None) -> dict:
        """One pass; returns (samples, summed loss, correct) as device-free numbers. `on_step` runs after every
        optimizer step (checkpoints, heartbeats); it may set `self.done` to stop early."""
        cfg = self.cfg
        self.model.train()
        self.done = False
        started, batches_seen = time.time(), 0
        seen = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            batches_seen += 1
            if batches_seen <= self.skip_batches:
                continue  # resumed mid-epoch: these batches were trained before the checkpoint
            batch = batch.filter(pc.is_null(batch.column("error")))
            ends_step = batches_seen % cfg.grad_accum == 0
            micro = list(self._micro_batches(batch)) if batch.num_rows else []
            # Workers split their batches into different numbers of micro-batches: only the last backward of a
            # step all-reduces (DDP's no_sync before it), so every worker takes part in each step exactly once.
            # A batch whose pairs all failed to encode still takes part, with a weight-0 pass on a kept input.
            weight = 1.0
            if not micro and self._spare is not None:
                micro, weight = [self._spare], 0.0
            for k, (_, inputs, labels, _) in enumerate(micro):
                with self._sync_if(ends_step and k == len(micro) - 1):
                    loss, logits = self._forward(inputs, labels)
                    # the step's loss is the mean over its rows, whatever the micro-batch split
                    (loss * (weight * len(labels) / max(batch.num_rows, 1)) / cfg.grad_accum).backward()
                if weight:
                    with torch.no_grad():
                        correct += (scores_from_logits(logits.detach())["label"].long() == labels.long()).sum()
                        loss_sum += loss.detach() * len(labels)
                        seen += len(labels)
            if micro and weight:
                self._spare = micro[-1]
            if ends_step:
                torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.batches_into_epoch = batches_seen
                if on_step:
                    on_step(self)
                if (cfg.max_steps and self.step >= cfg.max_steps) or self.done:
                    self.done = True
                    break
        self.skip_batches = 0
        return {"seen": int(seen.item()), "loss_sum": float(loss_sum.item()), "correct": int(correct.item()),
                "elapsed": time.time() - started}

    @torch.no_grad()
    def validate(self, batches: Iterable[pa.Table]) -> dict:
        """This worker's share of validation: scores, predicted and true levels, kinds, summed loss."""
        self.model.eval()
        scores, predicted, labels_all, kinds_all = [], [], [], []
        val_loss = torch.zeros((), device=self.device)
        n_val = 0
        for batch in batches:
            batch = batch.filter(pc.is_null(batch.column("error")))
            if batch.num_rows == 0:
                continue
            for _, inputs, labels, kinds in self._micro_batches(batch):
                loss, logits = self._forward(inputs, labels)
                out = scores_from_logits(logits)
                scores.append(out["score"])
                predicted.append(out["label"].long())
                labels_all.append(labels.long())
                kinds_all += kinds
                val_loss += loss * len(labels)
                n_val += len(labels)

        def host(parts):  # one device-to-host copy per epoch, not one per batch
            return torch.cat(parts).cpu().tolist() if parts else []

        return {"scores": host(scores), "predicted": host(predicted), "labels": host(labels_all),
                "kinds": kinds_all, "val_loss": float(val_loss.item()), "n_val": n_val}

    def save(self, directory: Path, batches_into_epoch: int) -> None:
        unifilter.save(self.net, self.processor.tokenizer, str(directory))
        save_train_state(directory, self.optimizer, self.scheduler,
                         {"epoch": self.epoch, "step": self.step, "batches_into_epoch": batches_into_epoch,
                          "history": self.history})


def save_to_temp(loop: TrainLoop, batches_into_epoch: int, rank: int):
    """A checkpoint directory for Ray Train's `report` (rank 0 writes it; the others report none)."""
    tmp = tempfile.TemporaryDirectory()
    if rank == 0:
        loop.save(Path(tmp.name), batches_into_epoch)
    return tmp
