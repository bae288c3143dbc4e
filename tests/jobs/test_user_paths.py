"""The paths a new user takes, as users take them: every place a job writes checked before the first byte, files
others can read, YAML keys as the flags name them, settings refused at once naming the field, help and messages
that say what to do. The command lines run in this process (`jobs.X.main`) with their stages (the local executor);
nothing here starts Ray."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from jobs import sample_corpus as corpus
from tests.support.curation import fake_scores, random_records
from tests.support.jobs import run_main


def scored(tmp_path, fmt: str = "webdataset") -> str:
    """A scoring output of 20 caption records of the shard `in/00000.tar` (or `.parquet`), no model, no Ray."""
    name = "00000.tar" if fmt == "webdataset" else "00000.parquet"
    shard, scores = tmp_path / "in" / name, tmp_path / f"scores-{fmt}"
    if not scores.exists():
        samples = corpus.caption_samples(20, seed=0, prefix="a")
        write = corpus.write_webdataset if fmt == "webdataset" else corpus.write_caption_parquet
        write(str(shard), samples)
        records = [{**r, "id": s["key"]} for r, s in zip(random_records(20, "caption", seed=0, prefix=""), samples)]
        fake_scores(str(scores), {name: records}, inputs={name: str(shard)}, fmt=fmt)
    return str(scores)


# -- item 1: every output location checked writable before the first byte -------------------------------------------
def test_a_report_folder_that_cannot_be_written_is_refused_before_anything_is_committed(tmp_path, capsys):
    from jobs.curate import main

    (tmp_path / "taken").write_text("a file where the report's folder would go")
    out = tmp_path / "cur"
    for report in (tmp_path / "taken", tmp_path / "taken" / "report"):
        for dry in ([], ["--dry-run"]):
            code, _, err = run_main(main, ["--scores", scored(tmp_path), "--output", out, "--min-score", "1",
                                           "--report", report, "--executor", "local", *dry], capsys)
            assert code == 2 and "field 'report'" in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()  # no selected/, no summary.json, no lease


def test_a_file_where_curation_writes_its_shards_is_refused_before_anything_is_committed(tmp_path, capsys):
    from jobs.curate import main

    out = tmp_path / "cur"
    out.mkdir()
    (out / "shards").write_text("not a folder")
    code, _, err = run_main(main, ["--scores", scored(tmp_path), "--output", out, "--min-score", "1",
                                   "--samples-per-shard", "5", "--executor", "local"], capsys)
    assert code == 2 and "field 'output'" in err and "shards" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["shards"]


# -- item 3: files others can read ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, how", [("webdataset", "--materialize"), ("parquet", "--materialize"),
                                      ("webdataset", "--samples-per-shard")])
def test_every_file_a_curation_writes_has_the_processs_umask(tmp_path, capsys, fmt, how):
    from jobs.curate import main

    out = tmp_path / "cur"
    old = os.umask(0o022)
    try:
        code, _, err = run_main(main, ["--scores", scored(tmp_path, fmt), "--output", out, "--min-score", "1", how,
                                       *(["5"] if how == "--samples-per-shard" else []), "--executor", "local"],
                                capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    files = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert any(name.startswith("shards/") and name.endswith((".tar", ".parquet")) for name in files), files
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o644} == {}


def test_a_file_where_synth_writes_its_pairs_is_refused_before_anything_is_written(tmp_path, capsys):
    from jobs.synth import main

    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(2, seed=0))
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "val").write_text("not a folder")
    code, _, err = run_main(main, ["--input", tmp_path / "in", "--format", "webdataset", "--output", out,
                                   "--executor", "local"], capsys)
    assert code == 2 and "field 'output'" in err and "val" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["val"]


# -- item 4: YAML keys are the flags' names -------------------------------------------------------------------------
def renamed_parquet_corpus(tmp_path) -> str:
    """A caption Parquet shard whose columns are `img` and `cap`, not the defaults."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = corpus.caption_samples(2, seed=0)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [s["key"] for s in samples], "img": [s["image"] for s in samples],
                             "cap": [s["caption"] for s in samples]}), tmp_path / "in" / "0.parquet")
    return str(tmp_path / "in")


