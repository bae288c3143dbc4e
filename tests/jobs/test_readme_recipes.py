"""The README's recipes as printed: the join snippet against a real img2dataset output folder and real scores, and
every glob and brace example reaching the job as one argument through the shell."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import curate
from jobs import sample_corpus as corpus
from pipeline.io.uris import filesystem_for
from tests.support.curation import dropped, fake_scores, selected
from tests.support.jobs import REPO_ROOT, run_main

README = Path(REPO_ROOT) / "README.md"
README_BUCKET = "s3://bucket/"  # the README's examples' bucket; the tests' own takes its place


def readme_python_block(*containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if all(c in b for c in containing)]
    return block


def write_file(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_img2dataset_folder(uri: str, n_shards: int, per_shard: int) -> dict[str, str]:
    """What img2dataset writes for each shard: NNNNN.tar (KEY.jpg, KEY.txt, KEY.json with key and url), NNNNN.parquet
    (one row per URL tried, the failed ones too) and NNNNN_stats.json; plus a top-level _stats.json. Returns the
    caption of each downloaded sample by key."""
    captions = {}
    for k in range(n_shards):
        samples = corpus.caption_samples(per_shard, seed=k, prefix="")
        rows = []
        for i, s in enumerate(samples):
            s["key"] = f"{k:05d}{i:04d}"
            s["meta"] = {"key": s["key"], "url": f"https://img.example/{s['key']}.jpg", "caption": s["caption"],
                         "width": 128, "height": 128, "status": "success"}
            rows.append({**s["meta"], "error_message": None})
            captions[s["key"]] = s["caption"]
        failed = f"{k:05d}{per_shard:04d}"
        rows.append({"key": failed, "url": f"https://img.example/{failed}.jpg", "caption": "gone", "width": None,
                     "height": None, "status": "failed_to_download", "error_message": "HTTP 404"})
        corpus.write_webdataset(f"{uri}{k:05d}.tar", samples)
        table = pa.Table.from_pylist(rows)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        write_file(f"{uri}{k:05d}.parquet", buf.getvalue().to_pybytes())
        write_file(f"{uri}{k:05d}_stats.json", json.dumps({"count": len(rows), "successes": per_shard}).encode())
    write_file(f"{uri}_stats.json", json.dumps({"count": n_shards * (per_shard + 1)}).encode())
    return captions


def test_the_join_snippet_joins_scores_to_an_img2dataset_folder(s3_bucket, tiny_checkpoint):
    from pipeline.scoring import ScoreConfig, score_dataset

    bucket = f"s3://{s3_bucket}/"
    captions = write_img2dataset_folder(f"{bucket}laion/", n_shards=2, per_shard=3)
    scored = score_dataset(ScoreConfig(input=f"{bucket}laion/", format="webdataset", output=f"{bucket}scores/laion",
                                       model=tiny_checkpoint, executor="local"), progress=False)
    assert scored["shards"]["committed_this_run"] == 2

    snippet = readme_python_block("read_scores(", ".join(")
    assert snippet.count(README_BUCKET) >= 2  # the scores and the corpus, both in the README's bucket
    namespace: dict = {}
    exec(compile(snippet.replace(README_BUCKET, bucket), "README.md", "exec"), namespace)  # as printed

    joined = namespace["joined"].sort_by("key").to_pylist()
    assert [r["key"] for r in joined] == sorted(captions)  # each scored sample once, the failed URLs not at all
    for row in joined:
        assert row["caption"] == captions[row["key"]] and row["status"] == "success"
        assert row["url_meta"] == row["url"] and row["score"] is not None


# -- UniFilter as a stage of a Ray Data pipeline: the README's recipe on the folder layout it describes ----------------
README_MODEL = '"s3://bucket/models/unifilter-1.5b"'


def scorer_snippet(bucket: str, model: str) -> str:
    snippet = readme_python_block("UniFilterScorer", "map_batches")
    assert README_MODEL in snippet and 'file_extensions=["tar"]' in snippet
    return snippet.replace(README_MODEL, repr(model)).replace(README_BUCKET, bucket)


def test_the_scorer_recipe_asking_for_a_gpu_the_cluster_cannot_give_is_refused_at_once(s3_bucket, tiny_checkpoint,
                                                                                       ray_cluster):
    import pytest

    from pipeline.errors import InputError

    bucket = f"s3://{s3_bucket}/"
    write_img2dataset_folder(f"{bucket}laion/", n_shards=1, per_shard=2)
    with pytest.raises(InputError, match=r"field 'num_gpus': this machine's Ray instance has no GPU"):
        exec(compile(scorer_snippet(bucket, tiny_checkpoint), "README.md", "exec"), {})  # as printed: num_gpus=1


def test_the_scorer_recipe_scores_an_img2dataset_folder_reading_only_its_tars(s3_bucket, tiny_checkpoint,
                                                                            ray_cluster):
    bucket = f"s3://{s3_bucket}/"
    captions = write_img2dataset_folder(f"{bucket}laion/", n_shards=2, per_shard=3)
    snippet = scorer_snippet(bucket, tiny_checkpoint)
    assert "checked_num_gpus(1), concurrency=4" in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("checked_num_gpus(1), concurrency=4", "checked_num_gpus(0), concurrency=1"),
                 "README.md", "exec"), namespace)  # as printed but on CPUs: this machine has no GPU
    rows = namespace["scored"].select_columns(["__key__", "txt", "score", "error"]).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(captions)  # every sample of the tars, nothing of the sidecars
    assert all(r["error"] is None and r["score"] is not None for r in rows), rows
    assert namespace["kept"].count() == sum(r["score"] >= 2.5 for r in rows)


# -- globs and brace ranges: quoted, or the shell expands them before the job sees them -------------------------------
EXPANDED_BY_THE_SHELL = re.compile(r"[*?]|\{[^{}\s]*(\.\.|,)[^{}\s]*\}")


def readme_shell_words() -> list[str]:
    """The words of every shell command in the README (fenced blocks that are not Python) and of every inline example
    in the sections that show `--input` values and cluster commands, as the shell would split them."""
    text = README.read_text()
    commands = [body.replace("\\\n", " ") for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
                if lang != "python"]
    for section in ("## Scoring a corpus", "## Running on a cluster"):
        prose = re.sub(r"```.*?```", "", text.split(section, 1)[1].split("\n## ", 1)[0], flags=re.S)
        commands += re.findall(r"`([^`\n]+)`", prose)
    words = []
    for command in commands:
        for line in command.splitlines():
            words += shlex.split(re.sub(r"(^|\s)#.*", "", line), posix=False)  # posix=False keeps the quotes
    return words


def test_every_glob_and_brace_example_in_the_readme_reaches_the_job_as_one_argument(tmp_path):
    examples = [w for w in readme_shell_words() if EXPANDED_BY_THE_SHELL.search(w) and "$(" not in w]
    assert len(examples) >= 2, examples  # at least the --input glob and brace range
    for word in examples:
        # failglob: an unquoted glob is an error even where nothing matches; a brace range always expands
        shell = subprocess.run(["bash", "-O", "failglob", "-c", f"printf '%s\\n' {word}"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=30)
        assert shell.returncode == 0 and len(shell.stdout.splitlines()) == 1, (
            f"README's {word} is expanded by the shell: {shell.stderr.strip() or shell.stdout[:200]}")


# -- selecting many times from one scoring: the section's commands as printed, on scores and lists they name ----------
def readme_section_commands(section: str) -> list[list[str]]:
    """The words of each shell command in a README section's fenced block (comment lines left out)."""
    body = README.read_text().split(section, 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_the_select_many_recipes_run_as_printed(tmp_path, capsys):
    explore, select, balance = readme_section_commands("### Selecting many times from one scoring")
    assert explore[:3] == select[:3] == balance[:3] == ["python", "-m", "jobs.curate"]
    records = [{"id": f"s{i}", "kind": "caption", "key": f"s{i}", "score": i / 10, "label": 1, "error": None}
               for i in range(20)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"key": [f"s{i}" for i in range(20)], "similarity": [(i % 5) / 10 for i in range(20)],
                             "sha256": [f"{i:064x}" for i in range(20)]}), corpus / "00000.parquet")
    fake_scores(str(tmp_path / "runs" / "scores"), {"00000.tar": records}, {"00000.tar": str(corpus / "00000.tar")},
                "webdataset")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "takedown-sha256.txt").write_text(f"sha256\n{19:064x}\n")
    pq.write_table(pa.table({"id": ["s18", "s0"]}), tmp_path / "lists" / "benchmark-ids.parquet")
    for words in (explore, select, balance):
        argv = [w.replace("runs/", f"{tmp_path}/runs/").replace("lists/", f"{tmp_path}/lists/") for w in words[3:]]
        code, out, err = run_main(curate.main, [*argv, "--executor", "local"], capsys)
        assert code == 0, err
        assert "sweep" in out + err if words is explore else "kept" in out + err
    output = tmp_path / "runs" / "curated-fused"
    kept = selected(output, ranked=True)
    assert kept.num_rows == 5 and min(kept.column("rank_value").to_pylist()) > 0.5  # 30% of the 17 left
    assert not {"s0", "s18", "s19"} & set(kept.column("id").to_pylist())
    assert len(dropped(output)) == 20 - 5 and (output / "kept_ids.parquet").exists()
    assert selected(tmp_path / "runs" / "curated-balanced").num_rows == 6  # 30% of 20: no shard over 1,000
