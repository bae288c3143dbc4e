"""Checkpoint files: which files make a checkpoint and in which order they are written, safetensors read and
written one tensor at a time, weights loaded straight into a model built on the meta device, and export.

Never unpickles: only safetensors weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model import storage
from model.errors import CheckpointError
from model.modeling import UniFilter

# -- the layout --------------------------------------------------------------------------------------------------
CONFIG_NAME = "config.json"  # written last: its presence marks a complete checkpoint
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded weights: which shard holds each tensor
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def is_weight_file(name: str) -> bool:
    """A large file a processor never needs (weights in any format)."""
    return name.endswith(WEIGHT_SUFFIXES)


def is_model_file(name: str) -> bool:
    """A file of the loadable model (config, weights, tokenizer), as opposed to e.g. a training run's optimizer
    state saved next to it."""
    weights = name.startswith("model") and name.endswith(".safetensors")
    return name in (CONFIG_NAME, WEIGHTS_INDEX_NAME, *TOKENIZER_FILES) or weights


def is_complete(names: Iterable[str]) -> bool:
    """Whether these file names make a loadable checkpoint: a config (written last) and safetensors weights."""
    names = set(names)
    return CONFIG_NAME in names and bool({WEIGHTS_NAME, WEIGHTS_INDEX_NAME} & names)


def write_order(names: Iterable[str]) -> list[str]:
    """The order to write a checkpoint's files in: config.json last, so a reader that sees it sees the rest."""
    return sorted(names, key=lambda name: (name == CONFIG_NAME, name))


def shard_names(directory: Path) -> list[str]:
    """The safetensors files holding a checkpoint's weights (from the index when sharded), whether or not they are
    in `directory` (a processor-only fetch leaves them out)."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    # model weights only: a training checkpoint keeps its optimizer state in safetensors beside them
    local = sorted(p.name for p in directory.glob("*.safetensors") if is_model_file(p.name))
    return local or [WEIGHTS_NAME]


def shard_paths(directory: Path) -> list[Path]:
    """The local safetensors files of a checkpoint; refuses pickled weights, naming them."""
    paths = [directory / name for name in shard_names(directory)]
    if not all(p.is_file() for p in paths):
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {pickled}: pickled weights are refused; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no safetensors weights in {directory}{hint}")
    return paths


# -- safetensors headers -----------------------------------------------------------------------------------------
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file: dtype, shape and absolute byte offsets."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(uri: str | Path) -> dict[str, TensorEntry]:
    """The tensor table of a safetensors file (local path or any URI `model.storage` reads) from its header
    alone: 8 bytes of length, then that much JSON; two ranged reads on object storage, never the tensor data."""
    fs, path = storage.filesystem_for(str(uri))
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            (length,) = struct.unpack("<Q", f.read_at(8, 0)) if size >= 8 else (0,)
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{uri}: not a safetensors file (header length {length}, file size {size})")
            header = json.loads(f.read_at(length, 8))
    except FileNotFoundError:
        raise CheckpointError(f"no weights file at {uri}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{uri}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    entries = {}
    data_start, data_size = 8 + length, size - 8 - length
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{uri}: tensor {name} has an unreadable header entry {info}") from None
        expected = dtype.itemsize * _numel(shape)
        if not (0 <= start <= end <= data_size and end - start == expected):
            raise CheckpointError(f"{uri}: tensor {name} has offsets {start}..{end}, expected {expected} bytes "
                                  f"within the file's {data_size} data bytes")
        entries[name] = TensorEntry(dtype, shape, data_start + start, data_start + end)
    return entries


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# -- reading -----------------------------------------------------------------------------------------------------
def iter_tensors(path: Path, entries: Mapping[str, TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of a local safetensors file, each read straight into its own host memory, in file order.

    No memory map: copying out of a mapped file keeps the touched file pages resident in this process until the
    file is closed, so a mapped load holds the weights twice (2.0 GB peak for a 1 GiB file, measured)."""
    with open(path, "rb", buffering=0) as f:
        for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(buffer):
                n = os.preadv(f.fileno(), [buffer[done:]], entry.start + done)
                if n == 0:
                    raise CheckpointError(f"{path}: truncated file (tensor {name})")
                done += n
            yield name, tensor
            del tensor, buffer  # the caller may convert it: hold no reference to the source past this point


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local safetensors checkpoint (single file or sharded with an index), in host memory."""
    weights: dict[str, torch.Tensor] = {}
    for path in shard_paths(Path(directory)):
        weights.update(iter_tensors(path, read_header(path)))
    return weights


# -- into a model ------------------------------------------------------------------------------------------------
def check_keys(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """The checkpoint has exactly the model's keys with the model's shapes; raises naming what does not match."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weight keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected weight keys {_preview(unexpected)}")
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"checkpoint {source}: weight {key} has shape {tuple(shapes[key])}, "
                                  f"the model expects {shape}")


