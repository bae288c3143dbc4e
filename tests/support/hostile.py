"""Hostile inputs for tests and benchmarks: samples, shards and expressions built to cost a run far more time or
memory than their size suggests. Each builder makes the smallest input that shows the problem at the size asked
for; the reproducers of issue 27 are the same builders at their full sizes."""

from __future__ import annotations

import io
import random
import tarfile

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
