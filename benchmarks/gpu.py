"""`make bench-gpu`: what one GPU does, in one command (under 8 minutes on an H100/H200), as a JSON file and a table.

    python benchmarks/gpu.py                      # on a machine with a GPU: the real-size configs
    python benchmarks/gpu.py --device cpu         # anywhere: the tiny config, to exercise the same code paths

1. The model alone: the original scoring scripts' settings (fp16, batch 4; documents batch 1) against ours (bf16
   with an fp32 head, token-budget batches), per config (qwen2.5-0.5b and qwen2.5-1.5b on GPU).
2. `jobs.score` end to end on generated shards (one local Ray instance, one GPU): captions/s and documents/s per
   GPU, whole job and after start-up.
3. Training: samples/s of the training loop (bf16 autocast, gradient checkpointing as the job defaults it, token-
   budget micro-batches) on one device, without Ray Train's start-up.

Weights are random (speed does not depend on them); images are drawn at web sizes and resized like real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.model_throughput import make_samples, run  # noqa: E402
from model.checkpoint import config_and_tokenizer, create  # noqa: E402
from model.processing import UniFilterProcessor  # noqa: E402


def model_rows(configs: list[str], device: str, seconds: float, n: int) -> list[dict]:
    gpu = device == "cuda"
    rows = []
    for kind in ("caption", "interleaved"):
        raw = make_samples(n, kind)
        for name in configs:
            processor = UniFilterProcessor(*config_and_tokenizer(name))
            encoded = {name: [processor.encode(s["texts"], s["images"], s["kind"]) for s in raw]}
            original = (torch.float16 if gpu else torch.float32, 4 if kind == "caption" else 1)
            ours = (torch.bfloat16 if gpu else torch.float32, 128 if kind == "caption" else 16)
            base = None
            for label, (dtype, batch) in (("original", original), ("ours", ours)):
                rate, tflops = run(name, device, dtype, batch, encoded, min_seconds=seconds)
                base = base or rate
                rows.append({"part": "model", "kind": kind, "config": name, "settings":
                             f"{label}: {str(dtype).removeprefix('torch.')}, batch {batch}",
                             "samples_per_s": round(rate, 1), "x_original": round(rate / base, 2),
                             "tflops": round(tflops, 2)})
                print(f"  model {kind:11s} {name:13s} {label:9s} {rate:9.1f}/s", flush=True)
                if gpu:
                    torch.cuda.empty_cache()
    return rows


def score_rows(config: str, device: str, n_captions: int, n_docs: int, work: str) -> list[dict]:
    from jobs import sample_corpus as corpus
    from pipeline.runner.cluster import connect
    from pipeline.scoring import ScoreConfig, score_dataset

    model_dir = os.path.join(work, f"model-{config}")
    create(config, model_dir, dtype="bfloat16" if device == "cuda" else "float32")
    per_shard = 256 if device == "cuda" else 32
    caps = corpus.caption_samples(n_captions, seed=1)
    for k in range(0, n_captions, per_shard):
        corpus.write_webdataset(os.path.join(work, "caps", f"{k // per_shard:05d}.tar"), caps[k:k + per_shard])
    docs = corpus.documents(n_docs, seed=2)
    for k in range(0, n_docs, per_shard // 4):
        corpus.write_obelics(os.path.join(work, "docs", f"{k:05d}.parquet"), docs[k:k + per_shard // 4])
    connect(verbose=False, job="bench")
    rows = []
    for kind, fmt, folder in (("caption", "webdataset", "caps"), ("interleaved", "obelics", "docs")):
        started = time.perf_counter()
        summary = score_dataset(ScoreConfig(input=os.path.join(work, folder), format=fmt, model=model_dir,
                                            output=os.path.join(work, f"out-{folder}"),
                                            gpus_per_actor=1.0 if device == "cuda" else 0.0), progress=False)
        elapsed = time.perf_counter() - started
        samples = summary["records"]["this_run"]
        rows.append({"part": "jobs.score", "kind": kind, "config": config, "samples": samples,
                     "samples_per_s": round(samples / elapsed, 1),
                     "steady_samples_per_s": summary["timing"].get("steady_records_per_s"),
                     "micro_batch_rows": summary["score"]["micro_batch_rows"], "seconds": round(elapsed, 1)})
        print(f"  jobs.score {kind:11s} {config}: {rows[-1]['samples_per_s']}/s whole job, "
              f"{rows[-1]['steady_samples_per_s']}/s after start-up", flush=True)
    return rows


def train_rows(config: str, device: str, steps: int, work: str) -> list[dict]:
    import pyarrow as pa

    from jobs import sample_corpus as corpus
    from pipeline.training import TrainConfig
    from pipeline.training.data import encode_pairs
    from pipeline.training.loop import TrainLoop

    base = os.path.join(work, f"model-{config}")
    if not os.path.exists(os.path.join(base, "config.json")):
        create(config, base, dtype="bfloat16" if device == "cuda" else "float32")
    samples = corpus.caption_samples(16 * 4, seed=3)
    pairs = pa.table({"id": [s["key"] for s in samples], "kind": ["caption"] * len(samples),
                      "texts": [[None, s["caption"]] for s in samples],
                      "images": [[s["image"], None] for s in samples],
                      "label": pa.array([i % 4 for i in range(len(samples))], pa.int8())})
    batch = encode_pairs(pairs, base)
    cfg = TrainConfig(train="t", val="v", output=work, batch_size=16, model_config=config, init=base)
    loop = TrainLoop(cfg, base, total_steps=steps + 2, device=device).setup(None)
    batches = [batch.slice(16 * (i % 4), 16) for i in range(steps + 2)]
    loop.train_epoch(batches[:2])  # warm
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    stats = loop.train_epoch(batches[2:])
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    rate = stats["seen"] / elapsed
    print(f"  training {config}: {rate:.1f} samples/s", flush=True)
    return [{"part": "training", "kind": "caption", "config": config, "samples_per_s": round(rate, 1),
             "gradient_checkpointing": cfg.checkpointing_on(device == "cuda"), "steps": steps}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-gpu.json", help="where the JSON results go")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    configs = ["qwen2.5-0.5b", "qwen2.5-1.5b"] if gpu else ["tiny"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = tempfile.mkdtemp(prefix="bench-gpu-")
    device_name = torch.cuda.get_device_name() if gpu else "cpu (GPU rows unmeasured: no GPU here)"
    print(f"device: {device_name}", flush=True)
    started = time.time()
    rows = model_rows(configs, args.device, seconds=5.0 if gpu else 1.0, n=256 if gpu else 64)
    rows += score_rows(configs[0], args.device, 4096 if gpu else 128, 512 if gpu else 32, work)
    rows += train_rows(configs[0], args.device, steps=20 if gpu else 4, work=work)
    result = {"device": device_name, "elapsed_s": round(time.time() - started, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| part | kind | config | settings | samples/s | x original / after start-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = r.get("x_original", r.get("steady_samples_per_s", ""))
        print(f"| {r['part']} | {r['kind']} | {r['config']} | {r.get('settings', '')} | {r['samples_per_s']} | "
              f"{extra} |")
    print(f"\n{len(rows)} rows in {result['elapsed_s']} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
