"""Checkpoints: a directory, an `s3://` prefix or a Hugging Face hub id holding `config.json`, safetensors weights
and the tokenizer. Weights never go through pickle; a missing or unexpected weight key is an error, never a
silent random init. Released LLaVA-style UniFilter checkpoints are recognised and converted on load."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model import storage
from model.config import CHECKPOINT_FORMAT, UniFilterConfig
from model.errors import CheckpointError
from model.modeling import UniFilter
from model.processing import UniFilterProcessor

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


# -- where a checkpoint lives -------------------------------------------------------------------------------------
def resolve(uri: str, workdir: str | Path, weights: bool = True) -> tuple[Path, str | None]:
    """A local directory holding the checkpoint's files, and the source's revision if it names one.

    Local directories are used in place; `s3://` prefixes are downloaded into `workdir`; anything of the form
    `org/name[@revision]` that is not a local path is a Hugging Face hub id (its cache honours HF_HOME and
    HF_HUB_OFFLINE). With `weights=False` only the small files (config, tokenizer) are fetched."""
    uri = str(uri)
    if storage.is_remote(uri):
        skip = () if weights else (".safetensors",)
        return storage.download_dir(uri, Path(workdir) / "checkpoint", skip_suffixes=skip), None
    local = Path(uri.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local, None
    if _HUB_ID.match(uri) and not local.exists():
        from huggingface_hub import snapshot_download

        repo_id, _, revision = uri.removeprefix("hf://").partition("@")
        patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
        return Path(path), Path(path).name  # snapshot folders are named by commit hash
    raise CheckpointError(f"no checkpoint at {uri!r}: not a local directory, s3:// prefix or hub id")


# -- reading -----------------------------------------------------------------------------------------------------
def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded with an index); never unpickles."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        shards = [WEIGHTS_NAME]
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickled}: pickled weights are refused; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no safetensors weights in {directory}{hint}")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(directory / shard)))
    return weights


def load_state(model: UniFilter, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load exactly the model's keys: any missing or unexpected key raises, naming it."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weight keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected weight keys {_preview(unexpected)}")
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(parts))
    for key, tensor in model.state_dict().items():
        if weights[key].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {source}: weight {key} has shape {tuple(weights[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(weights, strict=True)


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def build(config: UniFilterConfig, tokenizer, weights: dict[str, torch.Tensor] | None = None,
          source: str = "config") -> tuple[UniFilter, UniFilterProcessor]:
    model = UniFilter(config)
    if weights is not None:
        load_state(model, weights, source)
    model.eval()
    return model, UniFilterProcessor(config, tokenizer)


def load(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
         ) -> tuple[UniFilter, UniFilterProcessor]:
    """The model and its processor from a checkpoint URI (local dir, `s3://` prefix or hub id)."""
    with tempfile.TemporaryDirectory(prefix="unifilter-ckpt-") as workdir:
        directory, source_revision = resolve(uri, workdir)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"checkpoint {uri} has no config.json")
        raw = json.loads(config_path.read_text())
        if raw.get("format") == CHECKPOINT_FORMAT:
            config = UniFilterConfig(**raw)
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            weights = read_weights(directory)
        elif "mm_vision_tower" in raw:
            from model.convert import convert_llava

            config, weights, tokenizer = convert_llava(directory)
        else:
            raise CheckpointError(f"checkpoint {uri}: config.json is neither a UniFilter nor a LLaVA-style config")
        model, processor = build(config, tokenizer, weights, source=uri)
    model.model_id = _model_id(uri, source_revision or config.revision)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model, processor


def load_processor(uri: str) -> tuple[UniFilterProcessor, str]:
    """Only the processor (config and tokenizer, no weights) and the model id a full load would report: what a
    CPU preprocessing stage needs."""
    with tempfile.TemporaryDirectory(prefix="unifilter-ckpt-") as workdir:
        directory, source_revision = resolve(uri, workdir, weights=False)
        raw = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        if raw.get("format") != CHECKPOINT_FORMAT:
            model, processor = load(uri)  # a LLaVA-style checkpoint: its config comes from converting it
            return processor, model.model_id
        config = UniFilterConfig(**raw)
        processor = UniFilterProcessor(config, AutoTokenizer.from_pretrained(str(directory)))
    return processor, _model_id(uri, source_revision or config.revision)


def _model_id(uri: str, revision: str | None) -> str:
    """What score records name as their model: the URI and the weights' revision (hub commit or content hash)."""
    return f"{uri}@{revision}" if revision else str(uri)


# -- writing -----------------------------------------------------------------------------------------------------
def save(model: UniFilter, tokenizer, uri: str) -> str:
    """Write config.json, model.safetensors and the tokenizer to a directory or `s3://` prefix; returns the
    weights' revision (a content hash). On object storage config.json is written last, so an interrupted upload
    never looks like a complete checkpoint."""
    with tempfile.TemporaryDirectory(prefix="unifilter-save-") as tmp:
        staging = Path(tmp) if storage.is_remote(uri) else Path(uri).expanduser()
        staging.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        revision = _file_hash(staging / WEIGHTS_NAME)
        tokenizer.save_pretrained(str(staging))
        config = model.config.model_copy(update={"revision": revision})
        (staging / "config.json").write_text(config.to_json())
        if storage.is_remote(uri):
            names = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != "config.json")
            for name in [*names, "config.json"]:
                storage.upload_file(staging / name, storage.join(uri, name))
    return revision


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]