def _preview(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def load_weights(model: UniFilter, shards: Mapping[Path, Mapping[str, TensorEntry]], source: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 rename: Mapping[str, str | None] | None = None) -> None:
    """Read the shards' tensors (named `rename[key]` when given, None = dropped) into a model built on the meta
    device, each straight into its final dtype and device: at most one tensor more than the model in host memory.

    Keys and shapes are checked from the headers before any tensor data is read."""
    def ours(key: str) -> str | None:
        return rename.get(key, key) if rename else key

    kept = {path: {key: entry for key, entry in entries.items() if ours(key)} for path, entries in shards.items()}
    check_keys(model, {ours(key): e.shape for entries in kept.values() for key, e in entries.items()}, source)
    state: dict[str, torch.Tensor] = {}
    for path, entries in kept.items():
        for key, tensor in iter_tensors(path, entries):
            name = ours(key)
            state[name] = _placed(tensor, device, _target_dtype(model, name, tensor.dtype, dtype))
            del tensor  # the host copy goes as soon as the tensor is on its device and in its dtype
    assign_weights(model, state, device)


def _target_dtype(model: UniFilter, key: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    return torch.float32 if model.keeps_fp32(key) else dtype


def _placed(tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Move first, then convert: the conversion runs on the accelerator, and the host never holds a converted copy.
    return tensor.to(device).to(dtype)


def assign_weights(model: UniFilter, state: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """Make `state`'s tensors the model's own (no copy), then compute the buffers no checkpoint holds."""
    model.load_state_dict(state, strict=True, assign=True)
    model.materialise_buffers(device)


def load_state(model: UniFilter, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load exactly the model's keys from tensors in memory: any missing or unexpected key, or a shape mismatch,
    raises naming it. A model on the meta device takes the tensors themselves (the score head as fp32)."""
    check_keys(model, {key: tuple(t.shape) for key, t in weights.items()}, source)
    if not model.llm.embed_tokens.weight.is_meta:
        model.load_state_dict(weights, strict=True)
        return
    device = next(iter(weights.values())).device
    state = {key: t.float() if model.keeps_fp32(key) else t for key, t in weights.items()}
    assign_weights(model, state, device)


# -- writing -----------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      host_copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """Write tensors to a safetensors file one at a time and return the sha256 of the file's bytes.

    Each tensor is brought to host memory by `host_copy` (default: detach, to CPU, contiguous) only while it is
    written, so saving a model on an accelerator never holds a second full copy on the host; the header comes
    from the tensors' shapes and dtypes alone (meta tensors do, with a `host_copy` that makes their values).
    The file is created like any other output (mode 0666 less the umask)."""
    host_copy = host_copy or (lambda t: t.detach().to("cpu").contiguous())
    names = sorted(tensors)
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.dtype.itemsize * t.numel()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            data = host_copy(tensors[name]).reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes (what `write_safetensors` returns for the file it writes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_checkpoint(src_dir: str | Path, dst_uri: str) -> list[str]:
    """Copy a checkpoint's model files (config, weights, tokenizer; not e.g. a training run's optimizer state)
    from a local directory to a directory or any URI `model.storage` writes, config.json last. Returns the names
    copied."""
    src_dir = Path(src_dir)
    names = [p.name for p in src_dir.iterdir() if p.is_file() and is_model_file(p.name)]
    if not is_complete(names):
        raise CheckpointError(f"{src_dir} holds no complete checkpoint (found {sorted(names)})")
    for name in write_order(names):
        storage.upload_file(src_dir / name, storage.join(dst_uri, name))
    return write_order(names)
