"""The embedded default, end to end on a local Ray instance: synth -> train -> score.

    python -m jobs.demo [--workdir DIR] [--epochs N]

It draws a corpus of image-caption pairs (webdataset tars) and interleaved documents (OBELICS Parquet), writes
training pairs at the four quality levels with the offline generator, trains a `tiny` model on them with Ray Train
for a couple of CPU minutes, scores both inputs with `jobs.score`'s pipeline, and prints every summary.
Rerunning it resumes each step (committed shards, the training run's checkpoints).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs._config import connect_ray

NOTE = """\
What these scores mean: a score is the predicted quality level on 0 (easy negative) .. 3 (high quality), and
`label` is that level rounded. The demo's model is the `tiny` config (0.18M parameters) trained from
scratch for {epochs} epochs on CPU on the synthetic pairs above (its held-out accuracy is printed there; chance
is 25%): it has learned something about the drawn scenes, not about real web data, so read these scores as a
demonstration of the pipeline, not as quality judgements. For real curation, score with the released UniFilter
(`python -m model.convert --llava weizhiwang/UniFilter-Qwen2.5-1.5B --output DIR`) or a model trained with
jobs.train on your own pairs."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo-output", help="where the corpus, pairs, model and scores go")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the tiny model")
    args = parser.parse_args(argv)

    import pyarrow.compute as pc

    from pipeline import synth, training
    from pipeline.corpus import write_sample_corpus
    from pipeline.scoring import ScoreConfig, format_summary, score_dataset
    from pipeline.sinks import read_scores

    work = Path(args.workdir).resolve()
    corpus_dir, pairs_dir, run_dir = work / "corpus", work / "pairs", work / "training"
    if not (corpus_dir / "captions").is_dir():
        inputs = write_sample_corpus(str(corpus_dir))
        print(f"[demo] wrote the sample corpus to {corpus_dir}")
    else:
        inputs = {"webdataset": str(corpus_dir / "captions"), "obelics": str(corpus_dir / "documents")}

    connect_ray()
    print("[demo] 1/3 synthetic training pairs (offline generator)")
    for fmt in ("webdataset", "obelics"):
        summary = synth.synthesize(synth.SynthConfig(input=inputs[fmt], format=fmt, output=str(pairs_dir),
                                                     val_fraction=0.15))
        print(synth.format_summary(summary))
    print("[demo] 2/3 training a tiny model on them with Ray Train (CPU)")
    summary = training.train_classifier(training.TrainConfig(
        train=str(pairs_dir / "train"), val=str(pairs_dir / "val"), output=str(run_dir), epochs=args.epochs,
        batch_size=32, train_vision=True, name="demo"))
    print(training.format_summary(summary))
    model_dir = summary["best"]

    print("[demo] 3/3 scoring the corpus")
    exit_code = 0
    for fmt, name in (("webdataset", "captions"), ("obelics", "documents")):
        config = ScoreConfig(input=inputs[fmt], format=fmt, output=str(work / "scores" / name), model=str(model_dir))
        summary = score_dataset(config)
        print(format_summary(summary))
        table = read_scores(config.output)
        scored = table.filter(pc.is_valid(table.column("score")))
        if scored.num_rows:
            labels = pc.value_counts(scored.column("label")).to_pylist()
            dist = ", ".join(f"level {d['values']}: {d['counts']}" for d in sorted(labels, key=lambda d: d["values"]))
            print(f"  scores     mean {pc.mean(scored.column('score')).as_py():.3f} · min "
                  f"{pc.min(scored.column('score')).as_py():.3f} · max {pc.max(scored.column('score')).as_py():.3f}"
                  f" · {dist}\n")
        exit_code = exit_code or (1 if summary["shards"]["incomplete"] else 0)
    print(NOTE.format(epochs=args.epochs))
    print(f"\n[demo] outputs under {work / 'scores'}: scores/*.parquet, _manifest/, summary.json")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
