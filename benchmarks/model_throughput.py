"""Samples/s of `UniFilter.score()` at several batch sizes and precisions, side by side in one run.

    python benchmarks/model_throughput.py                       # CPU: the tiny config
    python benchmarks/model_throughput.py --device cuda --configs qwen2.5-0.5b,qwen2.5-1.5b

On a GPU it compares the original scoring scripts' settings (fp16, batch 4) with bf16 at large batches (SDPA
fused attention), and reports achieved TFLOP/s (an analytic count of the matmul FLOPs: vision tower, projector,
LLM with causal attention) against the peak given by --peak-tflops. Weights are random: speed does not depend
on them. Inputs are pre-encoded, so this measures the model alone (see benchmarks/ for the pipeline).
"""

from __future__ import annotations

import argparse
import io
import random
import time

import torch
from PIL import Image

from model.checkpoint import build
from model.create import config_and_tokenizer
from model.processing import UniFilterProcessor

WORDS = "a red blue small large dog cat car tree house street photo of the with in on near two three".split()


def make_samples(n: int, kind: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def image() -> bytes:
        buf = io.BytesIO()
        size = (rng.randint(200, 640), rng.randint(200, 640))
        Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3))).save(buf, "JPEG")
        return buf.getvalue()

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    samples = []
    for _ in range(n):
        if kind == "caption":
            samples.append({"texts": [None, words(rng.randint(10, 40))], "images": [image(), None],
                            "kind": "caption"})
        else:
            texts, images = [], []
            for _ in range(rng.randint(2, 4)):
                texts += [words(rng.randint(60, 200)), None]
                images += [None, image()]
            samples.append({"texts": texts, "images": images, "kind": "interleaved"})
    return samples


def forward_flops(config, n_tokens: int, n_images: int) -> float:
    """Matmul FLOPs of one sample's forward pass (2 per multiply-add; causal attention counted once)."""
    v, t = config.vision, config.text
    tv = config.grid_size**2
    dv, iv = v["hidden_size"], v["intermediate_size"]
    vision = v["num_hidden_layers"] * (2 * tv * (4 * dv * dv + 2 * dv * iv) + 4 * tv * tv * dv)
    vision += 2 * tv * 3 * v["patch_size"] ** 2 * dv
    d, inter = t["hidden_size"], t["intermediate_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    projector = 2 * config.tokens_per_image * (dv * d + d * d)
    llm = t["num_hidden_layers"] * (2 * n_tokens * (2 * d * d + 2 * d * kv + 3 * d * inter) + 2 * n_tokens**2 * d)
    return n_images * (vision + projector) + llm


def run(config_name: str, device: str, dtype: torch.dtype, batch_size: int, encoded, warmup: int = 2,
        min_seconds: float = 3.0) -> tuple[float, float]:
    config, tokenizer = config_and_tokenizer(config_name)
    net, processor = build(config, tokenizer)
    net.to(device=device, dtype=dtype)
    samples = encoded[config_name]
    batches = [processor.collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    batches = [b for b in batches if b["input_ids"].shape[0] == batch_size] or batches
    flops_per_batch = [sum(forward_flops(config, int(m.sum()), 0) for m in b["attention_mask"])
                       + b["pixel_values"].shape[0] * forward_flops(config, 0, 1) for b in batches]

    def step(i):
        b = batches[i % len(batches)]
        out = net.score(**{k: v.to(device, non_blocking=True) for k, v in b.items()})
        return out["score"]

    for i in range(warmup):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    n = flops = 0
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < min_seconds or i < 3:
        step(i)
        n += batches[i % len(batches)]["input_ids"].shape[0]
        flops += flops_per_batch[i % len(batches)]
        i += 1
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return n / elapsed, flops / elapsed / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=None, help="comma-separated named configs")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes for the best settings")
    parser.add_argument("--kinds", default="caption,interleaved")
    parser.add_argument("--n", type=int, default=None, help="samples per kind")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak of the GPU")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    args = parser.parse_args()

    gpu = args.device == "cuda"
    configs = (args.configs or ("qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny")).split(",")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("32,64,128" if gpu else "4,16,64")).split(",")]
    n = args.n or (512 if gpu else 128)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for kind in args.kinds.split(","):
        raw = make_samples(n, kind)
        encoded = {}
        for name in configs:
            proc = UniFilterProcessor(*config_and_tokenizer(name))
            encoded[name] = [proc.encode(s["texts"], s["images"], s["kind"]) for s in raw]
        for name in configs:
            orig = "original: fp16" if gpu else "original batch, fp32"
            settings = [(f"{orig}, batch 4", torch.float16 if gpu else torch.float32, 4)]
            settings += [(f"bf16, batch {b}" if gpu else f"fp32, batch {b}",
                          torch.bfloat16 if gpu else torch.float32, b)
                         for b in batch_sizes]
            if kind == "interleaved":
                settings[0] = (f"{orig}, batch 1", settings[0][1], 1)
            base = None
            for label, dtype, bs in settings:
                rate, tflops = run(name, args.device, dtype, bs, encoded, min_seconds=args.seconds)
                if gpu:
                    torch.cuda.empty_cache()
                base = base or rate
                rows.append((kind, name, label, rate, rate / base, tflops))
                print(f"  {kind:11s} {name:13s} {label:26s} {rate:9.1f}/s", flush=True)

    print(f"\ndevice: {torch.cuda.get_device_name() if gpu else 'cpu'}; peak for %: {args.peak_tflops} TFLOP/s")
    print(f"| {'kind':11s} | {'model':13s} | {'settings':26s} | {'samples/s':>9s} | {'x original':>10s} "
          f"| {'TFLOP/s':>8s} | {'% peak':>6s} |")
    print(f"|{'-' * 13}|{'-' * 15}|{'-' * 28}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for kind, name, label, rate, ratio, tflops in rows:
        pct = f"{100 * tflops / args.peak_tflops:5.1f}%" if gpu else "   n/a"
        print(f"| {kind:11s} | {name:13s} | {label:26s} | {rate:9.1f} | {ratio:10.2f} | {tflops:8.3f} | {pct} |")


if __name__ == "__main__":
    main()
