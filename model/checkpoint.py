"""Checkpoints in and out: find one (a directory, an `s3://` prefix through the node's cache, or a Hugging Face hub
id), load the model and its processor from it, save one, and create a random one from a named config.

A checkpoint holds `config.json`, safetensors weights and the tokenizer. Weights never go through pickle; a missing
or unexpected weight key is an error, never a silent random init. Released LLaVA-style UniFilter checkpoints are
recognised and converted as they load.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer

from model import cache, llava, locate, storage
from model.config import CHECKPOINT_FORMAT, UniFilterConfig, get_config
from model.errors import CheckpointError
from model.limits import ImageDecoding
from model.modeling import UniFilter
from model.processing import UniFilterProcessor
from model.tokenization import build_tokenizer
from model.weights import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    load_state,
    load_weights,
    read_header,
    read_weights,
    shard_names,
    shard_paths,
    write_order,
    write_safetensors,
)

__all__ = [
    "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "CheckpointError", "build", "config_and_tokenizer", "create", "load",
    "load_processor", "load_state", "read_weights", "resolve", "save",
]
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


# -- where a checkpoint lives -------------------------------------------------------------------------------------
def resolve(uri: str, weights: bool = True) -> tuple[Path, str | None]:
    """A local directory holding the checkpoint's files, and the source's revision if it names one.

    Local directories are used in place; `s3://` (and other remote) prefixes go through the node's checkpoint
    cache (`model.cache`: one download per node and version); anything of the form `org/name[@revision]` that is
    not a local path is a Hugging Face hub id (its cache honours HF_HOME and HF_HUB_OFFLINE). With
    `weights=False` only the small files (config, tokenizer) are fetched."""
    uri = str(uri)
    if _is_hub_id(uri):
        from huggingface_hub import snapshot_download  # an optional download path: imported when used

        repo_id, revision = _hub_repo(uri)
        patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        return Path(path), Path(path).name  # snapshot folders are named by commit hash
    if not storage.is_local(uri):
        return cache.fetch(uri, weights=weights), None
    local = Path(storage.normalize_uri(uri)).expanduser()
    if local.is_dir():
        return local, None
    raise CheckpointError(locate.checkpoint_problem(uri) or f"no checkpoint at {uri!r}")


_is_hub_id, _hub_repo = locate.is_hub_id, locate.hub_repo


# -- reading -----------------------------------------------------------------------------------------------------
def load(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         decoding: ImageDecoding | None = None) -> tuple[UniFilter, UniFilterProcessor]:
    """The model and its processor from a checkpoint URI (local dir, `s3://` prefix or hub id), the processor
    decoding images as `decoding` says (default: `ImageDecoding()`).

    The model is built on the meta device and each tensor is read straight into `dtype` (None: float32) on
    `device`: no random initialisation, and at most one copy of the weights in host memory. The score head
    and the rotary frequencies stay fp32 whatever `dtype` is."""
    directory, source_revision = resolve(uri)
    raw = _read_raw_config(directory, uri)
    headers = {path: read_header(path) for path in shard_paths(directory)}
    shapes = {key: entry.shape for entries in headers.values() for key, entry in entries.items()}
    config, tokenizer = _config_and_tokenizer_of(raw, directory, uri, lambda: shapes)
    rename = llava.rename_table(shapes, uri) if llava.is_llava_config(raw) else None
    with torch.device("meta"):
        model = UniFilter(config)
    load_weights(model, headers, uri, device=device, dtype=dtype or torch.float32, rename=rename)
    model.eval()
    model.model_id = _model_id(uri, source_revision or config.revision)
    return model, UniFilterProcessor(config, tokenizer, decoding)


def load_processor(uri: str) -> tuple[UniFilterProcessor, str]:
    """Only the processor (config and tokenizer) and the model id a full load would report: what a CPU
    preprocessing stage needs. Never reads the weights: a LLaVA-style checkpoint's config comes from the
    safetensors headers (ranged reads on object storage)."""
    directory, source_revision = resolve(uri, weights=False)
    raw = _read_raw_config(directory, uri)
    config, tokenizer = _config_and_tokenizer_of(raw, directory, uri, lambda: _weight_shapes(uri, directory))
    return UniFilterProcessor(config, tokenizer), _model_id(uri, source_revision or config.revision)


def _read_raw_config(directory: Path, uri: str) -> dict:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {uri} has no config.json")
    return json.loads(config_path.read_text())


def _config_and_tokenizer_of(raw: dict, directory: Path, uri: str,
                             shapes: Callable[[], Mapping[str, tuple[int, ...]]]) -> tuple[UniFilterConfig, object]:
    """Our config and the tokenizer of a checkpoint, converting a LLaVA-style config (which needs the weights'
    shapes, asked for only then)."""
    if raw.get("format") == CHECKPOINT_FORMAT:
        return UniFilterConfig(**raw), AutoTokenizer.from_pretrained(str(directory))
    if llava.is_llava_config(raw):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return llava.convert_config(raw, shapes(), tokenizer, directory, uri), tokenizer
    raise CheckpointError(f"checkpoint {uri}: config.json is neither a UniFilter nor a LLaVA-style config")


def _weight_shapes(uri: str, directory: Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape from the safetensors headers: local files where the weights are here, ranged reads
    on object storage, the hub's header API for a hub id."""
    names = shard_names(directory)
    if all((directory / name).is_file() for name in names):
        locations = [str(directory / name) for name in names]
    elif _is_hub_id(uri):
        from huggingface_hub import get_safetensors_metadata  # an optional download path: imported when used

        repo_id, revision = _hub_repo(uri)
        try:
            metadata = get_safetensors_metadata(repo_id, revision=revision)
        except (OSError, ValueError) as err:  # offline, no such repo, no safetensors
            raise CheckpointError(f"{uri}: cannot read the weights' headers from the hub ({err})") from None
        return {key: tuple(info.shape) for file in metadata.files_metadata.values()
                for key, info in file.tensors.items()}
    else:
        locations = [storage.join(uri, name) for name in names]
    return {key: entry.shape for location in locations for key, entry in read_header(location).items()}


