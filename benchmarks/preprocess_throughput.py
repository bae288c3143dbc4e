"""Image preprocessing on one core: ours (decode, pad to square, bicubic resize to uint8; normalised later on the
device) against transformers' `SiglipImageProcessor` (decode, resize, rescale, normalise to float32) on the same
JPEGs, side by side in one run, with the outputs checked equal within tolerance; then the memory one decode costs
per image kind (8-bit JPEG, 16-bit PNG, float TIFF, a large JPEG): the peak RSS increase of a fresh process.

    python benchmarks/preprocess_throughput.py [--n 300] [--size 384] [--memory-side 8000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from model.processing import decode_image, prepare_image


def photo_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Square JPEGs (so SigLIP's plain resize and our pad-then-resize see the same pixels) of mixed sizes, with
    smooth gradients and noise so they compress like photos rather than flat colour."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(rng.choice([400, 512, 640, 800, 1024]))
        yy, xx = np.mgrid[0:side, 0:side] / side
        base = np.stack([np.sin(xx * rng.uniform(2, 9)), np.cos(yy * rng.uniform(2, 9)), xx * yy], -1)
        img = (127 + 100 * base + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ours(data: list[bytes], size: int, draft: bool = False) -> list[np.ndarray]:
    return [prepare_image(decode_image(b, draft_size=size if draft else None), size) for b in data]


def siglip(data: list[bytes], size: int, processor) -> list[np.ndarray]:
    return [processor(images=Image.open(io.BytesIO(b)).convert("RGB"), return_tensors="np")["pixel_values"][0]
            for b in data]


def memory_images(directory: str, side: int) -> dict[str, str]:
    """One file per image kind: a 1024 px photo-like JPEG, and `side` x `side` 16-bit PNG, float TIFF and JPEG."""
    yy, xx = np.mgrid[0:side, 0:side]
    paths = {}

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        paths[name] = os.path.join(directory, f"{name.split()[0]}.{fmt.lower()}")
        img.save(paths[name], fmt, **kw)

    with open(os.path.join(directory, "photo.jpeg"), "wb") as f:
        f.write(photo_like_jpegs(1, seed=1)[0])
    paths["8-bit JPEG (photo)"] = f.name
    save("16-bit PNG", Image.frombytes("I;16", (side, side), ((xx * 7 + yy * 3) % 65536).astype("<u2").tobytes()),
         "PNG", compress_level=1)
    save("float TIFF", Image.frombytes("F", (side, side), (((xx + yy) % 1000) / 1000).astype(np.float32).tobytes()),
         "TIFF")
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    save("large 8-bit JPEG", Image.fromarray(rgb), "JPEG", quality=90)
    return paths


def peak_rss_kib() -> int:
    """This process's peak RSS (Linux: VmHWM, which, unlike getrusage's ru_maxrss, a child does not inherit)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def probe(path: str) -> None:
    """(In a fresh process) decode one file: print the peak RSS increase and the time it took."""
    data = open(path, "rb").read()
    before = peak_rss_kib()
    start = time.perf_counter()
    img = decode_image(data)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": (peak_rss_kib() - before) / 1024, "seconds": seconds, "size": img.size}))


def memory_table(side: int) -> None:
    with tempfile.TemporaryDirectory(prefix="unifilter-bench-") as directory:
        paths = memory_images(directory, side)
        print(f"\nMemory of one decode (decode_image, to 8-bit RGB), each in a fresh process: a photo-like JPEG, "
              f"then {side} px squares")
        print(f"| {'image kind':22s} | {'pixels':>11s} | {'peak RSS +MB':>12s} | {'x RGB size':>10s} | {'s':>5s} |")
        print(f"|{'-' * 24}|{'-' * 13}|{'-' * 14}|{'-' * 12}|{'-' * 7}|")
        for name, path in paths.items():
            out = subprocess.run([sys.executable, __file__, "--probe", path], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": _ROOT})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rgb_mb = r["size"][0] * r["size"][1] * 3 / 2**20
            print(f"| {name:22s} | {r['size'][0]:>5d}x{r['size'][1]:<5d} | {r['peak_mb']:12.0f} | "
                  f"{r['peak_mb'] / rgb_mb:10.2f} | {r['seconds']:5.2f} |")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-side", type=int, default=8000, help="side of the large images (0: no memory table)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe)
        return
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from transformers import SiglipImageProcessor

    reference = SiglipImageProcessor(size={"height": args.size, "width": args.size}, resample=Image.BICUBIC,
                                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    data = photo_like_jpegs(args.n)

    # Equality: our uint8 output normalised as the model does it on the device, against SigLIP's float output.
    theirs = siglip(data[:100], args.size, reference)
    agreement = {}
    for draft in (False, True):
        mine = ours(data[:100], args.size, draft)
        diffs = [np.abs(m.astype(np.float32) / 127.5 - 1.0 - t) for m, t in zip(mine, theirs)]
        agreement[draft] = (max(d.max() for d in diffs) * 127.5, float(np.mean([d.mean() for d in diffs])) * 127.5)

    rows = []
    for name, fn in (("SiglipImageProcessor", lambda: siglip(data, args.size, reference)),
                     ("ours (exact)", lambda: ours(data, args.size)),
                     ("ours (jpeg_draft)", lambda: ours(data, args.size, draft=True))):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rows.append((name, args.n / best))
    base = rows[0][1]
    print(f"\n{args.n} JPEGs ({'/'.join(['400', '512', '640', '800', '1024'])} px squares) -> {args.size} px, one core")
    print(f"| {'preprocessing':26s} | {'images/s':>9s} | {'x SigLIP':>8s} | {'max diff':>8s} | {'mean diff':>9s} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for (name, rate), diff in zip(rows, [(0.0, 0.0), agreement[False], agreement[True]]):
        print(f"| {name:26s} | {rate:9.1f} | {rate / base:8.2f} | {diff[0]:8.2f} | {diff[1]:9.3f} |")
    print("(diffs against SiglipImageProcessor's output, in grey levels of 255, on the first 100 images)")
    assert agreement[False][0] <= 1.0, "exact preprocessing disagrees with SiglipImageProcessor"
    assert agreement[True][1] <= 1.0, "jpeg_draft preprocessing differs by more than one grey level on average"
    if args.memory_side:
        memory_table(args.memory_side)


if __name__ == "__main__":
    main()