def synth_dry_run_with(tmp_path, capsys, yaml_text: str) -> tuple[int, str, str]:
    from jobs.synth import main

    config = tmp_path / "job.yaml"
    config.write_text(f"input: {renamed_parquet_corpus(tmp_path)}\nformat: parquet\noutput: {tmp_path / 'out'}\n"
                      + yaml_text)
    return run_main(main, ["--config", config, "--dry-run"], capsys)


def test_a_yaml_key_is_the_flags_name_with_underscores(tmp_path, capsys):
    code, out, err = synth_dry_run_with(tmp_path, capsys, "source_image_column: img\nsource_text_column: cap\n")
    assert code == 0, err
    assert "origins    2 in the new shards" in out, out


def test_the_nested_yaml_form_is_accepted_too(tmp_path, capsys):
    code, _, err = synth_dry_run_with(tmp_path, capsys, "source: {image_column: img, text_column: cap}\n")
    assert code == 0, err


def test_a_field_set_flat_and_nested_is_refused_naming_the_flat_key(tmp_path, capsys):
    code, _, err = synth_dry_run_with(tmp_path, capsys, "source_image_column: img\nsource: {image_column: x}\n")
    assert code == 2 and "field 'source_image_column'" in err and "keep source_image_column:" in err, err


def test_a_misspelt_yaml_key_is_named_with_the_key_it_resembles(tmp_path, capsys):
    code, _, err = synth_dry_run_with(tmp_path, capsys, "source_image_colum: img\n")
    assert code == 2 and "field 'source_image_colum': unknown field (did you mean source_image_column?)" in err, err


def test_a_missing_column_names_the_yaml_key_that_sets_it(tmp_path, capsys):
    code, _, err = synth_dry_run_with(tmp_path, capsys, "source_text_column: cap\n")
    assert code == 2 and "field 'source_image_column'" in err, err


