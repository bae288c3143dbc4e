"""What one hostile sample, shard or `--where` expression costs, beside an ordinary one, and what the bounds on them
cost ordinary data (issue 27, "every sample bounded in time and memory").

Each hostile input runs in a fresh process: reading a whole shard with the job's reader (`read_samples`: the read
stage's peak RSS), planning and decoding one sample with the Qwen2.5 vocabulary at the released configs' limits
(the scoring actor's decode threads), or parsing and evaluating an expression (a curation pass). The peak is the
process's VmHWM (its imports included, so compare rows, not absolute values). Then the bounds' cost on ordinary
data, in this process: rows/s of reading the bundled corpus' shards, and samples/s of planning and decoding them.

    python benchmarks/sample_bounds.py [--quick | --ordinary-only] [--scan-bomb-side 8000 --scan-bomb-scans 10000]

To compare two checkouts, run the same file against each (`PYTHONPATH=/other/checkout`; the hostile inputs come
from `tests/support/hostile.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def qwen_processor():
    from model.checkpoint import config_and_tokenizer
    from model.processing import UniFilterProcessor

    return UniFilterProcessor(*config_and_tokenizer("qwen2.5-0.5b"))


def _jpeg(side: int, progressive: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    pixels = (127 + 100 * np.stack([np.sin(xx * 7), np.cos(yy * 5), xx * yy], -1)
              + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def sample(name: str, args: list[str]) -> tuple:
    """(texts, images, kind) of the named sample."""
    from jobs import sample_corpus as corpus
    from tests.support import hostile

    small = corpus.caption_samples(1)[0]["image"]
    if name == "caption":
        item = corpus.caption_samples(1, seed=5)[0]
        return [None, item["caption"]], [item["image"], None], "caption"
    if name == "long-caption":
        prose = " ".join(corpus.random_scene(random.Random(k)).caption() for k in range(4000))
        return [None, prose[:240_000]], [small, None], "caption"
    if name == "unspaced":
        return [None, hostile.unspaced_text(int(args[0]), args[1])], [small, None], "caption"
    if name == "segments":
        texts, images = hostile.many_segment_document(int(args[0]), small)
        return texts, images, "interleaved"
    if name == "progressive-jpeg":
        return [None, "a progressive photo"], [_jpeg(int(args[0]), progressive=True), None], "caption"
    if name == "scan-bomb":
        return [None, "a scan bomb"], [hostile.scan_bomb_jpeg(int(args[0]), int(args[1])), None], "caption"
    raise ValueError(name)


def probe(kind: str, args: list[str]) -> dict:
    """(In a fresh process.) One hostile input's cost and outcome."""
    import pandas  # noqa: F401 - Ray's workers have it loaded; pyarrow imports it lazily on first use

    out: dict = {}
    if kind == "read":
        from pipeline.io.samples import read_samples

        start, rows, errors, reason = time.perf_counter(), 0, 0, None
        for row in read_samples(args[0], args[1]):
            rows += 1
            if row["error"]:
                errors, reason = errors + 1, reason or row["error"]
        out = {"seconds": time.perf_counter() - start, "outcome": f"{rows} rows, {errors} errors" +
               (f" ({reason[:70]})" if reason else "")}
    elif kind == "plan":
        from model.errors import SampleError

        processor = qwen_processor()
        texts, images, sample_kind = sample(args[0], args[1:])
        start = time.perf_counter()
        try:
            encoded = processor.decode(processor.plan(texts, images, sample_kind))
            out["outcome"] = f"{encoded.n_tokens} tokens" + (", truncated" if encoded.truncated else "")
        except SampleError as err:
            out["outcome"] = err.reason[:80]
        out["seconds"] = time.perf_counter() - start
    elif kind == "where":
        import pyarrow as pa

        from pipeline.curation import where
        from pipeline.errors import ConfigFieldError
        from tests.support import hostile

        text = {"9000-ors": hostile.or_chain(9000), "401-digits": "n_images > " + "1" * 401,
                "int-1e20": "n_images > 100000000000000000000"}[args[0]]
        table = pa.table({"score": [0.5, 1.5], "n_images": pa.array([1, 2], pa.int32())})
        start = time.perf_counter()
        try:
            out["outcome"] = f"{table.filter(where.expression(where.parse(text))).num_rows} rows pass"
        except ConfigFieldError as err:
            out["outcome"] = f"exit 2: {str(err)[:70]}"
        except Exception as err:  # noqa: BLE001 - what the unbounded parser did
            out["outcome"] = f"{type(err).__name__}: {str(err)[:60]}"
        out["seconds"] = time.perf_counter() - start
    out["peak_mb"] = peak_mb()
    return out


