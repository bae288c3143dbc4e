"""The embedded default: a bundled sample corpus scored end to end on a local Ray instance with a tiny model.

    python -m jobs.demo [--workdir DIR]

It draws a corpus of image-caption pairs (webdataset tars) and interleaved documents (OBELICS Parquet), writes a
random-initialised `tiny` checkpoint, scores both inputs with `jobs.score`'s pipeline and prints the summaries.
Rerunning it resumes: committed shards are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs._config import connect_ray

UNTRAINED_NOTE = """\
What these scores mean: the demo's model is the `tiny` config with RANDOM weights (nothing can be downloaded
here, and no training ran), so its scores carry no judgement of quality yet; they only show that every sample
went through decoding, tokenization and the model and came back exactly once. With a trained or released
checkpoint (`--model` of jobs.score; `python -m model.convert` for the released UniFilter), a score is the
predicted quality level on 0 (easy negative) .. 3 (high quality), and `label` is that level rounded."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo-output", help="where the corpus, model and scores go")
    args = parser.parse_args(argv)

    import pyarrow.compute as pc

    from model.create import create
    from pipeline.corpus import write_sample_corpus
    from pipeline.scoring import ScoreConfig, format_summary, score_dataset
    from pipeline.sinks import read_scores

    work = Path(args.workdir).resolve()
    corpus_dir, model_dir = work / "corpus", work / "model"
    if not (corpus_dir / "captions").is_dir():
        inputs = write_sample_corpus(str(corpus_dir))
        print(f"[demo] wrote the sample corpus to {corpus_dir}")
    else:
        inputs = {"webdataset": str(corpus_dir / "captions"), "obelics": str(corpus_dir / "documents")}
    if not (model_dir / "config.json").is_file():
        revision = create("tiny", str(model_dir), num_labels=1, seed=0)
        print(f"[demo] wrote a random-initialised tiny checkpoint to {model_dir} (revision {revision})")

    connect_ray()
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
    print(UNTRAINED_NOTE)
    print(f"\n[demo] outputs under {work / 'scores'}: scores/*.parquet, _manifest/, summary.json")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