def test_help_says_yaml_keys_are_the_flags_names(capsys):
    from jobs.score import main

    try:
        main(["--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "keyed by its flag's name with underscores (source_image_column: for" in text, text


# -- item 5: a generator's missing setting is one line naming the field, before Ray starts ---------------------------
@pytest.fixture()
def ray_must_not_start(monkeypatch):
    """A tripwire: a job that connects to Ray fails the test (Ray may already run in this test process for other
    tests, so `ray.is_initialized()` cannot tell)."""
    import pipeline.runner.cluster

    def connect(*args, **kwargs):
        raise AssertionError("the job connected to Ray")

    monkeypatch.setattr(pipeline.runner.cluster, "connect", connect)


@pytest.fixture()
def no_aws_region(monkeypatch, tmp_path):
    """An AWS chain with no region anywhere (no variable, no config file); the tests' fake credentials stay."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))


@pytest.mark.parametrize("dry", [[], ["--dry-run"]])
def test_bedrock_without_a_region_is_one_line_naming_the_field_before_ray_starts(tmp_path, capsys, no_aws_region,
                                                                                 dry, ray_must_not_start):
    from jobs.synth import main

    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(2, seed=0))
    code, _, err = run_main(main, ["--input", tmp_path / "in", "--format", "webdataset", "--output", tmp_path / "out",
                                   "--generator", "bedrock", *dry], capsys)
    assert code == 2 and err.startswith("error: field 'region'") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bedrock_without_credentials_is_one_line_naming_the_generator(tmp_path, capsys, monkeypatch):
    from jobs.synth import main

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never the cloud's metadata address
    code, _, err = run_main(main, ["--input", tmp_path, "--format", "webdataset", "--output", tmp_path / "out",
                                   "--generator", "bedrock", "--region", "us-east-1", "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: field 'generator'") and "credentials" in err, err


@pytest.mark.parametrize("missing, given", [("endpoint", ["--llm", "m"]), ("llm", ["--endpoint", "http://127.0.0.1:9/v1"])])
def test_openai_without_a_setting_is_one_line_naming_it(tmp_path, capsys, missing, given):
    from jobs.synth import main

    code, _, err = run_main(main, ["--input", tmp_path, "--format", "webdataset", "--output", tmp_path / "out",
                                   "--generator", "openai", *given, "--dry-run"], capsys)
    assert code == 2 and f"field '{missing}' is required" in err and len(err.strip().splitlines()) == 1, err


# -- item 6: --sweep is a dry run's, never ignored -------------------------------------------------------------------
def test_a_sweep_without_a_dry_run_is_refused_naming_both_flags(tmp_path, capsys):
    from jobs.curate import main

    out = tmp_path / "cur"
    code, _, err = run_main(main, ["--scores", scored(tmp_path), "--output", out, "--keep-fraction", "0.5",
                                   "--sweep", "0.1,0.2", "--executor", "local"], capsys)
    assert code == 2 and "--sweep" in err and "--dry-run" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_sweep_in_a_dry_run_prints_its_table(tmp_path, capsys):
    from jobs.curate import main

    code, out, err = run_main(main, ["--scores", scored(tmp_path), "--output", tmp_path / "cur", "--keep-fraction",
                                     "0.5", "--sweep", "0.1,0.2", "--executor", "local", "--dry-run"], capsys)
    assert code == 0 and "sweep      fraction -> threshold" in out, err


# -- item 9: training checks every path before Ray starts; a finished run says so at once ---------------------------
@pytest.fixture()
def pairs(tmp_path) -> Path:
    """jobs.synth's output for 6 captions, half held out: OUTPUT/train and OUTPUT/val."""
    from pipeline.synth import SynthConfig, synthesize

    corpus.write_webdataset(str(tmp_path / "real" / "0.tar"), corpus.caption_samples(6, seed=3))
    synthesize(SynthConfig(input=str(tmp_path / "real"), format="webdataset", output=str(tmp_path / "pairs"),
                           val_fraction=0.5, executor="local"), progress=False)
    return tmp_path / "pairs"


def train(capsys, pairs: Path, out: Path, *extra) -> tuple[int, str, str]:
    from jobs.train import main

    return run_main(main, ["--train", pairs / "train", "--val", pairs / "val", "--output", out, *extra], capsys)


@pytest.mark.parametrize("field", ["val", "train", "output", "storage", "init"])
def test_training_refuses_a_bad_path_before_ray_starts_naming_the_field(tmp_path, capsys, pairs, field,
                                                                       ray_must_not_start):
    (tmp_path / "a-file").write_text("not a folder")
    bad = {"val": ["--val", tmp_path / "no-such-val"], "train": ["--train", tmp_path / "empty"],
           "output": ["--output", tmp_path / "a-file"], "storage": ["--storage", tmp_path / "a-file" / "ray"],
           "init": ["--init", tmp_path / "no-such-checkpoint"]}[field]
    (tmp_path / "empty").mkdir()
    code, _, err = train(capsys, pairs, tmp_path / "run", *bad)
    assert code == 2 and err.startswith(f"error: field '{field}'") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def finish_a_run(pairs: Path, out: Path, epochs: int) -> None:
    """What a run of `epochs` epochs leaves (checkpoint model, optimizer state and train state through the real
    writers; the summary written after the export), without training it."""
    import torch

    from model.create import create
    from pipeline.io.publish import write_json
    from pipeline.training.state import save_train_state

    checkpoint = out / "ray_train" / "unifilter" / "checkpoint_000000"
    create("tiny", str(checkpoint), num_labels=1, seed=0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_train_state(checkpoint, optimizer, scheduler, {"epoch": epochs, "step": 3, "batches_into_epoch": 0,
                                                        "history": []})
    write_json(str(out / "train_summary.json"), {
        "train": str(pairs / "train"), "best": str(out / "best"), "name": "unifilter",
        "storage": str(out / "ray_train"), "train_pairs": 12, "epochs": epochs, "total_steps": 3, "elapsed_s": 9.0,
        "best_metrics": {"epoch": epochs, "val_accuracy": 0.5}})


def test_a_finished_run_says_so_and_exits_at_once(tmp_path, capsys, pairs, ray_must_not_start):
    finish_a_run(pairs, tmp_path / "run", epochs=1)
    code, out, err = train(capsys, pairs, tmp_path / "run", "--epochs", "1")
    assert code == 0, err
    assert "run 'unifilter' in " in out and "already finished (1 epoch); nothing to do" in out, out
    code, out, err = train(capsys, pairs, tmp_path / "run", "--epochs", "1", "--dry-run")
    assert code == 0 and "resume     finished: a run does nothing" in out, err


def test_a_finished_run_asked_for_more_epochs_resumes(tmp_path, capsys, pairs):
    finish_a_run(pairs, tmp_path / "run", epochs=1)
    code, out, err = train(capsys, pairs, tmp_path / "run", "--epochs", "2", "--dry-run")
    assert code == 0 and "resume     from step 3" in out, err


# -- item 10: help, usage and messages ------------------------------------------------------------------------------
JOBS = ["score", "synth", "curate", "train"]


def help_of(job: str, capsys) -> str:
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"jobs.{job}").main(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("job", JOBS)
def test_help_closes_every_backtick_and_says_what_this_jobs_dry_run_does(job, capsys):
    usage, description, options = help_of(job, capsys).split("\n\n", 2)
    assert description.count("`") % 2 == 0 and description.count("`") >= 2, description
    dry_run = " ".join(options.split("--dry-run", 1)[1].split("--verbose", 1)[0].split())
    says = {"score": "GPU-hours", "synth": "pairs", "curate": "thresholds", "train": "resume point"}[job]
    assert says in dry_run and "scoring:" not in dry_run, dry_run


@pytest.mark.parametrize("job", JOBS)
def test_a_console_script_names_itself_in_its_usage(job, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [f"/venv/bin/unifilter-{job}", "--help"])
    assert help_of(job, capsys).startswith(f"usage: unifilter-{job} ")
    monkeypatch.setattr("sys.argv", [f"/repo/jobs/{job}.py", "--help"])
    assert help_of(job, capsys).startswith(f"usage: python -m jobs.{job} ")


def test_an_unknown_flag_is_two_lines_with_the_flag_it_resembles(tmp_path, capsys):
    from jobs.curate import main

    with pytest.raises(SystemExit) as ended:
        main(["--scores", str(tmp_path), "--output", str(tmp_path / "c"), "--min-socre", "1"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and len(err.strip().splitlines()) == 2, err
    assert "unrecognized arguments: --min-socre 1 (did you mean: --min-socre -> --min-score?)" in err, err


def test_ctrl_c_while_a_run_starts_is_a_line_of_its_own_saying_what_the_output_holds(tmp_path, capsys,
                                                                                    monkeypatch):
    from jobs.curate import main
    from pipeline.runner.executors import LocalExecutor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises while Ray starts

    monkeypatch.setattr(LocalExecutor, "connect", interrupted)
    code, _, err = run_main(main, ["--scores", scored(tmp_path), "--output", tmp_path / "cur", "--keep-fraction",
                                   "0.5", "--executor", "local"], capsys)
    assert code == 130 and err.startswith("\ninterrupted (Ctrl-C) while the run started"), err
    assert "0 of 1 shards were committed before it, 1 were left: the same command goes on" in err, err


def test_a_report_made_from_the_repository_root_is_ignored_by_git():
    import subprocess

    from tests.support.jobs import REPO_ROOT

    ignored = subprocess.run(["git", "check-ignore", "-q", "report/index.html"], cwd=REPO_ROOT)
    assert ignored.returncode == 0
