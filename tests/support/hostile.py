"""Hostile inputs for tests and benchmarks: the adversarial corpus, one builder per way a run could be stopped,
cost far more time or memory than its size suggests, or have its results mixed (issue 27's findings). Each builder
makes the smallest input that shows the problem at the size asked for; the reproducers are the same builders at
their full sizes."""

from __future__ import annotations

import copy
import io
import os
import random
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs import sample_corpus as corpus
from pipeline.curation.filters import Filters
from pipeline.scoring import ScoreConfig
from pipeline.scoring.stage import ScoreStage
from tests.support.scoring import ScoringWith

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


# -- actor bounds (A2) -----------------------------------------------------------------------------------------

POISON = "kill-the-worker"  # in a caption, with a magenta image: the sample whose worker dies (test-only stages)
MAGENTA = (255, 0, 255)


def magenta_png(size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), MAGENTA).save(buf, "PNG")
    return buf.getvalue()


def poisoned_captions(n: int, poisoned: int, seed: int = 0, prefix: str = "p") -> list[dict]:
    """`n` drawn caption samples (`corpus.caption_samples`'s dicts); sample `poisoned` has a magenta image and POISON
    in its caption, which the stages below die on."""
    items = corpus.caption_samples(n, seed=seed, prefix=prefix)
    items[poisoned] = {**items[poisoned], "image": magenta_png(), "caption": f"a {POISON} caption"}
    return items


def _is_poisoned_pixels(pixels) -> bool:
    """Whether any image of a (N, 3, S, S) uint8 array or tensor is all magenta."""
    pixels = np.asarray(pixels.cpu() if hasattr(pixels, "cpu") else pixels)
    if pixels.size == 0:
        return False
    flat = pixels.reshape(pixels.shape[0], 3, -1)
    return bool(np.all(flat == np.array(MAGENTA, dtype=np.uint8)[None, :, None], axis=(1, 2)).any())


class WorkerDeath(BaseException):
    """A process killed mid-work, without Ray: nothing after it runs (no handler sees a BaseException), nothing is
    recorded; the test then starts a fresh scorer on the same journal, as Ray restarts an actor."""


def raise_death() -> None:
    raise WorkerDeath()


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does


class _DiesOnDevice:
    """A model whose forward pass kills its process when `when(pixel_values)` holds."""

    def __init__(self, net, die, when):
        self.net = net
        self.die = die
        self.when = when

    def __getattr__(self, name):
        return getattr(self.net, name)

    def score(self, input_ids, attention_mask, pixel_values=None, **options):
        if self.when(pixel_values):
            self.die()
        return self.net.score(input_ids, attention_mask, pixel_values, **options)


def dies_on_poison(scorer, phase: str, die=raise_death, always: bool = False) -> None:
    """Make `scorer`'s process die (`die()`) when a poisoned sample is in `phase`: `plan` (laid out and tokenised),
    `decode` (its image decoded) or `forward` (on the device); with `always`, whatever the sample (the canary too)."""
    processor = scorer.processor = copy.copy(scorer.processor)  # its own: a loaded processor may be shared
    if phase == "plan":
        plan = processor.plan

        def planned(texts, images, kind):
            if always or any(POISON in t for t in texts if t):
                die()
            return plan(texts, images, kind)

        processor.plan = planned
    elif phase == "decode":
        decode = processor.decode

        def decoded(sample):
            out = decode(sample)
            if always or _is_poisoned_pixels(out.pixel_values):
                die()
            return out

        processor.decode = decoded
    else:
        scorer.model = _DiesOnDevice(scorer.model, die, lambda pixels: always or _is_poisoned_pixels(pixels))


class KillsItsWorker(ScoreStage):
    """A scoring stage whose process is SIGKILLed when a poisoned sample reaches the phase written beside the model
    (`kill-phase`: plan, decode or forward; `always:` before it: whatever the sample); each of its processes leaves
    its pid under `actors/` there, so a test counts restarts."""

    def setup(self):
        super().setup()
        root = Path(self.settings.model).parent
        (root / "actors").mkdir(exist_ok=True)
        (root / "actors" / str(os.getpid())).touch()
        phase = (root / "kill-phase").read_text().strip()
        dies_on_poison(self.scorer, phase.removeprefix("always:"), sigkill_self, always=phase.startswith("always:"))


@dataclass(frozen=True)
class KillsOnShard(Filters):
    """Filters whose evaluation kills its process on the records of one shard (`source`), as a `--where` expression
    that segfaults evaluation did: curation's passes must end the run naming that score file, not retry forever."""

    source: str = ""

    def evaluate(self, table):
        if self.source in table.column("source").to_pylist():
            sigkill_self()
        return super().evaluate(table)


def score_file(path: Path, source: str, n: int, seed: int = 0) -> Path:
    """A score file of `n` scored captions of `source` (the passes read score files as they are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.scoring.records import SCORE_SCHEMA

    scores = np.random.default_rng(seed).uniform(0, 3, n)
    rows = [{"id": f"{source}-{i}", "source": source, "kind": "caption", "score": float(s), "label": int(round(s)),
             "n_images": 1, "n_tokens": 10, "truncated": False, "model": "fake@0"} for i, s in enumerate(scores)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.hostile ...`: `python -m jobs.score ...` with its model stage swapped for
    `KillsItsWorker` (a test runs it as a subprocess to interrupt it)."""
    from jobs._config import Command, entry, run_command
    from jobs.score import COMMAND

    command = Command("tests.support.hostile", "Scoring whose worker is killed.", COMMAND.dry_run)
    return entry(lambda: run_command(ScoreConfig, lambda config, sources: ScoringWith(config, KillsItsWorker, sources),
                                     argv, command), argv)


def rgba_png(side: int) -> bytes:
    """A side x side RGBA PNG that compresses to almost nothing and decodes to side^2 x 4 bytes (the probe's ten
    8000x8000 RGBA PNGs, scaled down)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(buf, "PNG")
    return buf.getvalue()


def random_document(rng, positions: int) -> tuple[list, list]:
    """Parallel texts and images of a random layout: images (stand-in bytes: planning never decodes them), texts
    short, long (past the token limit) or blank, and now and then a position that holds both or neither."""
    texts, images = [], []
    for k in range(positions):
        r = rng.random()
        if r < 0.45:
            texts.append(None)
            images.append(f"image-{k}".encode())
        elif r < 0.97:
            words = rng.choice([0, 1, 5, 40, 900])
            texts.append(" ".join(rng.choice(["cat", "on", "a", "mat", "sunlit"]) for _ in range(words)) or "  ")
            images.append(None)
        else:
            texts.append(None if r < 0.985 else "both")
            images.append(None if r < 0.985 else b"both")
    return texts, images


def many_image_document(n_images: int, image_bytes: int = 6000, image: bytes | None = None) -> tuple[list, list]:
    """A document of `n_images` images (`image`, else `image_bytes` of stand-in bytes each) with a line of text
    before each: the probe's 300-image document that shipped 2 MB per sample though the model sees 16 of them."""
    texts, images = [], []
    for k in range(n_images):
        texts += [f"paragraph {k} about the picture below", None]
        images += [None, image or bytes([k % 251]) * image_bytes]
    return texts, images


if __name__ == "__main__":
    sys.exit(main())
