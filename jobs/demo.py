"""The embedded default, end to end on a local Ray instance: synth -> train -> score -> curate -> report.

    python -m jobs.demo [--workdir DIR] [--epochs N] [--keep-fraction F]

It draws a corpus of image-caption pairs (webdataset tars) and interleaved documents (OBELICS Parquet), writes
training pairs at the four quality levels with the offline generator, trains a `tiny` model on them with Ray Train
for a few CPU minutes, then scores a held-out corpus whose quality levels are known (pairs drawn from other scenes),
curates it (the best-scored share of each kind, written back as shards) and writes the HTML report. Rerunning it
resumes each step (committed shards, the training run's checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

NOTE = """\
What these scores mean: a score is the predicted quality level on 0 (easy negative) .. 3 (high quality). The
demo's model is the `tiny` config (0.18M parameters) trained from scratch for {epochs} epochs on CPU on the
synthetic pairs above: it has learned something about the drawn scenes, not about real web data, so read its
scores as a demonstration of the pipeline, not as quality judgements. For real curation, score with the released
UniFilter (`python -m model.convert --llava weizhiwang/UniFilter-Qwen2.5-1.5B --output DIR`) or a model trained
with jobs.train on your own pairs."""


def _held_out_corpus(work: Path, synth) -> tuple[dict[str, str], dict[str, int]]:
    """Scenes the model never saw, at all four levels: offline pairs of a fresh draw, written as a corpus to score.
    Returns {format: input URI} and each sample's true level by id."""
    import pyarrow.parquet as pq

    from jobs.sample_corpus import write_held_out_corpus, write_sample_corpus

    origins = work / "heldout" / "origins"
    if not (origins / "captions").is_dir():
        write_sample_corpus(str(origins), n_captions=60, n_documents=24, per_shard=20, seed=1000)
    pairs = work / "heldout" / "pairs"
    for fmt, name in (("webdataset", "captions"), ("obelics", "documents")):
        synth.synthesize(synth.SynthConfig(input=str(origins / name), format=fmt, output=str(pairs),
                                           val_fraction=0.0), progress=False)
    table = pq.read_table(pairs / "train", columns=["id", "kind", "texts", "images", "label"])
    levels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    return write_held_out_corpus(str(work / "heldout" / "corpus"), table), levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo-output", help="where the corpus, pairs, model and scores go")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the tiny model")
    parser.add_argument("--keep-fraction", type=float, default=0.5, help="share of each kind the curation keeps")
    args = parser.parse_args(argv)
    started = time.time()

    from jobs.sample_corpus import write_sample_corpus
    from pipeline import synth, training
    from pipeline.curation import CurateConfig, CurationJob
    from pipeline.runner import format_summary, run_job
    from pipeline.runner.cluster import connect
    from pipeline.scoring import ScoreConfig, ScoringJob, read_scores

    work = Path(args.workdir).resolve()
    corpus_dir, pairs_dir, run_dir = work / "corpus", work / "pairs", work / "training"
    if not (corpus_dir / "captions").is_dir():
        inputs = write_sample_corpus(str(corpus_dir))
        print(f"[demo] wrote the sample corpus to {corpus_dir}")
    else:
        inputs = {"webdataset": str(corpus_dir / "captions"), "obelics": str(corpus_dir / "documents")}

    connect()
    print("[demo] 1/5 synthetic training pairs (offline generator)")
    for fmt in ("webdataset", "obelics"):
        job = synth.SynthJob(synth.SynthConfig(input=inputs[fmt], format=fmt, output=str(pairs_dir), val_fraction=0.15))
        print(format_summary(job, run_job(job)))
    print("[demo] 2/5 training a tiny model on them with Ray Train (CPU)")
    summary = training.train_classifier(training.TrainConfig(
        train=str(pairs_dir / "train"), val=str(pairs_dir / "val"), output=str(run_dir), epochs=args.epochs,
        batch_size=32, train_vision=True, name="demo", use_gpu=False))  # a tiny model: CPU wherever it runs
    print(training.format_summary(summary))
    model_dir = summary["best"]

    print("[demo] 3/5 scoring a held-out corpus of known quality levels")
    held_out, levels = _held_out_corpus(work, synth)
    scores = work / "scores"
    exit_code = 0
    for fmt in ("webdataset", "obelics"):  # both kinds into one output: curation compares within each kind
        job = ScoringJob(ScoreConfig(input=held_out[fmt], format=fmt, output=str(scores), model=model_dir,
                                     gpus_per_actor=0))
        summary = run_job(job)
        print(format_summary(job, summary))
        exit_code = exit_code or (1 if summary["shards"]["incomplete"] else 0)
    by_level: dict[int, list[float]] = defaultdict(list)
    for row in read_scores(str(scores)).to_pylist():
        if row["score"] is not None and row["id"] in levels:
            by_level[levels[row["id"]]].append(row["score"])
    means = {level: sum(v) / len(v) for level, v in sorted(by_level.items())}
    print("  held-out   mean score by true level: " + " · ".join(f"L{lv} {m:.3f}" for lv, m in means.items()))

    print(f"[demo] 4/5 curating: the best {args.keep_fraction:.0%} of each kind, written back as shards")
    config = CurateConfig(scores=str(scores), output=str(work / "curated"), keep_fraction=args.keep_fraction,
                          per_kind=True, materialize=True, report=str(work / "report"))
    job = CurationJob(config)
    summary = run_job(job, progress=False)
    curated = summary["curate"]
    print(format_summary(job, summary))
    print("[demo] 5/5 the report")
    report = job.report_uri  # the curation run wrote it (`report`)
    (work / "demo_summary.json").write_text(json.dumps({
        "held_out_mean_score_by_level": means, "kept": curated["kept"], "scored": curated["scored"],
        "thresholds": curated["thresholds"], "report": report, "elapsed_s": round(time.time() - started, 1)},
        indent=2))
    print(NOTE.format(epochs=args.epochs))
    print(f"\n[demo] report: {report}")
    print(f"[demo] kept {curated['kept']} of {curated['scored']} held-out samples ({curated['kept_fraction']:.0%}; "
          f"mean true level of the kept {_mean_level(work, levels):.2f} vs {_mean(levels.values()):.2f} overall) as "
          f"shards in {work / 'curated' / 'shards'}")
    return exit_code


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _mean_level(work: Path, levels: dict[str, int]) -> float:
    from pipeline.commit.records import read_committed
    from pipeline.curation import SELECTED_SCHEMA

    kept = read_committed(str(work / "curated"), SELECTED_SCHEMA).column("id").to_pylist()
    return _mean(levels[i] for i in kept if i in levels)


if __name__ == "__main__":
    sys.exit(main())
