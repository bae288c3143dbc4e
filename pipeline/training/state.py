"""The training state in a checkpoint, beside the model's own files: optimizer state as safetensors and the rest as
JSON (nothing is pickled); and finding the furthest complete checkpoint of a run in its storage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from model.weights import is_complete
from pipeline.io.uris import filesystem_for, join, to_uri

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "train_state.json"  # written last: its presence completes a training checkpoint


def save_train_state(directory: Path, optimizer, scheduler, state: dict) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER_NAME))
    (directory / STATE_NAME).write_text(json.dumps({
        **state, "param_groups": sd["param_groups"], "optimizer_scalars": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }, default=float))


def load_train_state(directory: Path, optimizer, scheduler) -> dict:
    """Restore optimizer and scheduler state. Call it once the model is on its device and in its dtype (and the
    optimizer built over those parameters): `Optimizer.load_state_dict` casts the state to each parameter's
    device and dtype, so a state saved on one device resumes on another."""
    meta = json.loads((directory / STATE_NAME).read_text())
    tensors = load_file(str(directory / OPTIMIZER_NAME))
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
    fs, root = filesystem_for(join(storage_uri, name))
    best = None
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(info.path))}
        if not (is_complete(names) and {OPTIMIZER_NAME, STATE_NAME} <= names):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_NAME}") as f:
                state = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if best is None or state["step"] > best[1]["step"]:
            best = (to_uri(storage_uri, info.path), state)
    return best
