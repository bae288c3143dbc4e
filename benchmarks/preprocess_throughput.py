"""Image preprocessing on one core: ours (decode, pad to square, bicubic resize to uint8; normalised later on the
device) against transformers' `SiglipImageProcessor` (decode, resize, rescale, normalise to float32) on the same
JPEGs, side by side in one run, with the outputs checked equal within tolerance.

    python benchmarks/preprocess_throughput.py [--n 300] [--size 384]
"""

from __future__ import annotations

import argparse
import io
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
