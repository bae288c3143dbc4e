"""Hostile inputs for the tests: the adversarial corpus, one builder per way a run could be stopped or its results
mixed (issue 27's findings, scaled down so each test takes seconds)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


# -- content and identity (B) --------------------------------------------------------------------------------------
def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """Rewrite a file in place with other bytes of the same size, then give it back its modification time, as
    `cp -p`, `rsync -t` and unpacked archives leave a file."""
    stat = path.stat()
    assert len(data) == stat.st_size, "the same size, or this is no test of a same-size rewrite"
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def reversed_parquet(path: Path) -> None:
    """A Parquet shard rewritten in place with the same rows in the reverse order."""
    table = pq.read_table(path)
    pq.write_table(table.take(pa.array(range(table.num_rows - 1, -1, -1))), path)


def tar_of(path: Path, members: list[tuple[bytes, bytes]]) -> None:
    """A tar shard whose member names are raw bytes (not necessarily UTF-8), each member as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def colliding_keys_tar(path: Path, image: bytes) -> tuple[bytes, bytes]:
    """A tar with a sample keyed `b"\\xff"` (not UTF-8: written out as the text `\\udcff`) beside one literally
    keyed `\\udcff`, each whole with its own caption, and an ordinary sample `ok`. Returns the two keys as bytes."""
    raw, literal = b"\xff", b"\\udcff"
    tar_of(path, [(raw + b".jpg", image), (raw + b".txt", b"the raw key"),
                  (literal + b".jpg", image), (literal + b".txt", b"the literal key"),
                  (b"ok.jpg", image), (b"ok.txt", b"an ordinary key")])
    return raw, literal


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_with_first_rows(path: Path, rows: int) -> None:
    """A committed Parquet file replaced by a valid one holding only its first `rows` rows."""
    pq.write_table(pq.read_table(path).slice(0, rows), path)


def sidecar(path: Path, columns: dict[str, list]) -> None:
    """An img2dataset metadata sidecar (`<shard>.parquet`) with the given columns."""
    pq.write_table(pa.table(columns), path)


def names_the_listing_leaves_out(root: Path, shard: bytes) -> list[str]:
    """Beside the shards under `root`, files a directory listing of tar shards does not read: a hidden name and an
    upper-case suffix. Returns their names."""
    names = ["_hidden.tar", "UPPER.TAR"]
    for name in names:
        (root / name).write_bytes(shard)
    return names