def run_probe(kind: str, *args: str, timeout: float = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), _ROOT) if p)}
    try:
        done = subprocess.run([sys.executable, __file__, "--probe", kind, *args], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"not finished in {timeout:.0f} s", "seconds": float("nan"), "peak_mb": float("nan")}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"outcome": f"exit status {done.returncode} ({last[:60]})", "seconds": float("nan"),
                "peak_mb": float("nan")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def shards(directory: str) -> dict[str, tuple[str, str]]:
    """Ordinary shards of the bundled corpus and the hostile ones, by name: (path, format)."""
    from jobs import sample_corpus as corpus
    from tests.support import hostile

    def path(name: str) -> str:
        return os.path.join(directory, name)

    corpus.write_caption_parquet(path("captions.parquet"), corpus.caption_samples(2000))
    corpus.write_obelics(path("documents.parquet"), corpus.documents(500))
    corpus.write_webdataset(path("captions.tar"), corpus.caption_samples(2000))
    hostile.zero_cells_parquet(path("zeros.parquet"), 100, 10_000_000)
    hostile.repeated_cells_parquet(path("repeated.parquet"), 100, 10_000_000)
    hostile.sparse_member_tar(path("sparse.tar"), 500_000_000)
    return {"bundled captions, Parquet (2,000)": (path("captions.parquet"), "parquet"),
            "bundled documents, OBELICS (500)": (path("documents.parquet"), "obelics"),
            "bundled captions, tar (2,000)": (path("captions.tar"), "webdataset"),
            "100 x 10 MB zeros, Parquet (33 KB)": (path("zeros.parquet"), "parquet"),
            "100 x one 10 MB value, dictionary": (path("repeated.parquet"), "parquet"),
            "tar, sparse member of 500 MB (3 KB)": (path("sparse.tar"), "webdataset")}


def table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    print(f"| {'input':40s} | {'s':>8s} | {'peak MB':>8s} | outcome")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|{'-' * 40}")
    for name, r in rows:
        print(f"| {name:40s} | {r['seconds']:8.3f} | {r['peak_mb']:8.0f} | {r['outcome']}")


def ordinary_cost(files: dict[str, tuple[str, str]], repeats: int) -> None:
    """Reading and plan+decode throughput on the bundled corpus, best of `repeats`."""
    from jobs import sample_corpus as corpus
    from pipeline.io.samples import read_samples

    print(f"\nOrdinary data, in this process (best of {repeats})")
    print(f"| {'work':48s} | {'per s':>9s} |")
    print(f"|{'-' * 50}|{'-' * 11}|")
    for name, (path, fmt) in list(files.items())[:3]:
        n = sum(1 for _ in read_samples(path, fmt))
        best = min(_timed(list, read_samples(path, fmt)) for _ in range(repeats))
        print(f"| {'read: ' + name:48s} | {n / best:9.0f} |")
    processor = qwen_processor()
    captions = [([None, c["caption"]], [c["image"], None], "caption") for c in corpus.caption_samples(500, seed=9)]
    documents = [(d["texts"], d["images"], "interleaved") for d in corpus.documents(200, seed=9)]
    photos = [([None, "a photo"], [_jpeg(side, progressive=side % 2 == 0), None], "caption")
              for side in (511, 512, 1023, 1024) for _ in range(10)]
    for name, samples in (("plan: bundled captions (500)", captions), ("plan: bundled documents (200)", documents),
                          ("plan + decode: bundled captions (500)", captions),
                          ("plan + decode: bundled documents (200)", documents),
                          ("plan + decode: photos 0.26-1 MP, half progressive (40)", photos)):
        decode = not name.startswith("plan:")
        best = min(_timed(_prepare, processor, samples, decode) for _ in range(repeats))
        print(f"| {name:48s} | {len(samples) / best:9.0f} |")


def _prepare(processor, samples: list[tuple], decode: bool) -> None:
    for texts, images, kind in samples:
        planned = processor.plan(texts, images, kind)
        if decode:
            processor.decode(planned)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the slowest hostile inputs")
    parser.add_argument("--ordinary-only", action="store_true", help="only the bounds' cost on ordinary data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan-bomb-side", type=int, default=2000)
    parser.add_argument("--scan-bomb-scans", type=int, default=1000)
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1:])))
        return
    with tempfile.TemporaryDirectory(prefix="unifilter-bounds-") as directory:
        files = shards(directory)
        if args.ordinary_only:
            ordinary_cost(files, args.repeats)
            return
        table("Reading a whole shard (read_samples), each in a fresh process",
              [(name, run_probe("read", path, fmt)) for name, (path, fmt) in files.items()])
        plans = [("bundled caption", ("caption",)), ("caption of 240,000 characters of prose", ("long-caption",)),
                 ("caption: 8 MB without a space", ("unspaced", "8000000", "latin")),
                 ("caption: 12 MB of CJK without punctuation", ("unspaced", "4000000", "cjk")),
                 ("document of 600,000 one-word segments", ("segments", "600000")),
                 ("progressive JPEG, 4000 px, 10 scans", ("progressive-jpeg", "4000")),
                 (f"scan bomb, {args.scan_bomb_side} px, {args.scan_bomb_scans} more scans",
                  ("scan-bomb", str(args.scan_bomb_side), str(args.scan_bomb_scans)))]
        if args.quick:
            plans = [p for p in plans if p[1][0] not in ("segments", "scan-bomb")]
        table("Planning and decoding one sample (Qwen2.5 vocabulary, 4096 tokens), each in a fresh process",
              [(name, run_probe("plan", *a)) for name, a in plans])
        table("--where parsed and evaluated, each in a fresh process",
              [(name, run_probe("where", name)) for name in ("9000-ors", "401-digits", "int-1e20")])
        ordinary_cost(files, args.repeats)


if __name__ == "__main__":
    main()
