"""Hostile inputs for tests and benchmarks: the adversarial corpus, one builder per way a run could be stopped,
cost far more time or memory than its size suggests, or have its results mixed (issue 27's findings). Each builder
makes the smallest input that shows the problem at the size asked for; the reproducers are the same builders at
their full sizes."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# -- sample bounds (A1) ----------------------------------------------------------------------------------------


def scan_bomb_jpeg(side: int, scans: int) -> bytes:
    """A progressive JPEG of `side` x `side` pixels with `scans` more copies of its last scan (an AC refinement):
    libjpeg decodes every one over the whole image (at 2000 px, 1,000 scans took 13 s), and the result is a valid
    image. Each copy adds 14 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 200)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last_scan = data[data.rfind(b"\xff\xda"):-2]  # up to the end-of-image marker
    return data[:-2] + last_scan * scans + b"\xff\xd9"


def unspaced_text(n_chars: int, script: str = "latin", seed: int = 0) -> str:
    """A text of `n_chars` characters with no space or punctuation, so one pre-token (word) of the tokenizer: Latin
    letters, or CJK ideographs drawn at random (no merges: three byte-level tokens each)."""
    if script == "latin":
        return ("unspaced" * (n_chars // 8 + 1))[:n_chars]
    rng = random.Random(seed)
    return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n_chars))


def or_chain(n_terms: int) -> str:
    """`--where` with `n_terms` comparisons joined by `or` (9,000 of them, 125 KB, once crashed evaluation)."""
    return " or ".join(f"score > {k}" for k in range(n_terms))


def many_segment_document(n_segments: int, image: bytes) -> tuple[list, list]:
    """An interleaved document (parallel texts and images) of one image and `n_segments` one-word text segments
    after it: its layout joins them into one text piece."""
    texts = [None] + [f"w{k % 10}" for k in range(n_segments)]
    return texts, [image] + [None] * n_segments


def zero_cells_parquet(path: str, rows: int, cell_bytes: int) -> None:
    """A caption Parquet shard of `rows` rows whose image cells are `cell_bytes` zeros each, in one row group, zstd
    and no dictionary: 100 rows x 10 MB is a 33 KB file that decompresses to 1 GB."""
    cell = b"\0" * cell_bytes
    table = pa.table({"id": [f"z{i}" for i in range(rows)], "image": pa.array([cell] * rows, pa.binary()),
                      "caption": [f"zeros {i}" for i in range(rows)]})
    pq.write_table(table, path, compression="zstd", use_dictionary=False, row_group_size=rows)


def repeated_cells_parquet(path: str, rows: int, cell_bytes: int) -> None:
    """The same as a dictionary: one `cell_bytes` image stored once and referenced by every row."""
    cell = b"\0" * cell_bytes
    table = pa.table({"id": [f"d{i}" for i in range(rows)], "image": pa.array([cell] * rows, pa.binary()),
                      "caption": [f"repeated {i}" for i in range(rows)]})
    pq.write_table(table, path, compression="zstd", use_dictionary=True, row_group_size=rows)


def sparse_member_tar(path: str, declared: int, caption: bytes = b"a sparse sample") -> None:
    """A webdataset tar whose `s.jpg` is a GNU sparse member (old format) declaring `declared` bytes of which it
    stores 512, beside `s.txt`: a 10 KB tar that expands to `declared` bytes when read."""
    stored = 512
    header = bytearray(tarfile.TarInfo("s.jpg").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"%011o\0" % stored  # size: what the tar stores
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:410] = b"%011o\0" % (declared - stored) + b"%011o\0" % stored  # one extent: its last 512 bytes
    header[482:483] = b"\0"  # no extended sparse headers
    header[483:495] = b"%011o\0" % declared  # the size it expands to
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with open(path, "wb") as out:
        out.write(bytes(header) + b"\xff" * stored)
        text = tarfile.TarInfo("s.txt")
        text.size = len(caption)
        out.write(text.tobuf(tarfile.GNU_FORMAT) + caption + b"\0" * (-len(caption) % 512))
        out.write(b"\0" * 1024)  # end of archive


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
