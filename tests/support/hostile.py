"""Hostile inputs for tests, scaled down from the adversarial probe of issue 27: builders of samples and shards that
try to stop a run for good, and the test-only stages that make them do it."""

from __future__ import annotations

import copy
import io
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs import sample_corpus as corpus
from pipeline.curation.filters import Filters
from pipeline.runner import run_job
from pipeline.scoring import ScoreConfig, ScoringJob
from pipeline.scoring.stage import ScoreStage

# -- actor bounds (A2)

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
        self.net, self.die, self.when = net, die, when

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


class ScoringWith(ScoringJob):
    """A scoring job whose model stage is `stage_class` (a ScoreStage that injects a fault), built with the
    arguments the job gives its own."""

    def __init__(self, config: ScoreConfig, stage_class: type[ScoreStage], sources: dict | None = None):
        super().__init__(config, sources)
        self.stage_class = stage_class

    def model_stage(self, resources):
        stage = super().model_stage(resources)
        stage.__class__ = self.stage_class  # the job's own stage, arguments and all, with the fault's hooks
        return stage


def score_with(stage_class: type[ScoreStage], config: ScoreConfig) -> tuple[ScoringJob, dict]:
    job = ScoringWith(config, stage_class)
    return job, run_job(job, progress=False)


class KillsItsWorker(ScoreStage):
    """A scoring stage whose process is SIGKILLed when a poisoned sample reaches the phase written beside the model
    (`kill-phase`: plan, decode or forward; `always:` before it: whatever the sample); each of its processes leaves
    its pid under `actors/` there, so a test counts restarts."""

    def setup(self):
        super().setup()
        root = Path(self.model_uri).parent
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
    from jobs._config import entry, run_command

    return entry(lambda: run_command(ScoreConfig, lambda config, sources: ScoringWith(config, KillsItsWorker, sources),
                                     argv, "python -m tests.support.hostile", "scoring whose worker is killed"), argv)


if __name__ == "__main__":
    sys.exit(main())


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