def _model_id(uri: str, revision: str | None) -> str:
    """What score records name as their model: the URI and the weights' revision (hub commit or content hash)."""
    return f"{uri}@{revision}" if revision else str(uri)


# -- building and writing ----------------------------------------------------------------------------------------
def build(config: UniFilterConfig, tokenizer, weights: dict[str, torch.Tensor] | None = None,
          source: str = "config") -> tuple[UniFilter, UniFilterProcessor]:
    """A model and its processor: randomly initialised, or (given `weights`) built on the meta device and taking
    those tensors."""
    if weights is None:
        model = UniFilter(config)
    else:
        with torch.device("meta"):
            model = UniFilter(config)
        load_state(model, weights, source)
    model.eval()
    return model, UniFilterProcessor(config, tokenizer)


def save(model: UniFilter, tokenizer, uri: str) -> str:
    """Write model.safetensors, the tokenizer and config.json (last) to a directory or `s3://` prefix; returns the
    weights' revision (a content hash). Tensors go to host memory one at a time; files are created with the
    usual permissions (0644 under a 022 umask). config.json comes last everywhere, so a checkpoint that has it
    is complete, even after an interrupted upload."""
    with tempfile.TemporaryDirectory(prefix="unifilter-save-") as tmp:
        local = storage.is_local(uri)
        staging = Path(storage.normalize_uri(uri)) if local else Path(tmp)
        staging.mkdir(parents=True, exist_ok=True)
        revision = write_safetensors(staging / WEIGHTS_NAME, model.state_dict(), {"format": "pt"})[:16]
        tokenizer.save_pretrained(str(staging))
        config = model.config.model_copy(update={"revision": revision})
        (staging / CONFIG_NAME).write_text(config.to_json())
        if not local:
            for name in write_order(p.name for p in staging.iterdir() if p.is_file()):
                storage.upload_file(staging / name, storage.join(uri, name))
    return revision


def config_and_tokenizer(name: str, num_labels: int = 1) -> tuple[UniFilterConfig, object]:
    """A named config with its offline tokenizer, the config's special-token ids taken from that tokenizer."""
    config = get_config(name, num_labels=num_labels)
    tokenizer = build_tokenizer(config.tokenizer)
    if len(tokenizer) > config.text["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the config's vocab_size")
    config = config.model_copy(update={
        "tokenizer": "checkpoint",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    })
    return config, tokenizer


def create(name: str, output: str, num_labels: int = 1, seed: int = 0, dtype: str = "float32") -> str:
    """Write a randomly initialised checkpoint of a named config (seeded); returns its revision."""
    config, tokenizer = config_and_tokenizer(name, num_labels)
    torch.manual_seed(seed)
    model, _ = build(config, tokenizer)
    model.to(getattr(torch, dtype))
    return save(model, tokenizer, output)
