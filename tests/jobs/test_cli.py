"""The command line as curation people use it: help that shows the real defaults, dry runs that start nothing and
tell what a run would do (and what it would cost), and the console scripts (command lines in this process, the
installed scripts as processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from jobs import sample_corpus as corpus
from jobs._config import _flag_fields, build_parser, default_of
from pipeline.curation import CurateConfig
from pipeline.scoring import ScoreConfig, score_dataset
from pipeline.synth import SynthConfig
from pipeline.training import TrainConfig
from tests.support.jobs import job_env, run_main
from tests.support.shards import write_shards

CONFIGS = {"score": ScoreConfig, "synth": SynthConfig, "train": TrainConfig, "curate": CurateConfig}


@pytest.mark.parametrize("job", list(CONFIGS))
def test_help_shows_every_fields_real_default(job):
    config = CONFIGS[job]
    parser, _ = build_parser(config, f"python -m jobs.{job}", "")
    text = parser.format_help()
    assert "(default: None)" not in text and "SOURCE__" not in text
    helps = {flag: action.help for action in parser._actions for flag in action.option_strings}
    for path, info in _flag_fields(config):
        flag = "--" + "-".join(p.replace("_", "-") for p in path)
        shown = helps.get(flag)
        assert shown and flag in text, f"{flag} missing from --help"
        assert info.description and shown.startswith(info.description), f"{flag} has no help"
        default = default_of(info)
        if default is None:
            assert "default" in shown.lower(), f"{flag}: says nothing of what happens when unset: {shown}"
        elif isinstance(default, bool):
            assert shown.endswith(f"(default: {str(default).lower()})"), shown
        elif not str(default).startswith("PydanticUndefined"):
            assert shown.endswith(f"(default: {default})"), shown


def test_the_model_commands_describe_themselves(capsys):
    import model.convert
    import model.create

    for command in (model.convert, model.create):
        with pytest.raises(SystemExit) as ended:
            command.main(["--help"])
        assert ended.value.code == 0
        usage, description = capsys.readouterr().out.split("\n\n")[:2]
        assert description.strip() and not description.strip().startswith("options"), usage + description


def test_a_dry_run_starts_nothing_and_its_numbers_match_the_run(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from jobs.score import main
    from pipeline.runner.executors import RayExecutor

    def no_ray(*args):
        raise AssertionError("the dry run connected to Ray")

    monkeypatch.setattr(RayExecutor, "connect", no_ray)
    write_shards(tmp_path / "in", n_shards=3, per_shard=4, prefix="d", name="{k}")
    out = tmp_path / "out"
    argv = ["--input", tmp_path / "in", "--format", "webdataset", "--output", out, "--model", tiny_checkpoint,
            "--dry-run", "--gpus-per-actor", "0", "--gpu-rate", "100", "--gpu-hour-price", "3.6"]
    code, stdout, stderr = run_main(main, argv, capsys)
    assert code == 0, stderr[-2000:]
    assert not out.exists()  # it wrote nothing, not even the lease
    assert "3 total · 0 already committed · 3 new" in stdout
    assert "12 in the new shards (counted)" in stdout
    assert "0.00 GPU-hours at 100 samples/s per GPU (--gpu-rate)" in stdout  # 12 / 100 / 3600
    assert re.search(r"\$0\.0[01] at \$3\.6 per GPU-hour", stdout)
    summary = score_dataset(ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(out),
                                        model=tiny_checkpoint, executor="local"), progress=False)
    assert summary["shards"]["new"] == 3 and summary["records"]["this_run"] == 12  # what the dry run said
    corpus.write_webdataset(str(tmp_path / "in" / "3.tar"), corpus.caption_samples(5, seed=9, prefix="d3-"))
    code, stdout, _ = run_main(main, argv, capsys)
    assert "4 total · 3 already committed · 1 new" in stdout and "5 in the new shards" in stdout
    # The dry run checks the output's identity as the run would (and still writes nothing).
    identity = (out / "_output.json").read_bytes()
    code, _, stderr = run_main(main, [*argv, "--dtype", "float16"], capsys)
    assert code == 2 and "dtype='float32'" in stderr and "dtype='float16'" in stderr, stderr
    assert (out / "_output.json").read_bytes() == identity


@pytest.mark.parametrize("job, args", [
    ("synth", ["--input", "{in}", "--format", "webdataset", "--output", "{tmp}/pairs"]),
    ("curate", ["--scores", "{tmp}/none", "--output", "{tmp}/cur", "--keep-fraction", "0.5"]),
])
def test_every_job_has_a_dry_run(job, args, tmp_path, capsys):
    import importlib

    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(3))
    argv = [a.format(tmp=tmp_path, **{"in": tmp_path / "in"}) for a in args]
    code, stdout, stderr = run_main(importlib.import_module(f"jobs.{job}").main, [*argv, "--dry-run"], capsys)
    if job == "synth":
        assert code == 0 and "3 origins" not in stdout and "3 in the new shards" in stdout
        assert "12 pairs" in stdout and not (tmp_path / "pairs").exists()
    else:  # nothing scored there: the same error a run would give, before anything starts
        assert code == 2 and "error: field 'scores': no committed score records" in stderr


def test_console_scripts_are_installed():
    bindir = os.path.dirname(sys.executable)
    for name in ("unifilter-score", "unifilter-synth", "unifilter-train", "unifilter-curate"):
        res = subprocess.run([os.path.join(bindir, name), "--help"], capture_output=True, text=True, timeout=120,
                             env=job_env())
        assert res.returncode == 0 and "--dry-run" in res.stdout, name
