"""Where a checkpoint URI points, decided in milliseconds and without torch: a local directory, an object-store
prefix, or a Hugging Face hub id. Jobs call `checkpoint_problem` before anything heavy, so a typo in `--model` is
reported at once, as what it is (a missing directory is not a hub lookup)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from model import storage

CONFIG_NAME = "config.json"
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(uri: str) -> bool:
    """`org/name[@revision]` (or `hf://...`) that names no local path. A relative path whose first folder exists
    here (`models/tiny` with a `models/` folder) is a path, never a hub id."""
    uri = str(uri)
    scheme = storage.scheme_of(uri)
    if scheme == "hf":
        return True
    if scheme != "file" or not _HUB_ID.match(uri) or looks_like_path(uri):
        return False
    return not Path(uri).expanduser().exists()


def looks_like_path(uri: str) -> bool:
    """Written as a path: absolute, `./`, `../`, `~`, or under a folder that exists here."""
    uri = str(uri)
    if uri.startswith(("/", "./", "../", "~", "file://")) or uri in (".", ".."):
        return True
    first = uri.split("/", 1)[0]
    return "/" in uri and Path(first).is_dir()


def hub_repo(uri: str) -> tuple[str, str | None]:
    repo_id, _, revision = uri.removeprefix("hf://").partition("@")
    return repo_id, revision or None


def checkpoint_problem(uri: str) -> str | None:
    """Why `uri` cannot be a checkpoint, when that can be told cheaply (a missing local directory or config, an
    empty prefix); None when it may be one (a hub id is checked when it loads)."""
    uri = str(uri)
    if is_hub_id(uri):
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") and not _in_hub_cache(uri):
            return (f"no checkpoint at {uri!r}: not a local directory, and the Hugging Face hub id is not in the "
                    "local hub cache while HF_HUB_OFFLINE is set")
        return None
    if storage.is_local(uri):
        path = Path(storage.normalize_uri(uri)).expanduser()
        given = Path(uri.removeprefix("file://")).expanduser()
        where = "" if given.is_absolute() else f" (relative to {os.getcwd()})"
        if not path.exists():
            return f"no checkpoint at {uri!r}: no such directory{where}"
        if not path.is_dir():
            return f"no checkpoint at {uri!r}: a file, not a checkpoint directory"
        if not (path / CONFIG_NAME).is_file():
            return f"no checkpoint at {uri!r}: the directory has no {CONFIG_NAME}"
        return None
    import pyarrow.fs as pafs

    try:
        fs, root = storage.filesystem_for(storage.normalize_uri(uri))
        info = fs.get_file_info(f"{root.rstrip('/')}/{CONFIG_NAME}")
    except (OSError, ValueError) as err:
        return f"cannot reach {uri}: {err}"
    if info.type != pafs.FileType.File:
        return f"no checkpoint at {uri}: no {CONFIG_NAME} under that prefix"
    return None


def _in_hub_cache(uri: str) -> bool:
    repo_id, _ = hub_repo(uri)
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    return (home.expanduser() / f"models--{repo_id.replace('/', '--')}").is_dir()
