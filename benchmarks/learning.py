"""Does the classifier learn? The offline generator over procedurally drawn scenes (captions name colours,
shapes, counts and positions; documents interleave such scenes), a few thousand origins, the `tiny` model
trained on CPU within a time budget; held-out level accuracy and Spearman per kind and per level.

    python benchmarks/learning.py [--captions 2400] [--documents 600] [--minutes 14] [--num-labels 4|1]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import ray

from jobs import sample_corpus as corpus
from pipeline.synth import SynthConfig, synthesize
from pipeline.training import TrainConfig, format_summary, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=2400, help="caption origins")
    parser.add_argument("--documents", type=int, default=600, help="interleaved-document origins")
    parser.add_argument("--minutes", type=float, default=14.0, help="training budget (sets the epoch count)")
    parser.add_argument("--samples-per-s", type=float, default=175.0,
                        help="expected training speed incl. validation (measured on 2 cores), for the epoch count")
    parser.add_argument("--num-labels", type=int, default=4, choices=(1, 4),
                        help="4: cross-entropy (learns the tiny task faster); 1: the released recipe's regression")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation and shuffling)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-learning-")
    ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")

    start = time.time()
    per_shard = 200
    for k in range(0, args.captions, per_shard):
        captions = corpus.caption_samples(min(per_shard, args.captions - k), seed=1000 + k, prefix=f"c{k}-")
        corpus.write_webdataset(os.path.join(work, "captions", f"{k // per_shard:04d}.tar"), captions)
    for k in range(0, args.documents, per_shard):
        corpus.write_obelics(os.path.join(work, "documents", f"{k // per_shard:04d}.parquet"),
                             corpus.documents(min(per_shard, args.documents - k), seed=5000 + k, prefix=f"d{k}-"))
    pairs = os.path.join(work, "pairs")
    synth = [synthesize(SynthConfig(input=os.path.join(work, name), format=fmt, output=pairs, val_fraction=0.1,
                                    concurrency=2), progress=False)
             for name, fmt in (("captions", "webdataset"), ("documents", "obelics"))]
    synth_s = time.time() - start
    n_pairs = sum(s["synth"]["pairs_this_run"] for s in synth)
    print(f"[learning] {args.captions} caption + {args.documents} document origins -> {n_pairs} pairs in "
          f"{synth_s:.1f} s ({n_pairs / synth_s:.1f} pairs/s, corpus drawing included); balance: "
          f"{[s['synth']['level_balance'] for s in synth]}", flush=True)

    n_train = sum(sum(s["synth"]["level_balance"]["train"].values()) for s in synth)
    epochs = max(1, math.floor(args.minutes * 60 * args.samples_per_s / n_train))
    config = TrainConfig(train=os.path.join(pairs, "train"), val=os.path.join(pairs, "val"),
                         output=os.path.join(work, "run"), epochs=epochs, batch_size=32, lr=args.lr,
                         warmup_ratio=0.05, train_vision=True, num_labels=args.num_labels, cpus_per_worker=1.0,
                         seed=args.seed)
    summary = train_classifier(config)
    print(format_summary(summary))
    print(f"[learning] {epochs} epochs over {n_train} training pairs in {summary['elapsed_s']:.0f} s "
          f"(budget {args.minutes:.0f} min); held-out pairs: {summary['best_metrics']['val_samples']}")


if __name__ == "__main__":
    main()
