"""The Ray scoring pipeline against a bare single-process loop over the same data, in the same run, and the peak
memory of the driver and the Ray workers at 1x and 4x the corpus size.

    python benchmarks/pipeline_throughput.py [--samples 2000] [--model DIR]

The bare loop reads each shard, encodes every sample with the same processor and scores token-budget batches
with the same model in this one process: the floor any distributed pipeline must beat once start-up (Ray,
actor pools) is amortised. Memory is sampled every 0.1 s from /proc (resident set sizes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import ray

import model as unifilter
from jobs import sample_corpus as corpus
from model.processing import SampleError
from pipeline.encoded import token_budget_batches
from pipeline.io.listing import list_shards
from pipeline.io.samples import read_samples
from pipeline.scoring import ScoreConfig, score_dataset


def write_corpus(root: str, samples: int, per_shard: int = 100) -> str:
    for k in range(0, samples, per_shard):
        corpus.write_webdataset(os.path.join(root, f"{k // per_shard:05d}.tar"),
                                corpus.caption_samples(min(per_shard, samples - k), seed=k, prefix=f"s{k}-"))
    return root


def bare_loop(input_dir: str, model_dir: str, token_budget: int = 8192) -> tuple[int, float]:
    net, processor = unifilter.load(model_dir)
    start = time.perf_counter()
    n = 0
    for shard in list_shards(input_dir, "webdataset").shards:
        encoded = []
        for row in read_samples(shard, "webdataset"):
            if row["error"]:
                continue
            try:
                encoded.append(processor.encode(row["texts"], row["images"], row["kind"]))
            except SampleError:
                pass
        for micro in token_budget_batches([e.n_tokens for e in encoded], token_budget, 256):
            net.score(**processor.collate([encoded[i] for i in micro]))
            n += len(micro)
    return n, time.perf_counter() - start


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _ray_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"ReadStage" in cmd or b"ScoreStage" in cmd:
                pids.append(int(entry))
    return pids


class MemorySampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.driver_peak = self.workers_peak = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            self.driver_peak = max(self.driver_peak, _rss_mb(me))
            self.workers_peak = max(self.workers_peak, sum(_rss_mb(p) for p in _ray_worker_pids()))
            time.sleep(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def ray_pipeline(input_dir: str, output: str, model_dir: str) -> tuple[int, float, float, MemorySampler]:
    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    summary = score_dataset(ScoreConfig(input=input_dir, format="webdataset", output=output, model=model_dir),
                            progress=False)
    elapsed = time.perf_counter() - start
    sampler.stop()
    return summary["records"]["this_run"], elapsed, summary["timing"].get("steady_records_per_s"), sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="corpus size at 1x")
    parser.add_argument("--model", default=None, help="checkpoint (default: a random tiny one)")
    parser.add_argument("--scales", default="1,4", help="corpus sizes as multiples of --samples")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    model_dir = args.model
    if model_dir is None:
        from model.create import create

        model_dir = os.path.join(work, "model")
        create("tiny", model_dir)
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False

    # Warm the actor code path once so both scales pay the same (small) start-up.
    warm = write_corpus(os.path.join(work, "warm"), 100)
    ray_pipeline(warm, os.path.join(work, "warm-out"), model_dir)

    rows = []
    for scale in [int(x) for x in args.scales.split(",")]:
        n = args.samples * scale
        data = write_corpus(os.path.join(work, f"in{scale}"), n)
        bare_n, bare_s = bare_loop(data, model_dir)
        ray_n, ray_s, steady, mem = ray_pipeline(data, os.path.join(work, f"out{scale}"), model_dir)
        assert ray_n == bare_n == n, (ray_n, bare_n, n)
        rows.append((scale, n, bare_n / bare_s, ray_n / ray_s, steady, mem.driver_peak, mem.workers_peak))

    print(f"\ncores: {os.cpu_count()}, model: {'tiny (random)' if args.model is None else args.model}")
    print(f"| {'corpus':>9s} | {'bare loop /s':>12s} | {'Ray, whole job /s':>17s} | {'ratio':>5s} | "
          f"{'Ray, steady /s':>14s} | {'ratio':>5s} | {'driver peak MB':>14s} | {'workers peak MB':>15s} |")
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 19}|{'-' * 7}|{'-' * 16}|{'-' * 7}|{'-' * 16}|{'-' * 17}|")
    for scale, n, bare, piped, steady, driver, workers in rows:
        steady = steady or float("nan")
        print(f"| {f'{scale}x {n}':>9s} | {bare:12.1f} | {piped:17.1f} | {piped / bare:5.2f} | {steady:14.1f} | "
              f"{steady / bare:5.2f} | {driver:14.0f} | {workers:15.0f} |")
    first, last = rows[0], rows[-1]
    print(f"memory {last[0]}x vs {first[0]}x: driver {last[5] / first[5]:.2f}x, workers {last[6] / first[6]:.2f}x "
          "(target: flat, within 10%)")
    print("whole job: all samples over the job's wall time, actor start-up included; steady: samples after the "
          "first committed shard over the time after it")


if __name__ == "__main__":
    main()
